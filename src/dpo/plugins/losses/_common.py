"""What the reference-based losses share: the beta option, log-ratios and implicit rewards."""

from __future__ import annotations

from abc import abstractmethod
from typing import Union

import torch
from pydantic import Field

from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.interfaces.options import PluginOptions

# What ``RatioLoss.per_pair`` returns: [B] losses, or [B] losses and extra metrics to log.
PerPair = Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]


class BetaOptions(PluginOptions):
    """Options of a loss whose only knob is beta."""

    beta: float = Field(
        0.1, gt=0, allow_inf_nan=False,
        description="inverse temperature of the implicit reward beta*log(pi/pi_ref); larger keeps "
                    "the policy closer to the reference (> 0)",
    )


def log_ratios(logps: PairLogps, loss_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """r_w = l_w - l^ref_w and r_l = l_l - l^ref_l, each of shape [B], with the policy's graph.

    Raises ValueError when the batch carries no reference log-probs.
    """
    ref_chosen, ref_rejected = logps.ref_chosen, logps.ref_rejected
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(
            f"loss {loss_name!r} needs reference log-probs (ref_chosen and ref_rejected) but the "
            f"batch has none; it must be run with a reference model"
        )
    return logps.policy_chosen - ref_chosen, logps.policy_rejected - ref_rejected


def reward_output(losses: torch.Tensor, chosen_ratios: torch.Tensor,
                  rejected_ratios: torch.Tensor, beta: float,
                  metrics: dict[str, torch.Tensor] | None = None) -> LossOutput:
    """Wrap per-pair ``losses`` [B] (graph kept) with the detached implicit rewards
    beta*r_w and beta*r_l [B]. The ratios are the summed ones, whatever the loss normalised,
    so that ``rewards/*`` mean the same thing across losses."""
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_ratios).detach(),
        rejected_rewards=(beta * rejected_ratios).detach(),
        metrics=metrics or {},
    )


class RatioLoss(Loss):
    """A loss of the policy/reference log-ratios r_w and r_l whose rewards are the implicit
    beta * r (the DPO family and its relatives). A subclass sets ``name``, an ``Options`` with
    ``beta`` (``BetaOptions`` or a subclass; ``BetaOptions`` by default) and implements
    ``per_pair``; the ratios, the reference check and the rewards are done here."""

    requires_reference = True
    Options = BetaOptions

    options: BetaOptions

    @abstractmethod
    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        """The [B] per-pair losses of the log-ratios r_w, r_l [B] (graph kept), optionally
        with extra detached metrics; ``logps`` for what else a loss reads (token counts)."""

    def __call__(self, logps: PairLogps) -> LossOutput:
        r_w, r_l = log_ratios(logps, self.name)
        out = self.per_pair(r_w, r_l, logps)
        losses, metrics = out if isinstance(out, tuple) else (out, None)
        return reward_output(losses, r_w, r_l, self.options.beta, metrics)
