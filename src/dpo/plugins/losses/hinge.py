"""Hinge loss on the implicit-reward margin: SLiC's calibration loss as used by RSO."""

from __future__ import annotations

import torch

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import PerPair, RatioLoss


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair hinge loss max(0, 1 - beta h): zero, and so without gradient, once the scaled
    margin beta h reaches 1.

    Args:
        h: [B] log-ratio margins r_w - r_l.
        beta: the paper's gamma, > 0 (the margin asked for is 1/beta in log-ratio units).
    Returns:
        [B] losses.
    """
    return torch.relu(1 - beta * h)  # Liu et al. 2023, arXiv:2309.06657, the hinge loss of RSO


class HingeLoss(RatioLoss):
    """Hinge loss (Liu et al. 2023, "Statistical rejection sampling improves preference
    optimization" (RSO), arXiv:2309.06657; SLiC's calibration loss on the policy/reference
    log-ratios). Pairs whose margin already exceeds 1/beta contribute nothing. Same as TRL's
    ``loss_type="hinge"``. RSO's rejection-sampled data is a data-side step, not part of the
    loss."""

    name = "hinge"

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return hinge_loss(r_w - r_l, beta)


@hookimpl
def dpo_register_losses(register):
    register(HingeLoss)
