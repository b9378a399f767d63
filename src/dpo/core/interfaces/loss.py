"""The Loss interface: a preference loss over per-pair summed log-probabilities.

The math lives in pure functions with shapes in their docstrings and the paper's equation cited
(see the built-ins under ``dpo.plugins.losses``). A ``Loss`` wraps one such function with its
typed options.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dpo.core.interfaces.options import Configurable


@dataclass
class PairLogps:
    """Per-pair inputs of a preference loss. Every tensor has shape [B] (B pairs).

    ``policy_*`` are log-probabilities of the completion under the policy, summed over
    completion tokens only (prompt masked, the appended EOS counted), in float32.
    ``ref_*`` are the same under the reference model; ``None`` when the loss is reference-free.
    ``*_tokens`` are the completion token counts n_w and n_l (for length normalisation).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None


@dataclass
class UnpairedLogps:
    """Per-example inputs of a loss over unpaired data (``Loss.examples == "unpaired"``, e.g.
    KTO). Tensors have shape [B] (B examples) unless said otherwise.

    ``policy`` and ``reference`` are the completion's summed log-probabilities under the policy
    (with graph) and the reference (``None`` for a reference-free loss); ``tokens`` the
    completion token counts; ``labels`` is True for a desirable example, False for an
    undesirable one. ``kl`` is a detached scalar: the mean over the step's mismatched rows (a
    prompt with another example's completion) of policy minus reference summed log-probs,
    averaged over every process; 0 when there were no mismatched rows.
    """

    policy: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor
    kl: torch.Tensor
    reference: torch.Tensor | None = None

    @property
    def has_reference(self) -> bool:
        return self.reference is not None


@dataclass
class LossOutput:
    """What a loss returns. ``losses``, ``chosen_rewards`` and ``rejected_rewards`` have shape [B].

    ``losses`` carries the graph; rewards are detached. ``metrics`` holds extra detached values,
    each of shape [B] or a scalar, logged under the given name (averaged per optimizer step).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        """The batch loss: the mean of the per-pair losses."""
        return self.losses.mean()


class Loss(Configurable, ABC):
    """A preference loss plugin.

    Subclasses set ``name`` (the ``--loss`` value), ``requires_reference`` and a nested
    ``Options`` model (a :class:`dpo.core.interfaces.options.PluginOptions`), and implement ``__call__``.

    ``examples`` says what the loss trains on: ``"pairs"`` (the default: preference pairs, and
    ``__call__`` gets a ``PairLogps``) or ``"unpaired"`` (single completions labelled desirable
    or not, and ``__call__`` gets an ``UnpairedLogps``; its ``LossOutput`` then has per-example
    ``losses``, and ``chosen_rewards`` / ``rejected_rewards`` hold every example's reward, read
    on the desirable / undesirable examples respectively).
    """

    kind: ClassVar[str] = "loss"
    requires_reference: ClassVar[bool] = True
    examples: ClassVar[str] = "pairs"

    @classmethod
    def registration_problem(cls) -> str | None:
        """Why this class cannot be registered as a loss (``None``: it can)."""
        if cls.examples not in ("pairs", "unpaired"):
            return f"examples must be 'pairs' or 'unpaired', got {cls.examples!r}"
        if "+" in cls.name:  # "+" joins the names of losses trained together (dpo+sft)
            return f"its name {cls.name!r} holds '+', which joins combined losses; rename it"
        return None

    @abstractmethod
    def __call__(self, logps: PairLogps) -> LossOutput:
        """Per-pair (or, for an unpaired loss, per-example) losses and rewards for one
        micro-batch."""

    # Losses with state (e.g. a running mean of the rewards), mirroring ``StoppingPolicy``:
    # the loop calls ``on_step`` after every optimizer step with that step's averaged metrics
    # (the dict stopping policies get: averaged over micro-batches and processes, so the same
    # on every process; read it, do not change it), never after an evaluation; the state goes
    # into each checkpoint, so that a resumed run computes the same losses.

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based), with its averaged metrics."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for checkpoints; none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}")
