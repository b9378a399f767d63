"""SPPO: self-play preference optimisation, with hard (0/1) win probabilities."""

from __future__ import annotations

import torch

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import PerPair, RatioLoss


def sppo_hard_loss(r_w: torch.Tensor, r_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair hard SPPO loss (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2: each log-ratio is
    regressed onto eta (P - 1/2) with eta = 1/beta and win probability P = 1 for the chosen,
    0 for the rejected completion. Minimum 0 at r_w = 1/(2 beta), r_l = -1/(2 beta).

    Args:
        r_w: [B] chosen log-ratios l_w - l^ref_w (summed over tokens).
        r_l: [B] rejected log-ratios.
        beta: 1/eta, > 0.
    Returns:
        [B] losses.
    """
    target = 1 / (2 * beta)
    # Wu et al. 2024, arXiv:2405.00675, the SPPO objective (Algorithm 1) with P in {0, 1}.
    return (r_w - target) ** 2 + (r_l + target) ** 2


class SPPOHardLoss(RatioLoss):
    """SPPO with hard labels (Wu et al. 2024, "Self-play preference optimization for language
    model alignment", arXiv:2405.00675). The paper estimates the win probability P(y > pi_t)
    with a preference model (PairRM) over several samples per prompt; with a fixed preference
    pair it is 1 for the chosen and 0 for the rejected completion, which turns the objective
    into two squared errors on the log-ratios, as IPO is one on their difference. The paper's
    step size eta is 1/beta here, so that larger beta keeps the policy closer to the reference
    as for every other loss. Summed log-ratios, as in the paper. Same as TRL's
    ``loss_type="sppo_hard"``."""

    name = "sppo_hard"

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return sppo_hard_loss(r_w, r_l, beta)


@hookimpl
def dpo_register_losses(register):
    register(SPPOHardLoss)
