"""The Logger interface: send a run's metrics, tables and text to an experiment tracker.

``metrics.jsonl`` in the run directory is always written (by the run's ``Reporter``); a logger
sends the same records somewhere else as well (TensorBoard, Weights & Biases, MLflow, ...).
``--log-to`` (``log_to`` in a config file) picks loggers by their ``name``; plugin options come
as for any plugin (``-o wandb.project=NAME``).

Only the main process logs (rank 0 under torchrun). The run calls, in this order:

* ``start(run)`` once, before the first record: where the run is and where it starts from;
* ``log_metrics(step, metrics)`` for every record written to ``metrics.jsonl`` (an optimizer
  step's ``loss``, ``rewards/accuracies``, ``lr``, ``grad_norm``, ...; an evaluation's
  ``eval/...``), in the order written, the step also kept in the dict as ``"step"``;
* ``log_table(name, columns, rows, step)`` and ``log_text(name, text, step)`` whenever a feature
  reports a table (e.g. generated samples) or a text;
* ``finish(status)`` once at the end: ``"completed"``, ``"stopped"`` (by a stopping policy),
  ``"interrupted"`` (Ctrl-C, a signal) or ``"failed"`` (an error).

A logger that raises in any method is reported once (a warning naming it and the error) and
turned off; the run goes on without it.

Resuming (``dpo run --resume``) continues from the newest checkpoint, ``run.step``; the records
after it are reported again as the run redoes those steps. Earlier attempts reported records up
to ``run.logged_through``. A logger whose backend can drop what follows a step (TensorBoard's
``purge_step``) drops what came after ``run.step``; one that only appends (W&B, MLflow) skips
the records up to ``run.logged_through`` when it continues its own earlier run (the resumed
run recomputes them with the same values), so that no step is logged twice.
"""

from __future__ import annotations

import importlib
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.options import Configurable

# What a logger's ``finish`` is told.
STATUSES = ("completed", "stopped", "interrupted", "failed")


@dataclass(frozen=True)
class RunInfo:
    """What ``Logger.start`` is told about the run.

    ``output``: the run directory (a logger may keep its files and its state there, e.g. the
    tracker's run id for a resumed run to continue); ``config``: the resolved configuration as
    ``run.json`` records it (JSON types); ``step``: the step the run starts from (0, or the
    checkpoint's step when resuming); ``resumed``: whether ``--resume`` continues an earlier
    attempt; ``logged_through``: the last step the earlier attempts reported (0 for a new run)."""

    output: Path
    config: dict[str, Any]
    step: int = 0
    resumed: bool = False
    logged_through: int = 0


class Logger(Configurable, ABC):
    """A logger plugin (see the module docstring for when each method is called).

    Subclasses set ``name`` (what ``--log-to`` selects) and, where they need packages that a
    plain install lacks, ``requires`` (the modules they import) and ``extra`` (the dpo-trainer
    extra that installs them): a run that names the logger without them stops before anything
    is written, with ``pip install 'dpo-trainer[EXTRA]'``. Every method but ``start`` has a
    default that does nothing."""

    kind: ClassVar[str] = "logger"
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this logger cannot run here (a module of ``requires`` does not import), or None."""
        for module in cls.requires:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                package = module.split(".")[0]
                how = (f"pip install 'dpo-trainer[{cls.extra}]'" if cls.extra
                       else f"install {package}")
                why = "" if isinstance(exc, ModuleNotFoundError) else f" ({exc})"
                return f"logger {cls.name!r} needs {package}{why}: {how}"
        return None

    @classmethod
    def check(cls) -> None:
        """Raise a one-line UsageError when ``unavailable_reason`` gives one."""
        reason = cls.unavailable_reason()
        if reason:
            raise UsageError(reason)

    def start(self, run: RunInfo) -> None:
        """Open the tracker's run (or continue it, ``run.resumed``)."""

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """One record of ``metrics.jsonl``: numbers keyed by name (``eval/loss``, ...)."""

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  step: int) -> None:
        """A table: ``rows`` of values, one per column."""

    def log_text(self, name: str, text: str, step: int) -> None:
        """A text under ``name``."""

    def finish(self, status: str) -> None:
        """The run ended (``STATUSES``): flush and close."""


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a record (not ``step``, not booleans or strings), as floats."""
    return {key: float(value) for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
