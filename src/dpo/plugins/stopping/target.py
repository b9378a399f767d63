"""The ``target`` stopping policy: stop once a metric crosses a threshold."""

from __future__ import annotations

from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.stopping import CONTINUE, Decision, StoppingPolicy
from dpo.plugins.stopping._metric import Mode, is_eval_metric, read_metric


class Target(StoppingPolicy):
    """Stops the run at the first evaluation (for an ``eval/`` metric) or step (for a training
    metric) where ``metric`` reaches ``threshold``: at or above it in ``max`` mode, at or below
    it in ``min`` mode. It keeps no state: the decision depends on the current value only."""

    name = "target"

    class Options(PluginOptions):
        metric: str = Field("eval/rewards/accuracies", description="metric to watch")
        threshold: float = Field(..., description="value that ends the run")
        mode: Mode = Field("max", description="max: stop at >= threshold; min: at <= threshold")

    options: Options

    def watches(self) -> list[str]:
        return [self.options.metric]

    def reached(self, value: float) -> bool:
        if self.options.mode == "max":
            return value >= self.options.threshold
        return value <= self.options.threshold

    def _check(self, step: int, metrics: dict[str, float]) -> Decision:
        value = read_metric(self.name, self.options.metric, metrics)
        if self.reached(value):
            sign = ">=" if self.options.mode == "max" else "<="
            return Decision(stop=True, reason=(f"{self.options.metric} = {value:.4g} {sign} "
                                               f"{self.options.threshold:g} at step {step}"))
        return CONTINUE

    def on_eval(self, step: int, metrics: dict[str, float]) -> Decision:
        return self._check(step, metrics) if is_eval_metric(self.options.metric) else CONTINUE

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        return CONTINUE if is_eval_metric(self.options.metric) else self._check(step, metrics)


@hookimpl
def dpo_register_stopping_policies(register):
    register(Target)
