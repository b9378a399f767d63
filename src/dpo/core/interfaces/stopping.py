"""The StoppingPolicy interface: observe metrics, decide whether the run goes on."""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dpo.core.interfaces.options import Configurable


@dataclass(frozen=True)
class Decision:
    """A policy's verdict. ``save=False`` asks the loop not to write a final checkpoint (e.g. the
    weights are not trustworthy), which leaves the last good checkpoint as the newest one.
    ``best=True`` (from ``on_eval``) says this evaluation is the best so far by the policy's
    measure: the loop keeps a copy of these weights in the run's ``best/`` directory.
    ``resumable=True`` (with ``stop``) pauses the run rather than ending it: the step is
    checkpointed as a normal ``checkpoint-N``, no ``final/`` is written, the run's status reads
    "paused by NAME: REASON", and ``--resume`` continues it (a pause at the last step is
    simply the run's end). ``warn`` is a line the run's reporter shows as a warning, whether or
    not the policy stops."""

    stop: bool = False
    reason: str = ""
    save: bool = True
    best: bool = False
    resumable: bool = False
    warn: str = ""


CONTINUE = Decision()


@dataclass(frozen=True)
class RunContext:
    """What a policy may know of its run before the first step (``StoppingPolicy.prepare``)."""

    objective: str = "dpo"  # "dpo" (preference pairs, a loss plugin) or "sft"
    holds_out: bool = False  # evaluations report ``eval/...`` metrics
    loss: str | None = None  # the loss plugin's name (None for sft)
    loss_options: dict[str, Any] = field(default_factory=dict)  # its resolved options (beta, ...)
    # processes: each has its own policies, which see the same (reduced) metrics; a stop or
    # pause that any process's policies decide is every process's (the loop makes it so)
    world_size: int = 1


class StoppingPolicy(Configurable, ABC):
    """A stopping policy plugin.

    The loop calls ``on_step`` after every optimizer step with that step's averaged metrics
    (``loss``, ``rewards/accuracies``, ``grad_norm``, ...) and ``on_eval`` after every evaluation
    with ``eval/...`` metrics. Any policy returning ``Decision(stop=True)`` ends the run.
    Policies that keep state implement ``state_dict``/``load_state_dict`` so that a resumed run
    decides exactly as an uninterrupted one. ``prepare`` is called once, before ``watches`` and
    before any state is loaded, with what the run is (``RunContext``): a policy that depends on
    it (held-out data or not, the loss's ``beta``) settles it there, and raises ``UsageError``
    for a run it cannot watch. See ``Decision`` for pausing a run (``resumable``) and warning.
    """

    kind: ClassVar[str] = "stopping policy"

    def prepare(self, run: RunContext) -> None:
        """Called once before training with what the run is; nothing by default."""

    def watches(self) -> list[str]:
        """Metric names this policy decides on. A name starting with ``eval/`` makes the run
        refuse to start without held-out data, and every name must be reported by the first
        evaluation (or step) or the run stops with a clear error."""
        return []

    def restores_best(self) -> bool:
        """Whether the run's final weights should be those of this policy's best evaluation."""
        return False

    def on_step(self, step: int, metrics: dict[str, float]) -> Decision:
        return CONTINUE

    def on_eval(self, step: int, metrics: dict[str, float]) -> Decision:
        return CONTINUE

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}")
