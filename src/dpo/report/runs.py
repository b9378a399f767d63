"""Runs as a report reads them: which directories are runs, their metrics as series against the
step, where each one stopped and which step it kept as best, the settings that tell runs apart,
and the policy's sampled completions.

Everything here is read leniently: a run still in progress, one killed mid-write (a cut last
line in ``metrics.jsonl``) or one resumed (its later records rewritten) is reported as far as
its files go. A line that is not a record is skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo.core.interfaces.errors import UsageError
from dpo.core.training.layout import BEST, BEST_RECORD, METRICS_FILE, RUN_FILE
from dpo.core.training.rundir import read_record

SAMPLES_FILE = "samples.jsonl"  # one line per prompt per evaluation: step, index, prompt, ...
EVAL = "eval/"
TASKS = "eval/tasks/"  # downstream scores: eval/tasks/<task>/<metric>[_stderr]
STDERR = "_stderr"

# Settings every comparison shows, differing or not (``steps`` is how many the run took).
KEY_SETTINGS = ("model", "loss", "beta", "lr", "max_steps")
# Settings that differ between any two runs without telling them apart.
IGNORED_SETTINGS = frozenset({"output", "progress"})


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    record: dict[str, Any]
    train: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> its record
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> eval/ metrics
    tasks: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> eval/tasks/ ...
    samples: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0  # lines of metrics.jsonl that were not records
    name: str = ""  # short and unique among the runs of one report

    @property
    def config(self) -> dict[str, Any]:
        return self.record.get("config") or {}

    @property
    def status(self) -> str:
        return str(self.record.get("status") or "unknown")

    @property
    def sft(self) -> bool:
        return self.config.get("objective") == "sft"

    @property
    def stopped(self) -> tuple[int, str] | None:
        """(step, policy) where a stopping policy ended the run, from ``run.json``'s status."""
        return self._ended("stopped")

    @property
    def paused(self) -> tuple[int, str] | None:
        """(step, policy) where a stopping policy paused the run for ``--resume`` (budget's
        ``max_time``), from ``run.json``'s status."""
        return self._ended("paused")

    def _ended(self, how: str) -> tuple[int, str] | None:
        found = re.match(rf"{how} by ([^:]+):", self.status)
        if not found or not isinstance(self.record.get("steps"), int):
            return None
        return self.record["steps"], found[1]

    @property
    def best(self) -> tuple[int, bool] | None:
        """(step, restored): the evaluation whose weights the run kept as best. ``restored``:
        the final weights are that step's (``run.json``'s ``restored_best_from_step``); else the
        best so far, from ``best/``'s record (a run in progress, or one that does not restore)."""
        restored = self.record.get("restored_best_from_step")
        if isinstance(restored, int):
            return restored, True
        try:
            kept = json.loads((self.path / BEST / BEST_RECORD).read_text(encoding="utf-8"))
            return int(kept["step"]), False
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def best_metric(self) -> str | None:
        """The metric that decided the best step: early-stopping's, as the run resolved it."""
        options = (self.record.get("resolved") or {}).get("options") or {}
        metric = (options.get("early-stopping") or {}).get("metric")
        return metric if isinstance(metric, str) else None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` in step order: training metrics, ``eval/`` metrics or
        downstream scores, by the key's name."""
        table = self.tasks if key.startswith(TASKS) else self.evals if key.startswith(EVAL) else self.train
        points = [(step, row[key]) for step, row in sorted(table.items()) if key in row]
        return [s for s, _ in points], [v for _, v in points]

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])

    def last(self, table: dict[int, dict[str, float]]) -> dict[str, float]:
        return dict(table[max(table)]) if table else {}

    def task_keys(self) -> list[str]:
        """The downstream scores this run has, stderr columns left out."""
        keys = {k for row in self.tasks.values() for k in row if not k.endswith(STDERR)}
        return sorted(keys)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_metrics(path: Path) -> tuple[dict[int, dict], dict[int, dict], dict[int, dict], int]:
    """(train, evals, tasks, skipped) from a metrics file. The last record of a step wins (a
    resumed run truncates the file, so duplicates should not happen, but a copy or a crash
    mid-resume may leave some); downstream scores merge per key, since each task may write its
    own record for one step. Non-numeric values are left out; nan and inf are kept as nan
    (a gap in a line), so a diverged run shows where it diverged."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    tasks: dict[int, dict] = {}
    skipped = 0
    if not path.is_file():
        return train, evals, tasks, skipped
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            skipped += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            skipped += 1
            continue
        parts: dict[str, dict[str, float]] = {"train": {}, "eval": {}, "tasks": {}}
        for key, value in record.items():
            number = _number(value)
            if key == "step" or number is None:
                continue
            number = number if math.isfinite(number) else math.nan
            part = "tasks" if key.startswith(TASKS) else "eval" if key.startswith(EVAL) else "train"
            parts[part][key] = number
        if parts["train"]:
            train[step] = parts["train"]
        if parts["eval"]:
            evals[step] = parts["eval"]
        if parts["tasks"]:
            tasks.setdefault(step, {}).update(parts["tasks"])
    return train, evals, tasks, skipped


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The records of ``samples.jsonl`` that have a step, an index and a prompt; the last one
    of each (step, index) wins."""
    if not path.is_file():
        return []
    kept: dict[tuple[int, int], dict[str, Any]] = {}
    for raw in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if (isinstance(record, dict) and isinstance(record.get("step"), int)
                and isinstance(record.get("index"), int) and isinstance(record.get("prompt"), str)):
            kept[record["step"], record["index"]] = record
    return [kept[k] for k in sorted(kept)]


def read_run(path: Path) -> Run:
    run = Run(path=path, record=read_record(path))
    run.train, run.evals, run.tasks, run.skipped_lines = read_metrics(path / METRICS_FILE)
    run.samples = read_samples(path / SAMPLES_FILE)
    return run


def discover(paths: list[Path]) -> list[Path]:
    """The run directories that ``paths`` name: each one a run directory (``run.json``), or a
    sweep directory whose runs are its immediate subdirectories holding a ``run.json``, in
    sorted order. A path that is neither is a one-line error."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise UsageError(f"{path}: no such directory; name a run directory (it holds "
                             f"{RUN_FILE}) or a sweep directory")
        if (path / RUN_FILE).is_file():
            runs = [path]
        else:
            runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / RUN_FILE).is_file())
            if not runs:
                raise UsageError(f"{path}: not a run directory (no {RUN_FILE}) and no "
                                 f"subdirectory of it holds one; name a run or a sweep directory")
        for run in runs:
            if run.resolve() not in {p.resolve() for p in found}:
                found.append(run)
    return found


def short_names(paths: list[Path]) -> list[str]:
    """Each run's directory name, with as many parent names as it takes to tell runs apart."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.resolve().parts) for p in paths):
            return names
        depth += 1


def read_runs(paths: list[Path]) -> list[Run]:
    runs = [read_run(p) for p in discover(paths)]
    for run, name in zip(runs, short_names([r.path for r in runs])):
        run.name = name
    return runs


def settings(run: Run) -> dict[str, Any]:
    """The run's configuration, flat: RunConfig's fields, and each plugin's options as
    ``plugin.option`` (the loss's own as the bare option name, e.g. ``beta``), resolved values
    (with their defaults) where ``run.json`` has them."""
    config = dict(run.config)
    options = (run.record.get("resolved") or {}).get("options") or config.get("options") or {}
    flat = {k: v for k, v in config.items() if k != "options"}
    loss = config.get("loss")
    for plugin, values in sorted(options.items()):
        if not isinstance(values, dict):
            continue
        for key, value in sorted(values.items()):
            flat[key if plugin == loss else f"{plugin}.{key}"] = value
    if run.sft:  # an SFT run has no loss plugin: its objective says what it trains
        flat["loss"] = "sft"
        flat.pop("beta", None)
    return flat


def differing(runs: list[Run]) -> list[str]:
    """The settings whose values are not the same in every run, in a stable order."""
    flat = [settings(r) for r in runs]
    keys = sorted({k for f in flat for k in f} - IGNORED_SETTINGS)
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def label(run: Run, keys: list[str]) -> str:
    """The run's short name and the values of its distinguishing settings, e.g.
    ``beta-0.5 (beta=0.5, lr=1e-06)``."""
    values = settings(run)
    shown = [f"{k}={format_value(values.get(k))}" for k in keys if k in values]
    # A sweep's point is named after its settings (``lr=5e-05,beta=0.5``): not twice.
    named = set(run.name.split(","))
    shown = [s for s in shown if s not in named]
    return f"{run.name} ({', '.join(shown)})" if shown else run.name


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
