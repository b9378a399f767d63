"""``dpo sweep``: a grid of training runs, one ordinary run directory per point.

A sweep directory holds ``sweep.json`` (the grid, the base configuration and each point's
settings, directory and status), one run directory per point as an immediate subdirectory
(named after the point's settings, e.g. ``beta=0.05,lr=5e-07``), and, once the sweep has
ended, ``summary.json`` and ``summary.csv``: every point's settings with its final and best
held-out metrics.

Whether a point is done is read from its run directory, never from ``sweep.json``: a point is
finished when its run is (``run.json``'s status and ``final/``, as ``dpo run --resume`` decides),
interrupted when its directory holds a run that is not, and pending when it has no directory.
So a sweep that was killed at any moment goes on where it stopped.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo.core.interfaces.errors import UsageError
from dpo.core.training import rundir
from dpo.core.training.checkpoint import latest_checkpoint, write_json_atomic, write_text_atomic
from dpo.core.training.config import RunConfig
from dpo.core.training.layout import METRICS_FILE
from dpo.core.training.report import read_metrics

SWEEP_FILE = "sweep.json"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
KIND = "dpo sweep"  # marks sweep.json as a sweep's own

# Short names for RunConfig fields in a grid.
ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "steps": "max_steps",
    "bs": "batch_size",
    "accum": "grad_accum",
    "wd": "weight_decay",
    "warmup": "warmup_steps",
}
# Fields a grid may not vary: the sweep names each point's directory, a point trains the
# objective of the sweep's command, and plugin options are grid keys of their own.
NOT_GRID: dict[str, str] = {
    "output": "each point's run directory is named after its settings, under the sweep's "
              "--output",
    "objective": "the sweep's command decides it (--command run or sft)",
    "options": "give each plugin option as a key of its own (e.g. beta=0.1, "
               "early-stopping.patience=2)",
}
# The held-out metrics a summary shows, where the runs report them (the decisive one first).
SHOWN_METRICS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
                 "eval/perplexity")
# Their names in the table's headers.
SHORT_NAMES = {"eval/loss": "loss", "eval/rewards/accuracies": "accuracy",
               "eval/rewards/margins": "margin", "eval/perplexity": "perplexity"}
LIST_SEPARATOR = "+"  # joins the items of a list value (stop=nan-guard+early-stopping)
# Separates the items of one value of a loss combination's weights (weights=1:0.2,1:0.5): the
# grid's values are split on commas, and a number may hold a '+' (1e+3).
ITEM_SEPARATOR = ":"
# Grid keys that change what eval/loss measures (another loss, or its parts weighed otherwise):
# a summary then ranks points by their held-out reward accuracy, which every loss reports.
LOSS_KEYS = ("loss", "weights")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=,-]+")


@dataclass(frozen=True)
class Axis:
    """One ``--grid key=v1,v2`` axis: ``key`` is a RunConfig field (``field`` True) or a plugin
    option (a loss's plain key, or ``plugin.key``); ``values`` as given."""

    key: str
    values: tuple[str, ...]
    field: bool

    def as_record(self) -> dict[str, Any]:
        return {"key": self.key, "values": list(self.values)}


def parse_axis(spec: str, fields_taken: set[str]) -> Axis:
    """``"beta=0.05,0.1"`` as an Axis, or a one-line error. ``fields_taken``: the RunConfig
    fields the sweep's command takes."""
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--grid {spec}: not key=value,value (e.g. --grid beta=0.05,0.1)")
    if not _KEY.match(key):
        raise UsageError(f"--grid {spec}: {key!r} is not a key (a run option such as lr, or a "
                         "plugin option such as beta or early-stopping.patience)")
    name = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
    is_field = name in RunConfig.model_fields
    if is_field:
        if name in NOT_GRID:
            raise UsageError(f"--grid {spec}: {name} cannot vary in a sweep: {NOT_GRID[name]}")
        if name not in fields_taken:
            raise UsageError(f"--grid {spec}: this sweep's command does not take {name}")
        key = name
    values = tuple(v.strip() for v in raw.split(","))
    if any(not v for v in values):
        raise UsageError(f"--grid {spec}: an empty value; give values separated by commas "
                         "(e.g. --grid beta=0.05,0.1)")
    if len(set(values)) < len(values):
        repeated = next(v for v in values if values.count(v) > 1)
        raise UsageError(f"--grid {spec}: {repeated} is given twice; give each value once")
    return Axis(key, values, is_field)


def parse_grid(specs: list[str], fields_taken: set[str]) -> list[Axis]:
    """The axes of ``--grid`` options, in the order given; a key given twice is an error."""
    if not specs:
        raise UsageError("no --grid given; name what varies, e.g. --grid beta=0.05,0.1 "
                         "--grid lr=5e-7,1e-6")
    axes: list[Axis] = []
    for spec in specs:
        axis = parse_axis(spec, fields_taken)
        if any(a.key == axis.key for a in axes):
            raise UsageError(f"--grid {spec}: {axis.key} is already an axis; give all its values "
                             f"in one --grid {axis.key}=v1,v2")
        axes.append(axis)
    return axes


def shown_value(value: str) -> str:
    """A grid value as a point's name shows it: numbers as Python writes them (``5e-7`` ->
    ``5e-07``, ``0.10`` -> ``0.1``), anything else as given."""
    try:
        return str(int(value))
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return value
    return repr(number) if math.isfinite(number) else value


def point_name(settings: list[tuple[str, str]]) -> str:
    """A filesystem-safe directory name for a point: ``key=value`` pairs joined by commas; a
    value that is a path keeps its last part, and other characters become ``_``."""
    parts = []
    for key, value in settings:
        value = shown_value(value)
        if "/" in value or "\\" in value:
            value = Path(value.rstrip("/\\")).name or value
        parts.append(f"{key}={value}")
    name = _UNSAFE.sub("_", ",".join(parts)).strip(".")
    return name[:200] or "point"


@dataclass
class Point:
    """One point of the grid: its settings (key -> value as given) and its directory name."""

    values: list[tuple[str, str]]
    name: str
    settings: dict[str, Any] = field(default_factory=dict)  # typed, once resolved


def expand(axes: list[Axis]) -> list[Point]:
    """The Cartesian product of ``axes`` (the first axis varies slowest), each point named;
    names that would clash get ``-2``, ``-3``, ... appended."""
    points: list[Point] = []
    seen: dict[str, int] = {}
    for combination in itertools.product(*(axis.values for axis in axes)):
        values = [(axis.key, value) for axis, value in zip(axes, combination)]
        name = point_name(values)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}-{seen[name]}"
        points.append(Point(values, name))
    return points


