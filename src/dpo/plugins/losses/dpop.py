"""DPO-Positive (DPOP): DPO with a penalty for lowering the chosen completion's likelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import BetaOptions, PerPair, RatioLoss


def dpop_loss(r_w: torch.Tensor, r_l: torch.Tensor, beta: float, lam: float) -> torch.Tensor:
    """Per-pair DPOP loss -log sigma(beta [h - lam max(0, -r_w)]), h = r_w - r_l.

    max(0, -r_w) = max(0, l^ref_w - l_w) is how far the policy has pushed the chosen completion's
    log-prob below the reference's; while it is 0 the loss is DPO's.

    Args:
        r_w: [B] chosen log-ratios l_w - l^ref_w; r_l: [B] rejected log-ratios.
        beta: inverse temperature, > 0.
        lam: penalty weight lambda, >= 0 (0 gives DPO).
    Returns:
        [B] losses.
    """
    penalty = torch.relu(-r_w)
    # Pal et al. 2024, arXiv:2402.13228, the DPOP loss (Section 4).
    return -F.logsigmoid(beta * (r_w - r_l - lam * penalty))


class DPOPLoss(RatioLoss):
    """DPO-Positive (Pal et al. 2024, "Smaug: fixing failure modes of preference optimisation
    with DPO-Positive", arXiv:2402.13228). DPO can widen the margin while lowering the chosen
    completion's likelihood, notably on pairs that differ in a few tokens; DPOP subtracts
    lambda max(0, l^ref_w - l_w) from the margin inside the sigmoid, which both penalises that
    and multiplies the gradient on the chosen completion by 1 + lambda while it happens.

    The option is ``dpop_lambda``, not ``lambda``: ``lambda`` is a Python keyword (no field or
    keyword argument can take its name) and a ``-o`` key or config-file key ``dpop_lambda`` says
    which loss it belongs to. TRL 1.16 has no DPOP loss type."""

    name = "dpop"

    class Options(BetaOptions):
        dpop_lambda: float = Field(
            50.0, ge=0, allow_inf_nan=False,
            description="weight lambda of the penalty max(0, l^ref_w - l_w) inside DPO's "
                        "margin (>= 0; 0 is DPO; 50 as in the paper's experiments)",
        )

    options: Options

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        losses = dpop_loss(r_w, r_l, beta, self.options.dpop_lambda)
        # How far the chosen log-prob fell below the reference's (0 where it did not).
        return losses, {"dpop/penalty": torch.relu(-r_w).detach()}


@hookimpl
def dpo_register_losses(register):
    register(DPOPLoss)
