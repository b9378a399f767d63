"""The ``margin-guard`` stopping policy: stop when the policy runs away from the reference.

DPO's implicit rewards grow without bound on separable preferences: the margins keep widening
and the policy drifts ever further from its reference (over-optimisation; Azar et al. 2023,
arXiv:2310.12036, Sec. 4.2; Rafailov et al. 2024, arXiv:2406.02900). This policy caps the
margin and a KL proxy, the policy's mean log-ratio to the reference on the data.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.options import PluginOptions
from dpo.core.interfaces.stopping import CONTINUE, Decision, RunContext, StoppingPolicy
from dpo.plugins.stopping._metric import Source, preference_only, read_metric, resolve_source


def kl_proxy(chosen_reward: float, rejected_reward: float, beta: float) -> float:
    """The reference-to-policy drift in nats, from the mean implicit rewards r = beta * (log
    pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, arXiv:2305.18290, Eq. 5):
    -(r_chosen + r_rejected) / beta, the summed log-ratio pi_ref/pi over both completions of a
    pair, averaged over pairs: 0 while the policy is its reference, and an estimate of
    KL(pi_ref || pi) where the completions are the reference's own samples (on other data, a
    proxy of the drift, not a KL)."""
    return -(chosen_reward + rejected_reward) / beta


class MarginGuard(StoppingPolicy):
    """Stops the run when ``rewards/margins`` exceeds ``max_margin`` or the KL proxy
    ``-(rewards/chosen + rewards/rejected) / beta`` exceeds ``max_kl`` (nats), for ``patience``
    observations in a row. ``beta`` is the loss's own ``beta`` option unless given (the
    rewards are beta times log-ratios; a loss without ``beta`` needs ``-o
    margin-guard.beta=B`` for ``max_kl``). ``metric_source``: ``eval`` (evaluations),
    ``train`` (every step) or ``auto`` (evaluations when the run holds out data, else steps).
    The count of observations in a row over a limit is checkpointed."""

    name = "margin-guard"

    class Options(PluginOptions):
        max_margin: float | None = Field(None, description="largest allowed rewards/margins")
        max_kl: float | None = Field(None, gt=0.0, description=(
            "largest allowed KL proxy -(rewards/chosen + rewards/rejected)/beta, in nats"))
        beta: float | None = Field(None, gt=0.0, description=(
            "beta of the rewards; default: the loss's beta"))
        patience: int = Field(1, ge=1, description=(
            "observations in a row over a limit before stopping"))
        metric_source: Source = Field("auto", description=(
            "eval, train, or auto (eval when the run holds out data)"))

        @model_validator(mode="after")
        def _some_limit(self) -> "MarginGuard.Options":
            if self.max_margin is None and self.max_kl is None:
                raise PydanticCustomError("limits", "give max_margin, max_kl or both (e.g. -o "
                                          "margin-guard.max_margin=5)")
            return self

    options: Options

    def __init__(self, options: PluginOptions | None = None, **values: Any):
        super().__init__(options, **values)
        self.prefix = "eval/" if self.options.metric_source == "eval" else ""
        self.beta = self.options.beta
        self.over = 0

    def prepare(self, run: RunContext) -> None:
        preference_only(self.name, run.objective)
        self.prefix = resolve_source(self.name, self.options.metric_source, run.holds_out)
        if self.options.max_kl is not None and self.beta is None:
            beta = run.loss_options.get("beta")
            if not isinstance(beta, (int, float)) or not beta > 0:
                raise UsageError(f"--stop margin-guard: max_kl needs the rewards' beta, and "
                                 f"loss {run.loss!r} has no beta option; set -o "
                                 "margin-guard.beta=B")
            self.beta = float(beta)

    def watches(self) -> list[str]:
        names = ["rewards/margins"] if self.options.max_margin is not None else []
        if self.options.max_kl is not None:
            names += ["rewards/chosen", "rewards/rejected"]
        return [self.prefix + n for n in names]

    def breach(self, metrics: dict[str, float]) -> str | None:
        """What is over its limit in ``metrics``, or None."""
        o, p = self.options, self.prefix
        if o.max_margin is not None:
            margin = read_metric(self.name, p + "rewards/margins", metrics)
            if margin > o.max_margin:
                return f"{p}rewards/margins = {margin:.4g} > max_margin {o.max_margin:g}"
        if o.max_kl is not None:
            if self.beta is None:
                raise UsageError("margin-guard: max_kl needs beta; set -o margin-guard.beta=B")
            kl = kl_proxy(read_metric(self.name, p + "rewards/chosen", metrics),
                          read_metric(self.name, p + "rewards/rejected", metrics), self.beta)
            if kl > o.max_kl:
                return (f"KL proxy -({p}rewards/chosen + {p}rewards/rejected)/beta = {kl:.4g} "
                        f"nats > max_kl {o.max_kl:g} (beta {self.beta:g})")
        return None

    def observe(self, step: int, metrics: dict[str, float]) -> Decision:
        what = self.breach(metrics)
        self.over = self.over + 1 if what else 0
        if what and self.over >= self.options.patience:
            times = f" ({self.over} in a row)" if self.over > 1 else ""
            return Decision(stop=True, reason=f"{what} at step {step}{times}: over-optimisation")
        return CONTINUE

    def on_eval(self, step: int, metrics: dict[str, float]) -> Decision:
        return self.observe(step, metrics) if self.prefix else CONTINUE

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        return CONTINUE if self.prefix else self.observe(step, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"over": self.over}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.over = int(state.get("over", 0))


@hookimpl
def dpo_register_stopping_policies(register):
    register(MarginGuard)
