"""EXO: efficient exact optimisation of the alignment objective, pairwise form."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import BetaOptions, PerPair, RatioLoss


def exo_pair_loss(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Per-pair EXO loss KL(Bern(q) || Bern(1-eps)) with q = sigma(beta h):
    q [log q - log(1-eps)] + (1-q) [log(1-q) - log eps].

    The policy's distribution over {chosen, rejected} is softmax(beta r_w, beta r_l) =
    (sigma(beta h), sigma(-beta h)); the target puts 1-eps on the chosen completion. Zero, with
    zero gradient, at sigma(beta h) = 1 - eps (a finite margin, unlike DPO's).

    Args:
        h: [B] log-ratio margins r_w - r_l.
        beta: the policy's inverse temperature beta_pi, > 0.
        eps: label smoothing of the target, in (0, 0.5).
    Returns:
        [B] losses.
    """
    z = beta * h
    # log q and log(1-q) from logsigmoid: finite where sigmoid would round to 0 or 1.
    log_q, log_1mq = F.logsigmoid(z), F.logsigmoid(-z)
    # Ji et al. 2024, arXiv:2402.00856, Eq. 16 with K = 2 completions.
    return (torch.sigmoid(z) * (log_q - math.log1p(-eps))
            + torch.sigmoid(-z) * (log_1mq - math.log(eps)))


class ExoPairLoss(RatioLoss):
    """EXO, pairwise (Ji et al. 2024, "Towards efficient exact optimization of language model
    alignment", arXiv:2402.00856, Eq. 16): the reverse KL from the policy's implicit preference
    sigma(beta h) to the label, smoothed to 1 - eps. Reverse KL is mode-seeking where DPO's
    forward KL is mean-seeking. Same as TRL's ``loss_type="exo_pair"`` with
    ``label_smoothing=eps`` (TRL refuses eps = 0 there; here eps = 1e-3, the paper's value, is
    the default). The paper's second temperature beta_r only sets the target's sharpness, which
    for binary labels is the smoothing eps."""

    name = "exo"

    class Options(BetaOptions):
        eps: float = Field(
            1e-3, gt=0, lt=0.5,
            description="label smoothing: the target puts 1 - eps on the chosen completion, in "
                        "(0, 0.5); the loss is 0 at sigma(beta h) = 1 - eps",
        )

    options: Options

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        return exo_pair_loss(r_w - r_l, beta, self.options.eps)


@hookimpl
def dpo_register_losses(register):
    register(ExoPairLoss)
