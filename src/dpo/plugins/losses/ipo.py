"""IPO: Identity Preference Optimisation (Azar et al. 2023)."""

from __future__ import annotations

import torch
from pydantic import Field

from dpo.core.interfaces.hookspecs import hookimpl
from dpo.core.interfaces.loss import PairLogps
from dpo.plugins.losses._common import BetaOptions, PerPair, RatioLoss


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss (h - 1/(2 beta))^2, a regression of the margin onto 1/(2 beta).

    Args:
        h: [B] log-ratio margins r_w - r_l (length-normalised or not, as the caller chose).
        beta: the regularisation tau of the paper, > 0.
    Returns:
        [B] losses.
    """
    return (h - 1 / (2 * beta)) ** 2  # Azar et al. 2023, arXiv:2310.12036, Eq. 17


class IPOLoss(RatioLoss):
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17).

    Implementations disagree on h. With ``length_normalize=true`` (the default) each log-ratio is
    divided by its completion token count first, h = r_w/n_w - r_l/n_l, as TRL does and states
    was confirmed with the IPO authors; this keeps the target 1/(2 beta) on a per-token scale
    whatever the completion lengths. With ``false``, h = r_w - r_l on summed log-probs, as in the
    original DPO reference code. Rewards are beta times the summed log-ratios in both modes.
    """

    name = "ipo"

    class Options(BetaOptions):
        beta: float = Field(
            0.1, gt=0, allow_inf_nan=False,
            description="regularisation tau: the margin h is pulled to 1/(2 beta) (> 0)",
        )
        length_normalize: bool = Field(
            True,
            description="divide each log-ratio by its completion token count before the margin "
                        "(default true: TRL's reading, confirmed with the IPO authors); false "
                        "uses summed log-probs as the original DPO reference code",
        )

    options: Options

    def per_pair(self, r_w: torch.Tensor, r_l: torch.Tensor, logps: PairLogps) -> PerPair:
        beta = self.options.beta
        if self.options.length_normalize:
            # A completion always holds at least its EOS; the clamp only guards a degenerate row.
            h = (r_w / logps.chosen_tokens.clamp(min=1).to(r_w.dtype)
                 - r_l / logps.rejected_tokens.clamp(min=1).to(r_l.dtype))
        else:
            h = r_w - r_l
        return ipo_loss(h, beta)


@hookimpl
def dpo_register_losses(register):
    register(IPOLoss)
