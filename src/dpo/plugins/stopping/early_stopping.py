"""The ``early-stopping`` stopping policy: stop when an evaluation metric stops improving.

Practitioners recommend it for DPO: held-out reward accuracy typically peaks and then decays as
the policy over-optimises the preference data, so the best weights are rarely the last ones.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.stopping import CONTINUE, Decision, StoppingPolicy
from dpo.plugins.stopping._metric import Mode, improves, is_eval_metric, read_metric


class EarlyStopping(StoppingPolicy):
    """Watches one metric (default ``eval/rewards/accuracies``, higher is better). An evaluation
    improves on the best so far when it beats it by more than ``min_delta``; after ``patience``
    evaluations in a row without improvement the run stops. With ``restore_best`` (the default)
    the run's final weights are those of the best evaluation. The best value, its step and the
    count of evaluations without improvement are checkpointed, so a resumed run decides exactly
    as an uninterrupted one."""

    name = "early-stopping"

    class Options(PluginOptions):
        metric: str = Field("eval/rewards/accuracies", description="metric to watch")
        mode: Mode = Field("max", description="max: higher is better; min: lower is better")
        patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
        min_delta: float = Field(0.0, ge=0.0, description="smallest change that counts as improvement")
        restore_best: bool = Field(True, description="end with the weights of the best evaluation")

        @field_validator("metric")
        @classmethod
        def _named(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("must name a metric, e.g. eval/rewards/accuracies")
            return value.strip()

    options: Options

    def __init__(self, options: PluginOptions | None = None, **values: Any):
        super().__init__(options, **values)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def watches(self) -> list[str]:
        return [self.options.metric]

    def restores_best(self) -> bool:
        return self.options.restore_best

    def improves(self, value: float) -> bool:
        return improves(value, self.best, self.options.mode, self.options.min_delta)

    def _observe(self, step: int, metrics: dict[str, float]) -> Decision:
        value = read_metric(self.name, self.options.metric, metrics)
        if self.improves(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return Decision(best=True)
        self.bad_evals += 1
        if self.bad_evals >= self.options.patience:
            return Decision(stop=True, reason=(
                f"{self.options.metric} has not improved on {self.best:.4g} (step "
                f"{self.best_step}) for {self.bad_evals} evaluations"))
        return CONTINUE

    def on_eval(self, step: int, metrics: dict[str, float]) -> Decision:
        if is_eval_metric(self.options.metric):
            return self._observe(step, metrics)
        return CONTINUE

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        # A training metric (e.g. loss) is watched at every step; patience counts steps then.
        if not is_eval_metric(self.options.metric):
            return self._observe(step, metrics)
        return CONTINUE

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))


@hookimpl
def dpo_register_stopping_policies(register):
    register(EarlyStopping)
