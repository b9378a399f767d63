"""APO: anchored preference optimisation, its two anchored variants (zero and down)."""

from __future__ import annotations

import torch

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import PerPair, RatioLoss


def apo_zero_loss(r_w: torch.Tensor, r_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair APO-zero loss (1 - sigma(beta r_w)) + sigma(beta r_l): raise the chosen and
    lower the rejected likelihood, each against the reference (the anchor at zero).

    Args:
        r_w: [B] chosen log-ratios; r_l: [B] rejected log-ratios.
        beta: inverse temperature, > 0.
    Returns:
        [B] losses, in (0, 2).
    """
    # D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7 (plus the constant 1, so that L >= 0).
    return (1 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)


def apo_down_loss(r_w: torch.Tensor, r_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair APO-down loss sigma(beta r_w) + (1 - sigma(beta (r_w - r_l))): lower the chosen
    likelihood, and the rejected one by more.

    Args:
        r_w: [B] chosen log-ratios; r_l: [B] rejected log-ratios.
        beta: inverse temperature, > 0.
    Returns:
        [B] losses, in (0, 2).
    """
    # D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8 (plus the constant 1, so that L >= 0).
    return torch.sigmoid(beta * r_w) + (1 - torch.sigmoid(beta * (r_w - r_l)))


class APOZeroLoss(RatioLoss):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored preference optimization and contrastive
    revisions", arXiv:2408.06266, Eq. 7): for data whose chosen completions are better than what
    the model already writes. The paper's loss is -sigma(beta r_w) + sigma(beta r_l); the
    constant 1 added here (as TRL does) changes no gradient and makes the value 1 at
    policy == reference. Same as TRL's ``loss_type="apo_zero"``."""

    name = "apo_zero"

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return apo_zero_loss(r_w, r_l, beta)


class APODownLoss(RatioLoss):
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8): for data whose chosen
    completions are worse than what the model already writes. The paper's loss is
    sigma(beta r_w) - sigma(beta (r_w - r_l)); plus the constant 1 as for APO-zero. Same as
    TRL's ``loss_type="apo_down"``."""

    name = "apo_down"

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return apo_down_loss(r_w, r_l, beta)


@hookimpl
def dpo_register_losses(register):
    register(APOZeroLoss)
    register(APODownLoss)
