"""CPO: Contrastive Preference Optimization, reference-free (Xu et al. 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.interfaces.options import PluginOptions
from dpo.plugins.losses._reference_free import mean_logps, policy_reward_output


def cpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_mean: torch.Tensor,
             beta: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair CPO loss -log sigma(beta l_w - beta l_l) + alpha (-l_w/n_w): DPO's sigmoid on
    the policy's own summed log-probs (the reference dropped: a uniform prior), plus the
    chosen completion's negative log-likelihood as a behaviour-cloning regulariser.

    Args:
        chosen: [B] summed log-probs l_w of the chosen completions.
        rejected: [B] summed log-probs l_l of the rejected completions.
        chosen_mean: [B] per-token mean log-probs l_w/n_w of the chosen completions.
        beta: inverse temperature of the preference term, > 0.
        alpha: weight of the NLL term, >= 0.
    Returns:
        ([B] losses, [B] preference terms, [B] NLL terms).
    """
    prefer = -F.logsigmoid(beta * (chosen - rejected))  # Xu et al. 2024, Eq. 3 (L_prefer)
    nll = -chosen_mean  # Eq. 6 (L_NLL), as a per-token mean
    return prefer + alpha * nll, prefer, nll


class CPOLoss(Loss):
    """CPO (Xu et al. 2024, arXiv:2401.08417): L = L_prefer + alpha L_NLL, Eqs. 3 and 6, with
    no reference model. L_prefer is DPO's loss with the reference replaced by a uniform prior,
    so its margin is beta (l_w - l_l) on summed log-probs; L_NLL keeps the policy close to the
    preferred data (the chosen completion's per-token mean NLL; the paper's alpha is 1).

    TRL's ``CPOTrainer`` (``loss_type="sigmoid"``, ``cpo_alpha``) takes its NLL as a token mean
    over the whole batch, so that longer chosen completions weigh more; here it is each pair's
    token mean, then the batch mean, like ``rpo`` and ``sft``. Rewards (``rewards/*``) are
    beta * l_w and beta * l_l: reference-free, as TRL's CPO logs them. Logged besides:
    ``nll_loss`` and ``cpo_loss`` (the preference term).
    """

    name = "cpo"
    requires_reference = False

    class Options(PluginOptions):
        beta: float = Field(
            0.1, gt=0, allow_inf_nan=False,
            description="inverse temperature of the preference term beta*(l_w - l_l) (> 0)",
        )
        alpha: float = Field(
            1.0, ge=0, allow_inf_nan=False,
            description="weight of the chosen completion's per-token NLL (>= 0; 0: the "
                        "preference term alone; TRL's cpo_alpha)",
        )

    options: Options

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen_mean, _ = mean_logps(logps)
        beta = self.options.beta
        losses, prefer, nll = cpo_loss(logps.policy_chosen, logps.policy_rejected, chosen_mean,
                                       beta, self.options.alpha)
        return policy_reward_output(losses, logps.policy_chosen, logps.policy_rejected, beta,
                                    {"nll_loss": nll.detach(), "cpo_loss": prefer.detach()})


@hookimpl
def dpo_register_losses(register):
    register(CPOLoss)
