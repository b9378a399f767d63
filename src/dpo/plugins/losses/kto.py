"""KTO: Kahneman-Tversky Optimisation on unpaired data (Ethayarajh et al. 2024)."""

from __future__ import annotations

import torch
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import Loss, LossOutput, UnpairedLogps
from dpo.plugins.losses._common import BetaOptions


def kto_loss(ratios: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> torch.Tensor:
    """Per-example KTO loss lambda_y - v(x, y).

    With the reference point z_ref = max(0, kl) (detached: no gradient flows through it),
    v = lambda_D sigma(beta (r - z_ref)) for a desirable example and
    v = lambda_U sigma(beta (z_ref - r)) for an undesirable one.

    Args:
        ratios: [B] log-ratios r = log pi(y|x) - log pi_ref(y|x) (summed log-probs), with graph.
        labels: [B] bool, True for a desirable example.
        kl: [] the KL estimate from mismatched pairs (clamped at 0 here).
        beta: > 0; desirable_weight, undesirable_weight: lambda_D, lambda_U > 0.
    Returns:
        [B] losses, each in [0, lambda_y].
    """
    # The reference point z_0 of the paper, max(0, KL estimate); a constant for the gradient.
    z_ref = kl.detach().clamp(min=0).to(ratios.dtype)
    labels = labels.to(device=ratios.device, dtype=torch.bool)
    weight = torch.where(labels, torch.full_like(ratios, desirable_weight),
                         torch.full_like(ratios, undesirable_weight))
    # Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7-8: L = E[lambda_y - v(x, y)].
    value = weight * torch.sigmoid(beta * torch.where(labels, ratios - z_ref, z_ref - ratios))
    return weight - value


class KTOLoss(Loss):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7-8) over unpaired examples, each a
    prompt and one completion labelled desirable or undesirable.

    The reference point z_ref is the policy-to-reference KL estimated on mismatched pairs (each
    prompt with another example's completion, within the micro-batch), averaged over every
    process, detached and clamped at 0. Rewards (``rewards/chosen`` on the desirable examples,
    ``rewards/rejected`` on the undesirable ones) are beta times the summed log-ratios; ``kl`` is
    z_ref.
    """

    name = "kto"
    requires_reference = True
    examples = "unpaired"

    class Options(BetaOptions):
        beta: float = Field(
            0.1, gt=0, allow_inf_nan=False,
            description="inverse temperature of the value function sigma(beta (r - z_ref)); "
                        "larger keeps the policy closer to the reference (> 0)",
        )
        desirable_weight: float = Field(
            1.0, gt=0, allow_inf_nan=False,
            description="lambda_D, the weight of desirable examples (> 0); with unbalanced "
                        "data the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]",
        )
        undesirable_weight: float = Field(
            1.0, gt=0, allow_inf_nan=False,
            description="lambda_U, the weight of undesirable examples (> 0)",
        )

    options: Options

    def __call__(self, logps: UnpairedLogps) -> LossOutput:  # type: ignore[override]
        if logps.reference is None:
            raise ValueError(f"loss {self.name!r} needs reference log-probs but the batch has "
                             "none; it must be run with a reference model")
        o = self.options
        ratios = logps.policy - logps.reference
        losses = kto_loss(ratios, logps.labels, logps.kl, o.beta, o.desirable_weight,
                          o.undesirable_weight)
        rewards = (o.beta * ratios).detach()
        return LossOutput(losses=losses, chosen_rewards=rewards, rejected_rewards=rewards,
                          metrics={"kl": logps.kl.detach().clamp(min=0).float()})


@hookimpl
def dpo_register_losses(register):
    register(KTOLoss)
