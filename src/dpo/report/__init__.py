"""``dpo report``: figures, a table and one self-contained HTML page from run directories.

The parts: ``runs`` reads run and sweep directories, ``summary`` builds the table, ``figures``
draws the PNGs (matplotlib, the ``report`` extra), ``page`` writes the HTML and ``output`` moves
the finished report into place.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo.report.runs import Run, differing, label, read_runs

REPORT_DIR = "report"  # the default output: RUN/report/ of the first run
PAGE = "report.html"
TABLE = "report.json"
LEGEND_KEYS = ["loss", "beta", "lr"]  # what a lone run's legend shows


@dataclass
class Report:
    output: Path
    runs: list[Run]
    figures: list[str]  # the PNGs' file names, in the page's order
    rows: list[Any]
    notes: list[str]


def default_output(runs: list[Run]) -> Path:
    return runs[0].path / REPORT_DIR


def legend_labels(runs: list[Run]) -> dict[int, str]:
    """Each run's legend text: its short name and the settings that tell it apart."""
    keys = differing(runs) if len(runs) > 1 else LEGEND_KEYS
    return {id(r): label(r, keys) for r in runs}


def notes(runs: list[Run]) -> list[str]:
    out = []
    for run in runs:
        if run.skipped_lines:
            out.append(f"{run.name}: {run.skipped_lines} line(s) of metrics.jsonl were not "
                       "records and were left out")
        if not run.train and not run.evals:
            out.append(f"{run.name}: no metrics recorded yet")
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def table_json(report: Report) -> dict[str, Any]:
    """``report.json``: the runs and the table, values as numbers (nan/inf as null)."""
    from dpo.report.summary import best_eval

    runs = [{
        "name": r.name, "path": str(r.path), "status": r.status,
        "steps": max(r.train) if r.train else r.record.get("steps"),
        "stopped": {"step": r.stopped[0], "by": r.stopped[1]} if r.stopped else None,
        "paused": {"step": r.paused[0], "by": r.paused[1]} if r.paused else None,
        "best": {"step": r.best[0], "restored": r.best[1]} if r.best else None,
        "last_step": r.last(r.train), "last_eval": r.last(r.evals), "best_eval": best_eval(r),
        "downstream": r.last(r.tasks),
    } for r in report.runs]
    return _json_safe({"runs": runs, "columns": [r.name for r in report.runs],
                       "rows": [row.as_dict() for row in report.rows],
                       "figures": report.figures})


def make_report(paths: list[Path], output: Path | None = None) -> Report:
    """Read the runs ``paths`` name, then write the report into ``output`` (default: the first
    run's ``report/``). matplotlib is checked for first: without it nothing is written."""
    from dpo.report import figures as fig
    from dpo.report.output import check_output, staged
    from dpo.report.page import page
    from dpo.report.summary import rows

    fig.require_matplotlib()
    runs = read_runs(paths)
    target = output if output is not None else default_output(runs)
    check_output(target)
    labels = legend_labels(runs)
    report = Report(target, runs, [], rows(runs), notes(runs))
    with staged(target) as stage:
        drawn = []
        for spec in fig.figure_specs(runs):
            fig.draw(spec, runs, labels, stage / f"{spec.name}.png")
            drawn.append((spec.title, stage / f"{spec.name}.png"))
            report.figures.append(f"{spec.name}.png")
        title = "dpo report: " + ", ".join(r.name for r in runs)
        (stage / PAGE).write_text(page(title, runs, report.rows, drawn, report.notes),
                                  encoding="utf-8")
        (stage / TABLE).write_text(json.dumps(table_json(report), indent=2) + "\n",
                                   encoding="utf-8")
    return report
