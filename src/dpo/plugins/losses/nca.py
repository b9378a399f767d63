"""NCA: noise contrastive alignment, pairwise form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import PerPair, RatioLoss


def nca_pair_loss(r_w: torch.Tensor, r_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair NCA loss -log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l).

    Each completion is scored on its own (not through the margin): the chosen one is pulled up
    by the first term, and both are pushed down by half a term each, so the optimum keeps the
    chosen completion's likelihood up instead of only widening the gap.

    Args:
        r_w: [B] chosen log-ratios l_w - l^ref_w.
        r_l: [B] rejected log-ratios l_l - l^ref_l.
        beta: inverse temperature, > 0.
    Returns:
        [B] losses.
    """
    s_w, s_l = beta * r_w, beta * r_l
    # Chen et al. 2024, arXiv:2402.05369: the NCA loss with K = 2 and a hard label.
    return -F.logsigmoid(s_w) - 0.5 * F.logsigmoid(-s_w) - 0.5 * F.logsigmoid(-s_l)


class NCAPairLoss(RatioLoss):
    """NCA, pairwise (Chen et al. 2024, "Noise contrastive alignment of language models with
    explicit rewards", arXiv:2402.05369): an absolute-likelihood objective on each completion's
    implicit reward beta r, where DPO (the paper's InfoNCA in the pairwise case) only sees the
    margin. Same as TRL's ``loss_type="nca_pair"``; beta scales each log-ratio, as in the paper."""

    name = "nca"

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return nca_pair_loss(r_w, r_l, beta)


@hookimpl
def dpo_register_losses(register):
    register(NCAPairLoss)
