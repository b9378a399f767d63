"""SimPO: Simple Preference Optimization, reference-free (Meng et al. 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.interfaces.options import PluginOptions
from dpo.plugins.losses._reference_free import mean_logps, policy_reward_output


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float,
               gamma: float) -> torch.Tensor:
    """Per-pair SimPO loss -log sigma(beta l_w/n_w - beta l_l/n_l - gamma).

    Args:
        chosen: [B] per-token mean log-probs l_w/n_w of the chosen completions.
        rejected: [B] per-token mean log-probs l_l/n_l of the rejected completions.
        beta: reward scale, > 0.
        gamma: target reward margin, >= 0.
    Returns:
        [B] losses.
    """
    # log sigma(z) = -softplus(-z): finite for any z.
    return -F.logsigmoid(beta * chosen - beta * rejected - gamma)  # Meng et al. 2024, Eq. 6


class SimPOLoss(Loss):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): the reward of a completion is beta
    times its per-token mean log-prob under the policy, with no reference model; the loss asks
    the chosen reward to beat the rejected one by a margin gamma.

    ``gamma`` is the margin itself, in reward units. The paper's code sets it as a ratio
    gamma/beta (``gamma_beta_ratio``, default 0.25 with beta 2.0, so gamma = 0.5); TRL's
    ``CPOTrainer`` with ``loss_type="simpo"`` takes it absolute (``simpo_gamma``, default 0.5).
    Both defaults are the margin 0.5 used here. Rewards (``rewards/*``) are beta * l_w/n_w and
    beta * l_l/n_l: reference-free, so they are negative and do not start at 0.
    """

    name = "simpo"
    requires_reference = False

    class Options(PluginOptions):
        beta: float = Field(
            2.0, gt=0, allow_inf_nan=False,
            description="reward scale: the reward is beta times the per-token mean log-prob "
                        "(> 0; the paper's default 2.0)",
        )
        gamma: float = Field(
            0.5, ge=0, allow_inf_nan=False,
            description="target reward margin, absolute (>= 0; 0.5: the paper code's "
                        "gamma/beta = 0.25 at beta 2, and TRL's simpo_gamma)",
        )

    options: Options

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen, rejected = mean_logps(logps)
        beta = self.options.beta
        return policy_reward_output(simpo_loss(chosen, rejected, beta, self.options.gamma),
                                    chosen, rejected, beta)


@hookimpl
def dpo_register_losses(register):
    register(SimPOLoss)
