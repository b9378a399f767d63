"""The runs side by side: their key settings and those that differ, how each one ended, and its
final and best metrics. One table, shown in the terminal, in the page and in ``report.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpo.report.runs import KEY_SETTINGS, Run, differing, format_value, settings

# The metrics of the table, when a run has them: DPO's, then SFT's.
TRAIN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "perplexity")
EVAL_METRICS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/perplexity")


@dataclass
class Row:
    group: str  # "setting", "outcome", "last step", "last eval", "best eval"
    name: str
    values: list[Any]  # one per run, None where the run has none

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "values": self.values}


def best_eval(run: Run) -> dict[str, float]:
    best = run.best
    return dict(run.evals.get(best[0], {})) if best else {}


def rows(runs: list[Run]) -> list[Row]:
    """The table's rows, top to bottom; a row no run has a value for is left out."""
    flat = [settings(r) for r in runs]
    out = [Row("setting", key, [f.get(key) for f in flat])
           for key in dict.fromkeys([*KEY_SETTINGS, *differing(runs)])]
    # "stopped by early-stopping", without its reason: the rows below say where and what.
    out.append(Row("outcome", "status", [r.status.partition(":")[0] for r in runs]))
    out.append(Row("outcome", "steps", [max(r.train) if r.train else r.record.get("steps")
                                        for r in runs]))
    out.append(Row("outcome", "stopped at", [r.stopped[0] if r.stopped else None for r in runs]))
    out.append(Row("outcome", "paused at", [r.paused[0] if r.paused else None for r in runs]))
    out.append(Row("outcome", "best step", [
        (f"{r.best[0]} (restored)" if r.best[1] else f"{r.best[0]}") if r.best else None
        for r in runs]))
    finals = [r.last(r.train) for r in runs]
    last_evals = [r.last(r.evals) for r in runs]
    bests = [best_eval(r) for r in runs]
    for group, tables, keys in (("last step", finals, TRAIN_METRICS),
                                ("last eval", last_evals, EVAL_METRICS),
                                ("best eval", bests, EVAL_METRICS)):
        out.extend(Row(group, key, [t.get(key) for t in tables]) for key in keys)
    return [row for row in out if any(v is not None for v in row.values)]


def cell(value: Any) -> str:
    return format_value(value)
