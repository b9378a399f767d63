"""What a run shows and records: console lines, a live progress bar, ``metrics.jsonl`` and the
closing summary table. Only the main process reports."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dpo.core.interfaces.errors import DataError, DpoError, UsageError
from dpo.core.interfaces.logger import Logger, RunInfo
from dpo.core.training.layout import METRICS_FILE
from dpo.core.training.loggers import Loggers


# The columns of the closing summary, in this order, when present.
SUMMARY_KEYS = (
    "loss",
    "perplexity",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


# Without a terminal (a log file, a pipe, a batch job, CI) progress is a plain line at most every
# this many seconds, the first and the last always; the environment variable sets another.
PROGRESS_INTERVAL_ENV = "DPO_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 30.0
# Without a terminal nothing is wrapped (a path split mid-name in a log is unusable): text is
# soft-wrapped, and tables get a width no line of theirs reaches.
UNWRAPPED_WIDTH = 10_000


def log_console(stderr: bool = True) -> Console:
    """A console for a run's messages: rich as usual on a terminal; elsewhere one line per
    message, whatever ``COLUMNS`` says, so that a log can be searched and its paths copied."""
    console = Console(stderr=stderr)
    if console.is_interactive:
        return console
    return Console(stderr=stderr, soft_wrap=True, width=UNWRAPPED_WIDTH)


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$DPO_PROGRESS_INTERVAL`` or the default."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"{PROGRESS_INTERVAL_ENV}={raw}: not a number of seconds (>= 0); "
                         f"unset it for the default ({DEFAULT_PROGRESS_INTERVAL:g} s)")
    return value


def _duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class PlainProgress:
    """Progress for a log: ``LABEL done/total  DETAIL  ETA 3m05s`` on the first update, then at
    most every ``interval`` seconds, and on the last (``done == total``, with the time taken
    instead of an ETA); ``finish`` prints the last update if it was skipped (a run that stopped
    early). The ETA assumes the rate so far (updates since this object began) goes on."""

    def __init__(self, console: Console, label: str, total: int, done: int = 0, *,
                 interval: float, clock: Callable[[], float]):
        self.console, self.label, self.total = console, label, total
        self.interval, self.clock = interval, clock
        self.started, self.first = clock(), done
        self.done, self.detail = done, ""
        self.printed_at: float | None = None
        self.printed_done: int | None = None

    def update(self, done: int, detail: str = "") -> None:
        self.done, self.detail = done, detail
        now = self.clock()
        if (self.printed_at is None or done >= self.total
                or now - self.printed_at >= self.interval):
            self._print(now)

    def finish(self) -> None:
        if self.printed_done is not None and self.printed_done != self.done:
            self._print(self.clock())

    def _print(self, now: float) -> None:
        self.printed_at, self.printed_done = now, self.done
        parts = [f"{self.label} {self.done}/{self.total}"]
        if self.detail:
            parts.append(self.detail)
        elapsed = now - self.started
        if self.done >= self.total:
            parts.append(f"took {_duration(elapsed)}")
        elif self.done > self.first and elapsed > 0:
            rate = (self.done - self.first) / elapsed
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        self.console.print("  ".join(parts), markup=False, highlight=False)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file. A last line cut short (the process was killed while
    writing it) is left out; every complete line is kept."""
    if not path.exists():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines):  # no newline after it: a write that never finished
                break
            raise DataError("not a metrics record; the file is damaged (restore it, or "
                            "delete the line)", str(path), number) from None
        records.append(record)
    return records


def last_reported_step(path: Path) -> int:
    """The last step the metrics file ``path`` holds (0 where none, or where it cannot be
    read): what earlier attempts of a resumed run reported, to their loggers too."""
    try:
        records = read_metrics(path)
    except (OSError, DpoError):
        return 0
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return max(steps, default=0)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the complete records up to ``last_step`` (a resumed run rewrites the later ones),
    atomically."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
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
    """Console, progress bar, metrics file and loggers (``--log-to``) for one run."""

    def __init__(self, output: Path, *, enabled: bool = True, progress: bool = True,
                 console: Console | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.console = console or log_console()
        self.metrics_path = output / METRICS_FILE
        self._file = None
        self._progress: Progress | None = None
        self._task = None
        self._show_progress = progress and enabled
        # On a terminal, rich's live bars; elsewhere (a log) plain lines now and then.
        self._plain = self._show_progress and not self.console.is_interactive
        self._interval = (interval if interval is not None
                          else progress_interval() if self._plain else DEFAULT_PROGRESS_INTERVAL)
        self._clock = clock
        self._plain_train: PlainProgress | None = None
        self.loggers = Loggers(self.warn)
        self._pending: tuple[list[Logger], RunInfo] | None = None

    # lifecycle ---------------------------------------------------------------------------
    def attach(self, loggers: list[Logger], run: RunInfo) -> None:
        """Loggers to start with the run (``start``) and feed every record, table and text
        until ``end``; on the main process only (elsewhere they are left alone)."""
        if self.enabled and loggers:
            self._pending = (loggers, run)

    def start(self, total_steps: int, done: int) -> None:
        if not self.enabled:
            return
        self._file = self.metrics_path.open("a")
        if self._pending is not None:
            loggers, run = self._pending
            self._pending = None
            self.loggers.active = list(loggers)
            self.loggers.call("start", run)
        if self._plain:
            self._plain_train = PlainProgress(self.console, "step", total_steps, done,
                                              interval=self._interval, clock=self._clock)
        elif self._show_progress:
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
        if self._plain_train is not None:
            self._plain_train.finish()
            self._plain_train = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def end(self, status: str) -> None:
        """The run ended (``completed``, ``stopped``, ``interrupted`` or ``failed``): the loggers
        finish, once. After ``close``, so that they can be told how the run ended."""
        self._pending = None
        self.loggers.call("finish", status)
        self.loggers.active = []

    @contextmanager
    def task(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar for a pass before training (e.g. scoring pairs with the reference);
        yields ``advance(n)``."""
        if not self._show_progress or total <= 0:
            yield lambda n: None
            return
        if self._plain:
            plain = PlainProgress(self.console, label, total, interval=self._interval,
                                  clock=self._clock)
            try:
                yield lambda n: plain.update(plain.done + n)
            finally:
                plain.finish()
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
        if self.loggers:
            self.loggers.call("log_metrics", record.get("step", 0), record)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (e.g. generated samples) for the loggers; metrics.jsonl takes no tables."""
        if self.loggers:
            self.loggers.call("log_table", name, columns, rows, step)

    def text(self, name: str, text: str, step: int) -> None:
        """A text for the loggers."""
        if self.loggers:
            self.loggers.call("log_text", name, text, step)

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        # Loss, then what the objective shows besides it (a preference's accuracy and margin).
        shown = [("loss", "loss"), ("acc", "rewards/accuracies"), ("margin", "rewards/margins")]
        parts = [f"{label} {_fmt(metrics[key])}" for label, key in shown if key in metrics]
        if self._plain_train is not None:
            speed = f"tokens/s {metrics.get('tokens_per_second', math.nan):,.0f}"
            self._plain_train.update(step, "  ".join([*parts[:2], speed]))
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status="  ".join(parts))

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
