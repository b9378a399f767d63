"""What a run shows and records: console lines, a live progress bar, ``metrics.jsonl`` and the
closing summary table. Only the main process reports."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

METRICS_FILE = "metrics.jsonl"

# The columns of the closing summary, in this order, when present.
SUMMARY_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (a resumed run rewrites them), atomically."""
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


class Reporter:
    """Console, progress bar and metrics file for one run."""

    def __init__(self, output: Path, *, enabled: bool = True, progress: bool = True,
                 console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.metrics_path = output / METRICS_FILE
        self._file = None
        self._progress: Progress | None = None
        self._task = None
        self._show_progress = progress and enabled

    # lifecycle ---------------------------------------------------------------------------
    def start(self, total_steps: int, done: int) -> None:
        if not self.enabled:
            return
        self._file = self.metrics_path.open("a")
        if self._show_progress:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=done, status="")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._file is not None:
            self._file.close()
            self._file = None

    @contextmanager
    def task(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar for a pass before training (e.g. scoring pairs with the reference);
        yields ``advance(n)``."""
        if not self._show_progress or total <= 0:
            yield lambda n: None
            return
        bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=self.console, transient=True)
        task = bar.add_task(label, total=total)
        with bar:
            yield lambda n: bar.advance(task, n)

    # events ------------------------------------------------------------------------------
    # Messages are text: brackets in them (paths, ``dpo-trainer[gguf]``) are not rich markup.
    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(escape(message), highlight=False)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    def record(self, record: dict[str, Any]) -> None:
        """Append one record (a step or an evaluation) to metrics.jsonl, flushed at once so a
        crash loses nothing already reported."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        if self._progress is not None:
            status = (f"loss {_fmt(metrics.get('loss'))}  "
                      f"acc {_fmt(metrics.get('rewards/accuracies'))}  "
                      f"margin {_fmt(metrics.get('rewards/margins'))}")
            self._progress.update(self._task, completed=step, status=status)

    def summary(self, title: str, train: dict[str, Any] | None, evaluation: dict[str, Any] | None,
                before: dict[str, Any] | None = None, eval_label: str = "eval") -> None:
        """The closing table: the last step's training metrics, then the held-out metrics
        before training (step 0) and at the end, side by side."""
        if not self.enabled:
            return
        table = Table(title=title)
        table.add_column("metric")
        columns = [("train (last step)", train or {}),
                   ("eval (step 0)", {k[5:]: v for k, v in (before or {}).items()}),
                   (eval_label, {k[5:]: v for k, v in (evaluation or {}).items()})]
        columns = [(name, values) for name, values in columns if values]
        for name, _ in columns:
            table.add_column(name, justify="right")
        for key in SUMMARY_KEYS:
            if any(key in values for _, values in columns):
                table.add_row(key, *(_fmt(values.get(key, "")) for _, values in columns))
        self.console.print(table)
