"""The ``nan-guard`` stopping policy: stop at the first non-finite loss or gradient norm."""

from __future__ import annotations

import math

from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.stopping import CONTINUE, Decision, StoppingPolicy


class NanGuard(StoppingPolicy):
    """Stops the run when the training loss (or, optionally, the gradient norm) or the
    evaluation loss is nan or infinite. It asks for no final save: the weights can no longer be
    trusted, so the last good checkpoint stays the newest one. It keeps no state."""

    name = "nan-guard"

    class Options(PluginOptions):
        check_grad_norm: bool = Field(
            True, description="also stop when the gradient norm is nan or infinite",
        )

    options: Options

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        keys = ["loss", "grad_norm"] if self.options.check_grad_norm else ["loss"]
        for key in keys:
            if key in metrics and not math.isfinite(metrics[key]):
                # The loop skips the optimizer step on a non-finite loss or gradient.
                return self._stop(key, metrics[key], step, "the update was not applied; ")
        return CONTINUE

    def on_eval(self, step: int, metrics: dict[str, float]) -> Decision:
        if "eval/loss" in metrics and not math.isfinite(metrics["eval/loss"]):
            return self._stop("eval/loss", metrics["eval/loss"], step, "")
        return CONTINUE

    @staticmethod
    def _stop(key: str, value: float, step: int, what: str) -> Decision:
        return Decision(
            stop=True, save=False,
            reason=f"non-finite {key} ({value}) at step {step}: {what}"
                   f"the last good checkpoint is kept",
        )


@hookimpl
def dpo_register_stopping_policies(register):
    register(NanGuard)