# What a point's run directory says about it.
PENDING, FINISHED, INTERRUPTED, FOREIGN = "pending", "finished", "interrupted", "foreign"


def point_state(directory: Path) -> tuple[str, dict[str, Any] | None]:
    """(the state of the point whose run directory is ``directory``, its run record if readable):
    pending (no directory, or an empty one), finished (its run ended and wrote final/),
    interrupted (a run that did not finish: resume it), or foreign (files there that no run
    wrote: left alone)."""
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return PENDING, None
    record = None
    try:
        record = rundir.read_record(directory)
    except UsageError:
        pass
    if record is not None and rundir.finished(record, directory):
        return FINISHED, record
    if rundir.is_run_dir(directory) or latest_checkpoint(directory) is not None:
        return INTERRUPTED, record
    return FOREIGN, None


IDENTITY = ("command", "config", "args", "grid")
# Run options that change what a run shows, not what it trains: a sweep may go on without them.
PRESENTATION = ("--progress", "--no-progress")


def differences(recorded: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """What makes two sweeps the same sweep: the command, the base config file's contents
    (not its path: a copy elsewhere is the same base), the options given to every run (but
    --progress) and the grid. The parts of that in which ``given`` differs from ``recorded``."""
    def part(record: dict[str, Any], key: str) -> Any:
        value = record.get(key)
        if key == "config" and isinstance(value, dict):
            value = value.get("table")
        if key == "args" and isinstance(value, list):
            value = [word for word in value if word not in PRESENTATION]
        return json.loads(json.dumps(value, default=str))  # as sweep.json keeps it

    return [key for key in IDENTITY if part(recorded, key) != part(given, key)]


def read_sweep(directory: Path) -> dict[str, Any]:
    """``directory/sweep.json``, or a one-line error."""
    path = directory / SWEEP_FILE
    record = rundir.read_json_record(path, "sweep",
                                     "restore it, or start the sweep in a new --output")
    if not isinstance(record, dict) or record.get("kind") != KIND:
        raise UsageError(f"{path}: not a dpo sweep record")
    return record


def write_sweep(directory: Path, record: dict[str, Any]) -> None:
    write_json_atomic(directory / SWEEP_FILE, record)


# The summary.

def early_stopping_metric(record: dict[str, Any]) -> tuple[str, str] | None:
    """(metric, mode) that the run's early stopping watched, if it had early stopping."""
    config = record.get("config") or {}
    if "early-stopping" not in (config.get("stop") or []):
        return None
    resolved = ((record.get("resolved") or {}).get("options") or {}).get("early-stopping")
    options = resolved or (config.get("options") or {}).get("early-stopping") or {}
    return (str(options.get("metric", "eval/rewards/accuracies")),
            str(options.get("mode", "max")))


def evaluations(directory: Path) -> list[dict[str, Any]]:
    """The run's held-out evaluations from ``metrics.jsonl``, by step: the records of one
    step that carry ``eval/`` metrics merged (an evaluation and, e.g., its downstream tasks)."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in read_metrics(directory / METRICS_FILE):
        metrics = {k: v for k, v in record.items() if k.startswith("eval/")}
        if metrics and isinstance(record.get("step"), int):
            by_step.setdefault(record["step"], {"step": record["step"]}).update(metrics)
    return [by_step[step] for step in sorted(by_step)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_of(evals: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The evaluation with the best ``metric`` (the first of equals), or None. The baseline
    before training (step 0: for DPO the policy is its reference there, so every point of a
    sweep scores alike) counts only where the run has no later evaluation."""
    scored = [e for e in evals if _finite(e.get(metric))]
    trained = [e for e in scored if e["step"] > 0]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(trained or scored, key=lambda e: e[metric])


def summarise(directory: Path, sweep: dict[str, Any]) -> dict[str, Any]:
    """The summary of the sweep in ``directory``: each point's settings, status, steps, final
    (last) and best held-out evaluation, and the best point. One metric ranks both the
    evaluations of a run and the points: the runs' early-stopping metric (and its mode) where
    they stop early, else eval/loss, lower is better; but where the grid varies the loss
    (``LOSS_KEYS``), whose eval/loss is then another measure at each point,
    eval/rewards/accuracies, higher is better."""
    found = []
    for point in sweep.get("points", []):
        run_dir = directory / point["directory"]
        state, record = point_state(run_dir)
        if record is None and state != PENDING:
            try:
                record = rundir.read_record(run_dir)
            except UsageError:  # a damaged run.json: its metrics still count
                pass
        found.append((point, run_dir, state, record))
    watched = [early_stopping_metric(record) for _, _, _, record in found if record]
    varies_loss = any(axis.get("key") in LOSS_KEYS for axis in sweep.get("grid") or [])
    default = ("eval/rewards/accuracies", "max") if varies_loss else ("eval/loss", "min")
    metric, mode = next((w for w in watched if w), default)
    rows = []
    for point, run_dir, state, record in found:
        evals = evaluations(run_dir) if state != PENDING else []
        status = (record or {}).get("status") or point.get("status") or PENDING
        rows.append({
            "name": point["name"], "directory": point["directory"],
            "settings": point.get("settings", {}), "status": status,
            "finished": state == FINISHED, "steps": (record or {}).get("steps"),
            "final": evals[-1] if evals else None, "best": best_of(evals, metric, mode),
        })
    ranked = [row for row in rows if row["best"] is not None]
    best = None
    if ranked:
        pick = min if mode == "min" else max
        best = pick(ranked, key=lambda row: row["best"][metric])["name"]
    return {"metric": metric, "mode": mode, "best": best, "points": rows}


def shown_metrics(summary: dict[str, Any]) -> list[str]:
    """The metrics a summary table shows: the decisive one, then SHOWN_METRICS, where any
    point reports them."""
    reported = {k for row in summary["points"] for part in ("final", "best")
                for k in (row[part] or {})}
    ordered = [summary["metric"], *(m for m in SHOWN_METRICS if m != summary["metric"])]
    return [m for m in ordered if m in reported]


def setting_text(value: Any) -> Any:
    """A point's setting as a summary shows it: a list as the grid gives it, numbers (a
    combination's weights) joined by ``ITEM_SEPARATOR`` (``1.0:0.2``), names by
    ``LIST_SEPARATOR`` (``nan-guard+early-stopping``)."""
    if isinstance(value, (list, tuple)):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return (ITEM_SEPARATOR if numbers else LIST_SEPARATOR).join(str(v) for v in value)
    return value


def summary_csv(summary: dict[str, Any], keys: list[str]) -> str:
    """The summary as CSV: one row per point (the grid's keys, status, steps, then final and
    best of each shown metric, the best's step, and whether it is the sweep's best point)."""
    metrics = shown_metrics(summary)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["point", *keys, "status", "steps",
                     *(f"final {m}" for m in metrics), *(f"best {m}" for m in metrics),
                     "best step", "best point"])
    for row in summary["points"]:
        final, best = row["final"] or {}, row["best"] or {}
        writer.writerow([row["name"], *(setting_text(row["settings"].get(k, "")) for k in keys),
                         row["status"],
                         "" if row["steps"] is None else row["steps"],
                         *(final.get(m, "") for m in metrics), *(best.get(m, "") for m in metrics),
                         best.get("step", ""), "yes" if row["name"] == summary["best"] else ""])
    return out.getvalue()


def write_summary(directory: Path, summary: dict[str, Any], keys: list[str]) -> None:
    """``summary.json`` and ``summary.csv`` in the sweep directory, each atomically."""
    write_json_atomic(directory / SUMMARY_JSON, summary)
    write_text_atomic(directory / SUMMARY_CSV, summary_csv(summary, keys))

