"""The ``plateau`` stopping policy: early stopping on a smoothed training metric, for runs
without held-out data."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.stopping import CONTINUE, Decision, StoppingPolicy
from dpo.plugins.stopping._metric import Mode, improves, is_eval_metric, read_metric


class Plateau(StoppingPolicy):
    """Watches a training metric (default ``rewards/accuracies``, higher is better) at every
    step, smoothed as the mean of its last ``window`` values (a step's value is noisy: one
    batch). Once ``window`` steps are in, each smoothed value improves on the best so far when
    it beats it by more than ``min_delta``; after ``patience`` steps in a row without
    improvement the run stops. A nan never improves. It does not restore the best weights: a
    training metric's best would need a copy of the weights at each improvement, and the run
    ends with its last ones. The window, the best value and its step and the count of steps
    without improvement are checkpointed. For held-out metrics use ``early-stopping``."""

    name = "plateau"

    class Options(PluginOptions):
        metric: str = Field("rewards/accuracies", description="training metric to watch")
        mode: Mode = Field("max", description="max: higher is better; min: lower is better")
        window: int = Field(10, ge=1, description="steps in the moving mean")
        patience: int = Field(50, ge=1, description="steps without improvement before stopping")
        min_delta: float = Field(0.0, ge=0.0, description=(
            "smallest change that counts as improvement"))

        @field_validator("metric")
        @classmethod
        def _training(cls, value: str) -> str:
            value = value.strip()
            if not value:
                raise ValueError("must name a training metric, e.g. rewards/accuracies")
            if is_eval_metric(value):
                raise ValueError("plateau watches training metrics; for an eval/ metric use "
                                 "--stop early-stopping")
            return value

    options: Options

    def __init__(self, options: PluginOptions | None = None, **values: Any):
        super().__init__(options, **values)
        self.recent: list[float] = []
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_steps = 0

    def watches(self) -> list[str]:
        return [self.options.metric]

    def smoothed(self) -> float:
        return sum(self.recent) / len(self.recent)

    def improves(self, value: float) -> bool:
        return improves(value, self.best, self.options.mode, self.options.min_delta)

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        self.recent = [*self.recent, read_metric(self.name, self.options.metric, metrics)]
        self.recent = self.recent[-self.options.window:]
        if len(self.recent) < self.options.window:
            return CONTINUE
        value = self.smoothed()
        if self.improves(value):
            self.best, self.best_step, self.bad_steps = value, step, 0
            return CONTINUE
        self.bad_steps += 1
        if self.bad_steps >= self.options.patience:
            best = ("no finite value" if self.best is None
                    else f"{self.best:.4g} (step {self.best_step})")
            return Decision(stop=True, reason=(
                f"{self.options.metric} (mean of {self.options.window} steps) has not improved "
                f"on {best} for {self.bad_steps} steps"))
        return CONTINUE

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "best": self.best, "best_step": self.best_step,
                "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [float(v) for v in state.get("recent", [])]
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_steps = int(state.get("bad_steps", 0))


@hookimpl
def dpo_register_stopping_policies(register):
    register(Plateau)
