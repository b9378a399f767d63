"""What the reference-free losses share: per-token mean log-probs and the rewards they log."""

from __future__ import annotations

import torch

from dpo.core.interfaces.loss import LossOutput, PairLogps


def mean_logps(logps: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """l_w/n_w and l_l/n_l, each of shape [B], with the policy's graph: the completions'
    per-token mean log-probs (the log of the geometric mean of their token probabilities)."""
    # A completion always holds at least its EOS; the clamp only guards a degenerate row.
    chosen = logps.policy_chosen / logps.chosen_tokens.clamp(min=1).to(logps.policy_chosen.dtype)
    rejected = (logps.policy_rejected
                / logps.rejected_tokens.clamp(min=1).to(logps.policy_rejected.dtype))
    return chosen, rejected


def policy_reward_output(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                         beta: float, metrics: dict[str, torch.Tensor] | None = None
                         ) -> LossOutput:
    """Wrap per-pair ``losses`` [B] (graph kept) with the detached rewards of a reference-free
    loss: beta times the policy's own (per-token mean) log-probs ``chosen`` and ``rejected``
    [B], as TRL's CPO, SimPO and ORPO trainers log them. There is no reference to compare
    with, so ``rewards/*`` are not log-ratios here and do not start at 0."""
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        metrics=metrics or {},
    )
