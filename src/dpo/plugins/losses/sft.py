"""SFT on preference pairs: the chosen completion's negative log-likelihood as a pair loss."""

from __future__ import annotations

import torch

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import Loss, LossOutput, PairLogps
from dpo.core.interfaces.options import PluginOptions
from dpo.plugins.losses._reference_free import mean_logps, policy_reward_output


def sft_loss(chosen: torch.Tensor) -> torch.Tensor:
    """Per-pair SFT loss -l_w/n_w: the chosen completion's negative log-likelihood per token.

    Args:
        chosen: [B] per-token mean log-probs l_w/n_w of the chosen completions.
    Returns:
        [B] losses.
    """
    return -chosen


class SFTLoss(Loss):
    """Supervised fine-tuning as a loss on pairs: the NLL of the chosen completion, per-token mean;
    the rejected completion is scored but not trained on. No reference model.

    A pair counts once whatever its length (the mean of per-pair token means, like every
    ``dpo run`` loss); ``dpo sft`` instead takes the token mean over the whole step, as does
    TRL's DPOTrainer ``loss_type="sft"`` over its batch. Rewards (``rewards/*``) are the
    per-token mean log-probs l_w/n_w and l_l/n_l themselves (beta = 1), so
    ``rewards/accuracies`` says how often the chosen completion is the more likely per token.
    """

    name = "sft"
    requires_reference = False

    class Options(PluginOptions):
        pass

    options: Options

    def __call__(self, logps: PairLogps) -> LossOutput:
        chosen, rejected = mean_logps(logps)
        return policy_reward_output(sft_loss(chosen), chosen, rejected, 1.0)


@hookimpl
def dpo_register_losses(register):
    register(SFTLoss)
