"""ORPO: Odds Ratio Preference Optimization, reference-free (Hong et al. 2024)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.interfaces.options import PluginOptions
from dpo.plugins.losses._reference_free import mean_logps, policy_reward_output

_LN_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, shape kept, accurate on both sides of x = -ln 2: log1p(-exp(x))
    where exp(x) is small, log(-expm1(x)) near 0 where 1 - exp(x) would cancel (Maechler 2012,
    "Accurately computing log(1 - exp(-|a|))")."""
    # Each branch is evaluated on a value that keeps it finite, so that the unused one puts
    # no nan into the gradient of the other.
    far = torch.clamp(x, max=_LN_HALF)
    near = torch.clamp(x, min=_LN_HALF)
    return torch.where(x < _LN_HALF, torch.log1p(-torch.exp(far)), torch.log(-torch.expm1(near)))


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log odds(y) = log(P / (1 - P)) with P = exp(l/n), the per-token mean probability.

    Args:
        mean_logp: [B] per-token mean log-probs l/n (<= 0).
    Returns:
        [B] log odds, finite for every finite input: at l/n = 0 (P = 1, infinite odds) the
        input is taken as the largest float below 0 (about -1e-38 in float32, odds ~ e^87).
    """
    tiny = torch.finfo(mean_logp.dtype).tiny
    x = mean_logp.clamp(max=-tiny)
    return x - log1mexp(x)  # Hong et al. 2024, arXiv:2403.07691, Eq. 4


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair ORPO loss NLL(y_w) - lambda log sigma(log odds(y_w) - log odds(y_l)).

    Args:
        chosen: [B] per-token mean log-probs l_w/n_w (NLL(y_w) = -l_w/n_w).
        rejected: [B] per-token mean log-probs l_l/n_l.
        lam: weight lambda of the odds-ratio term, > 0.
    Returns:
        [B] losses, and the parts (detached, [B]) under TRL's names: ``nll_loss``,
        ``log_odds_ratio`` = log sigma(log odds ratio) and ``log_odds_chosen`` = the log odds
        ratio log odds(y_w) - log odds(y_l).
    """
    nll = -chosen  # Hong et al. 2024, Eq. 2 (L_SFT), per token
    ratio = log_odds(chosen) - log_odds(rejected)
    log_sigma = F.logsigmoid(ratio)  # Eq. 7 (L_OR = -log sigma(log OR))
    losses = nll - lam * log_sigma  # Eq. 6
    parts = {"nll_loss": nll.detach(), "log_odds_ratio": log_sigma.detach(),
             "log_odds_chosen": ratio.detach()}
    return losses, parts


class ORPOLoss(Loss):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 2-7): supervised fine-tuning on the chosen
    completion plus lambda times an odds-ratio penalty on the rejected one, in one stage and
    with no reference model. Odds come from the per-token mean probability
    P = exp(l/n): odds = P / (1 - P), computed in log space (``log1mexp``).

    The option is named ``beta``, as TRL's ORPOConfig names the paper's lambda. The NLL is the
    chosen completion's per-token mean, completion tokens only (TRL's ORPOTrainer also counts
    the prompt's tokens in it). Rewards (``rewards/*``) are beta * l_w/n_w and beta * l_l/n_l
    (reference-free, as TRL logs them). Extra metrics: ``nll_loss``, ``log_odds_ratio``,
    ``log_odds_chosen`` (see ``orpo_loss``).
    """

    name = "orpo"
    requires_reference = False

    class Options(PluginOptions):
        beta: float = Field(
            0.1, gt=0, allow_inf_nan=False,
            description="lambda of the paper: weight of the odds-ratio term beside the chosen "
                        "completion's NLL (> 0; TRL's name and default)",
        )

    options: Options

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen, rejected = mean_logps(logps)
        beta = self.options.beta
        losses, parts = orpo_loss(chosen, rejected, beta)
        return policy_reward_output(losses, chosen, rejected, beta, parts)


@hookimpl
def dpo_register_losses(register):
    register(ORPOLoss)
