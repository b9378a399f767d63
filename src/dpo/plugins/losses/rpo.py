"""RPO: DPO plus the negative log-likelihood of the chosen completion (iterative reasoning
preference optimisation)."""

from __future__ import annotations

import torch
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import BetaOptions, PerPair, RatioLoss
from dpo.plugins.losses.dpo import dpo_loss


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token mean negative log-likelihood of the chosen completion, -l_w / n_w.

    Args:
        policy_chosen: [B] summed completion log-probs l_w (graph kept).
        chosen_tokens: [B] completion token counts n_w.
    Returns:
        [B] NLLs.
    """
    # A completion always holds at least its EOS; the clamp only guards a degenerate row.
    return -policy_chosen / chosen_tokens.clamp(min=1).to(policy_chosen.dtype)


def rpo_loss(h: torch.Tensor, nll: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """Per-pair RPO loss -log sigma(beta h) + alpha * NLL(y_w).

    Args:
        h: [B] log-ratio margins r_w - r_l.
        nll: [B] per-token mean NLL of the chosen completion (``chosen_nll``).
        beta: inverse temperature, > 0.
        alpha: weight of the NLL term, >= 0.
    Returns:
        [B] losses.
    """
    return dpo_loss(h, beta) + alpha * nll  # Pang et al. 2024, arXiv:2404.19733, the DPO+NLL loss


class RPOLoss(RatioLoss):
    """RPO (Pang et al. 2024, "Iterative reasoning preference optimization", arXiv:2404.19733):
    DPO plus alpha times the length-normalised NLL of the chosen completion, which keeps the
    chosen likelihood rising where DPO alone lets it fall. The paper writes
    NLL + alpha' * DPO with alpha' = 1; this is DPO + alpha * NLL (where earlier TRL versions'
    ``rpo_alpha`` put the weight), the same loss at the default alpha = 1 and for other values
    alpha = 1/alpha' up to an overall scale. The NLL is a mean over the chosen completion's
    tokens (prompt masked), per pair. TRL 1.16 spells RPO ``loss_type=["sigmoid", "sft"]`` with
    ``loss_weights=[1, alpha]``; its "sft" term is a token mean over the whole batch, so pairs
    with longer chosen completions weigh more there, and equally here.

    Metrics: ``nll_loss`` (the per-token NLL, under the name earlier TRL versions logged it) and
    ``dpo_loss`` (the DPO part)."""

    name = "rpo"

    class Options(BetaOptions):
        alpha: float = Field(
            1.0, ge=0, allow_inf_nan=False,
            description="weight of the chosen completion's per-token NLL added to the DPO loss "
                        "(>= 0; 0 is DPO; 1 as in the paper)",
        )

    options: Options

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        nll = chosen_nll(logps.policy_chosen, logps.chosen_tokens)
        losses = rpo_loss(r_w - r_l, nll, beta, self.options.alpha)
        metrics = {"nll_loss": nll.detach(), "dpo_loss": dpo_loss(r_w - r_l, beta).detach()}
        return losses, metrics


@hookimpl
def dpo_register_losses(register):
    register(RPOLoss)
