"""The DPO family: DPO's sigmoid loss, conservative DPO (label smoothing) and robust DPO
(an unbiased loss under label noise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import BetaOptions, PerPair, RatioLoss


def dpo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss -log sigma(beta h).

    Args:
        h: [B] log-ratio margins r_w - r_l.
        beta: inverse temperature, > 0.
    Returns:
        [B] losses.
    """
    # log sigma(z) = -softplus(-z): finite for any z, unlike log(sigmoid(z)).
    return -F.logsigmoid(beta * h)  # Rafailov et al. 2023, arXiv:2305.18290, Eq. 7


def cdpo_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Per-pair conservative DPO loss -(1-eps) log sigma(beta h) - eps log sigma(-beta h):
    DPO trained on labels assumed flipped with probability eps.

    Args:
        h: [B] log-ratio margins r_w - r_l.
        beta: inverse temperature, > 0.
        eps: label-noise rate in (0, 0.5).
    Returns:
        [B] losses.
    """
    z = beta * h
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)  # Mitchell 2023, Eq. 3


def robust_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Per-pair robust DPO loss [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps),
    i.e. [(1-eps) L_DPO(w, l) - eps L_DPO(l, w)] / (1 - 2 eps): an unbiased estimate of the clean
    DPO loss when each label is flipped with probability eps. It can be negative.

    Args:
        h: [B] log-ratio margins r_w - r_l.
        beta: inverse temperature, > 0.
        eps: label-flip rate in (0, 0.5).
    Returns:
        [B] losses.
    """
    z = beta * h
    # Chowdhury et al. 2024, arXiv:2403.00409: the unbiased (rDPO) loss.
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


class DPOLoss(RatioLoss):
    """Direct Preference Optimization, the "sigmoid" loss (Rafailov et al. 2023, Eq. 7)."""

    name = "dpo"

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return dpo_loss(r_w - r_l, beta)


class ConservativeDPOLoss(RatioLoss):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences", Eq. 3): DPO with
    label smoothing eps. Its gradient vanishes at sigma(beta h) = 1 - eps, so the margin stops
    growing there instead of being pushed to infinity."""

    name = "cdpo"

    class Options(BetaOptions):
        eps: float = Field(
            0.1, gt=0, lt=0.5,
            description="assumed probability that a preference label is flipped, in (0, 0.5); "
                        "the loss drives sigma(beta h) towards 1 - eps",
        )

    options: Options

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return cdpo_loss(r_w - r_l, beta, self.options.eps)


class RobustDPOLoss(RatioLoss):
    """Robust DPO (Chowdhury et al. 2024, "Provably robust DPO", arXiv:2403.00409): the DPO loss
    debiased for labels flipped with known probability eps. Unlike cDPO, which moves the optimum
    to sigma(beta h) = 1 - eps, its expectation over noisy labels is the clean DPO loss, so its
    gradient keeps pushing the margin up; the price is a loss that can be negative (a large
    margin is rewarded by the -eps L_DPO(l, w) term). Same as TRL's ``loss_type="robust"``
    with ``label_smoothing=eps``."""

    name = "robust"

    class Options(BetaOptions):
        eps: float = Field(
            0.1, gt=0, lt=0.5,
            description="assumed probability that a preference label is flipped, in (0, 0.5); "
                        "the loss is divided by 1 - 2 eps",
        )

    options: Options

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return robust_loss(r_w - r_l, beta, self.options.eps)


@hookimpl
def dpo_register_losses(register):
    register(DPOLoss)
    register(ConservativeDPOLoss)
    register(RobustDPOLoss)
