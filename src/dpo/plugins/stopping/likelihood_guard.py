"""The ``likelihood-guard`` stopping policy: stop (or warn) when DPO pushes the chosen side's
likelihood down while its margins still grow.

DPO only asks the chosen completion to gain on the rejected one; both log-probs can fall
together, and the chosen one often does ("likelihood displacement": Pal et al. 2024,
arXiv:2402.13228, Sec. 3; Razin et al. 2024, arXiv:2410.08847, Sec. 4). Margins and accuracy
then look healthy while the model moves probability mass to completions in neither side.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.stopping import CONTINUE, Decision, RunContext, StoppingPolicy
from dpo.plugins.stopping._metric import Source, preference_only, read_metric, resolve_source

PER_TOKEN = "logps/chosen_per_token"
MARGINS = "rewards/margins"


class LikelihoodGuard(StoppingPolicy):
    """Watches the policy's mean chosen log-prob per token (``logps/chosen_per_token``: each
    pair's summed chosen log-prob over its chosen tokens, averaged over pairs) and the mean
    reward margin (``rewards/margins``). Their first observation is the start: the step-0
    evaluation (policy == reference) when evaluations are watched, else step 1's training
    metrics (computed before step 1's update, so again the starting policy's). It fires at the
    first observation where both hold:

    * the per-token chosen log-prob is more than ``max_drop`` nats below its start value;
    * ``rewards/margins`` is above its start value (the margins "still rise": training goes on
      widening them, so the fall is displacement, not a collapse of both rewards).

    ``action=stop`` ends the run there (with a final model); ``action=warn`` shows one warning
    the first time and lets the run go on. ``metric_source``: ``eval`` (the held-out
    evaluations), ``train`` (every step's metrics) or ``auto`` (evaluations when the run holds
    out data, else steps). The start values and whether it warned are checkpointed."""

    name = "likelihood-guard"

    class Options(PluginOptions):
        max_drop: float = Field(1.0, gt=0.0, description=(
            "nats per token the chosen log-prob may fall below its start value"))
        action: Literal["stop", "warn"] = Field("stop", description=(
            "stop: end the run; warn: one warning, the run goes on"))
        metric_source: Source = Field("auto", description=(
            "eval, train, or auto (eval when the run holds out data)"))

    options: Options

    def __init__(self, options: PluginOptions | None = None, **values: Any):
        super().__init__(options, **values)
        self.prefix = "eval/" if self.options.metric_source == "eval" else ""
        self.start_logp: float | None = None
        self.start_margin: float | None = None
        self.warned = False

    def prepare(self, run: RunContext) -> None:
        preference_only(self.name, run.objective)
        self.prefix = resolve_source(self.name, self.options.metric_source, run.holds_out)

    def watches(self) -> list[str]:
        return [self.prefix + PER_TOKEN, self.prefix + MARGINS]

    def observe(self, step: int, metrics: dict[str, float]) -> Decision:
        logp = read_metric(self.name, self.prefix + PER_TOKEN, metrics)
        margin = read_metric(self.name, self.prefix + MARGINS, metrics)
        if self.start_logp is None or self.start_margin is None:
            self.start_logp, self.start_margin = logp, margin
            return CONTINUE
        drop = self.start_logp - logp  # nan compares false: never fires on nan
        if not (drop > self.options.max_drop and margin > self.start_margin):
            return CONTINUE
        reason = (f"{self.prefix}{PER_TOKEN} fell {drop:.3g} nats/token (from "
                  f"{self.start_logp:.4g} to {logp:.4g}, more than max_drop "
                  f"{self.options.max_drop:g}) while {self.prefix}{MARGINS} rose from "
                  f"{self.start_margin:.3g} to {margin:.3g} at step {step}: likelihood "
                  "displacement")
        if self.options.action == "stop":
            return Decision(stop=True, reason=reason)
        if self.warned:
            return CONTINUE
        self.warned = True
        return Decision(warn=reason)

    def on_eval(self, step: int, metrics: dict[str, float]) -> Decision:
        return self.observe(step, metrics) if self.prefix else CONTINUE

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        return CONTINUE if self.prefix else self.observe(step, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"start_logp": self.start_logp, "start_margin": self.start_margin,
                "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_logp, self.start_margin = state.get("start_logp"), state.get("start_margin")
        self.warned = bool(state.get("warned", False))


@hookimpl
def dpo_register_stopping_policies(register):
    register(LikelihoodGuard)
