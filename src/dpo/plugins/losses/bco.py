"""BCO pair: Binary Classifier Optimization on preference pairs (Jung et al. 2024)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import PerPair, RatioLoss

DELTA = "bco/delta"  # the shift the step's losses used
REWARDS = "bco/rewards"  # the step's mean reward (beta r_w + beta r_l) / 2, what delta averages


def bco_pair_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                  delta: float) -> torch.Tensor:
    """Per-pair BCO loss -log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta)): a
    binary classifier whose logit is the implicit reward shifted by delta, the chosen side
    labelled 1 and the rejected side 0.

    Args:
        chosen_rewards: [B] beta * r_w.
        rejected_rewards: [B] beta * r_l.
        delta: the reward shift (a running mean of past rewards).
    Returns:
        [B] losses.
    """
    # Jung et al. 2024, arXiv:2404.04656: the BCO loss with its reward shift delta.
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


class BCOLoss(RatioLoss):
    """BCO pair (Jung et al. 2024, arXiv:2404.04656): -log sigma(beta r_w - delta)
    - log sigma(-(beta r_l - delta)), with delta the running mean of the rewards.

    delta is the mean, over the optimizer steps done so far, of each step's mean reward
    (beta r_w + beta r_l) / 2 (``bco/rewards``, averaged over the step's pairs, micro-batches
    and processes: the metrics every step reports). It starts at 0, moves only after an
    optimizer step (``on_step``; evaluations use it and leave it), is the same on every process
    and for any split into micro-batches, and is checkpointed, so a resumed run computes the
    same losses. A step whose mean reward is not finite (an update the loop skipped) leaves it
    as it was. Each step's loss uses the mean of the steps *before* it: a difference on purpose
    from TRL's DPOTrainer ``bco_pair`` of the 0.x releases, which adds the current batch's
    mean reward to its running mean before using it (there, delta depends on the batch it
    shifts and on how a step is split). TRL 1.16's ``bco_pair`` keeps no running mean at all
    (delta = 0). Each step counts once, as TRL's per-batch update does; with equal steps this
    is also the mean over all rewards. Logged: ``bco/delta`` (the shift the step used) and
    ``bco/rewards`` (what the next delta averages in; inside a combination it is this loss's
    own, whatever beta the other parts use).
    """

    name = "bco"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.total, self.steps = 0.0, 0  # the sum of the steps' mean rewards, and their count

    @property
    def delta(self) -> float:
        return self.total / self.steps if self.steps else 0.0

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta, delta = self.options.beta, self.delta
        chosen, rejected = beta * r_w, beta * r_l
        metrics = {DELTA: torch.full_like(r_w, delta).detach(),
                   REWARDS: ((chosen + rejected) / 2).detach()}
        return bco_pair_loss(chosen, rejected, delta), metrics

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        reward = metrics.get(REWARDS, math.nan)
        if math.isfinite(reward):
            self.total, self.steps = self.total + reward, self.steps + 1

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.steps = float(state.get("total", 0.0)), int(state.get("steps", 0))


@hookimpl
def dpo_register_losses(register):
    register(BCOLoss)
