"""An example dpo plugin: the hinge preference loss (RSO) and a ``dpo hinge-table`` command.

Installed, it is found through the ``dpo`` entry-point group (see pyproject.toml); nothing else
is needed. ``dpo run --loss example-hinge -o beta=0.1`` then trains with it.
"""

from __future__ import annotations

from typing import Annotated

import torch
import typer
from pydantic import Field

import dpo


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair hinge loss max(0, 1 - beta * h).

    Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization",
    arXiv:2309.06657 (the hinge variant of the RSO objective).

    Args:
        h: [B] log-ratio differences (r_w - r_l).
    Returns:
        [B] losses.
    """
    return torch.relu(1.0 - beta * h)


class HingeLoss(dpo.Loss):
    """Hinge loss on the policy/reference log-ratio difference (RSO)."""

    name = "example-hinge"
    requires_reference = True

    class Options(dpo.PluginOptions):
        beta: float = Field(0.1, gt=0, description="inverse margin: the loss is 0 once beta*h >= 1")

    def __call__(self, logps: dpo.PairLogps) -> dpo.LossOutput:
        if not logps.has_reference:
            raise ValueError("example-hinge needs reference log-probs")
        beta = self.options.beta
        r_w = logps.policy_chosen - logps.ref_chosen
        r_l = logps.policy_rejected - logps.ref_rejected
        return dpo.LossOutput(
            losses=hinge_loss(r_w - r_l, beta),
            chosen_rewards=(beta * r_w).detach(),
            rejected_rewards=(beta * r_l).detach(),
        )


@dpo.hookimpl
def dpo_register_losses(register):
    register(HingeLoss)


@dpo.hookimpl
def dpo_register_commands(app):
    @app.command("hinge-table", rich_help_panel="Plugins")
    def hinge_table(
        beta: Annotated[float, typer.Option(help="beta of the hinge loss")] = 0.1,
    ) -> None:
        """Print the example hinge loss at a few log-ratio differences."""
        h = torch.tensor([-10.0, 0.0, 5.0, 10.0, 20.0])
        for hi, loss in zip(h.tolist(), hinge_loss(h, beta).tolist()):
            typer.echo(f"h={hi:g} loss={loss:g}")
