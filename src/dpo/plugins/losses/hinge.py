"""Hinge loss on the implicit-reward margin: SLiC's calibration loss as used by RSO."""

from __future__ import annotations

import torch

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.plugins.losses._common import BetaOptions, log_ratios, reward_output


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


class HingeLoss(Loss):
    """Hinge loss (Liu et al. 2023, "Statistical rejection sampling improves preference
    optimization" (RSO), arXiv:2309.06657; SLiC's calibration loss on the policy/reference
    log-ratios). Pairs whose margin already exceeds 1/beta contribute nothing. Same as TRL's
    ``loss_type="hinge"``. RSO's rejection-sampled data is a data-side step, not part of the
    loss."""

    name = "hinge"
    requires_reference = True

    class Options(BetaOptions):
        pass

    options: Options

    def __call__(self, logps: PairLogps) -> LossOutput:
        r_w, r_l = log_ratios(logps, self.name)
        beta = self.options.beta
        return reward_output(hinge_loss(r_w - r_l, beta), r_w, r_l, beta)


@hookimpl
def dpo_register_losses(register):
    register(HingeLoss)
