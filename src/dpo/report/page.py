"""The report as one HTML file that needs nothing else: the figures embedded as base64 PNGs, the
table of runs, the downstream scores, and a few prompts with the policy's completions at its
first and last evaluation beside the pair's answers. Every text from a run is escaped."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from dpo.report.runs import STDERR, TASKS, Run, format_value
from dpo.report.summary import Row

SAMPLE_PROMPTS = 3  # prompts shown per run

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.group td { background: #fafafa; font-weight: bold; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.85em;
        max-width: 28em; }
.muted { color: #666; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    css = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return f"<td{css}>{_e(format_value(value))}</td>"


def runs_table(runs: list[Run], rows: list[Row]) -> str:
    head = "".join(f"<th>{_e(r.name)}</th>" for r in runs)
    body, group = [], None
    for row in rows:
        if row.group != group:
            group = row.group
            body.append(f'<tr class="group"><td colspan="{len(runs) + 1}">{_e(group)}</td></tr>')
        body.append(f"<tr><th>{_e(row.name)}</th>{''.join(_cell(v) for v in row.values)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def downstream_table(runs: list[Run]) -> str:
    """Each run's downstream scores at its first and last evaluation that has them."""
    lines = []
    for run in runs:
        for key in run.task_keys():
            steps, values = run.series(key)
            errors = dict(zip(*run.series(key + STDERR)))
            task, _, metric = key.removeprefix(TASKS).partition("/")
            shown = [f"{format_value(values[i])}" + (f" ± {format_value(errors[steps[i]])}"
                                                      if steps[i] in errors else "")
                     for i in (0, -1)]
            lines.append(f"<tr><td>{_e(run.name)}</td><td>{_e(task)}</td><td>{_e(metric)}</td>"
                         f"<td class=num>{_e(steps[0])}: {_e(shown[0])}</td>"
                         f"<td class=num>{_e(steps[-1])}: {_e(shown[1])}</td></tr>")
    if not lines:
        return ""
    return ("<h2>Downstream scores</h2><table><tr><th>run</th><th>task</th><th>metric</th>"
            "<th>first evaluation (step: score ± stderr)</th><th>last evaluation</th></tr>"
            + "".join(lines) + "</table>")


def sample_rows(run: Run, count: int = SAMPLE_PROMPTS) -> tuple[int, int, list[dict[str, Any]]] | None:
    """(first step, last step, rows): the first ``count`` prompts sampled at the run's first
    evaluated step, each with its completion then and at the last step (None if not sampled
    then). ``label``: an unpaired example's (True: desirable, its answer under ``chosen``;
    False: under ``rejected``), None for a pair or a demonstration."""
    steps = sorted({s["step"] for s in run.samples})
    if not steps:
        return None
    first, last = steps[0], steps[-1]
    by_key = {(s["step"], s["index"]): s for s in run.samples}
    indices = sorted(i for (step, i) in by_key if step == first)[:count]
    rows = []
    for index in indices:
        start = by_key[first, index]
        end = by_key.get((last, index))
        rows.append({"index": index, "prompt": start["prompt"], "chosen": start.get("chosen"),
                     "rejected": start.get("rejected"), "first": start.get("completion"),
                     "last": end.get("completion") if end else None,
                     "label": start.get("label") if isinstance(start.get("label"), bool)
                     else None})
    return first, last, rows


def samples_section(runs: list[Run]) -> str:
    parts = []
    for run in runs:
        found = sample_rows(run)
        if not found:
            continue
        first, last, rows = found
        # Unpaired examples (KTO) have one answer each, desirable or undesirable.
        answers = (("desirable", "undesirable")
                   if any(r["label"] is not None for r in rows) else ("chosen", "rejected"))
        head = (f"<tr><th>prompt</th><th>{answers[0]}</th><th>{answers[1]}</th>"
                f"<th>policy at step {first}</th><th>policy at step {last}</th></tr>")
        body = "".join(
            "<tr>" + "".join(f'<td class="text">{_e(v) if v is not None else "<span class=muted>-</span>"}</td>'
                             for v in (r["prompt"], r["chosen"], r["rejected"], r["first"],
                                       r["last"])) + "</tr>"
            for r in rows)
        parts.append(f"<h3>{_e(run.name)}</h3><table>{head}{body}</table>")
    return ("<h2>Samples</h2>" + "".join(parts)) if parts else ""


def page(title: str, runs: list[Run], rows: list[Row], figures: list[tuple[str, Path]],
         notes: list[str]) -> str:
    images = "".join(
        f'<img alt="{_e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode("ascii")}">' for name, path in figures)
    paths = "".join(f"<li><b>{_e(r.name)}</b>: <code>{_e(r.path)}</code>, {_e(r.status)}</li>"
                    for r in runs)
    note = "".join(f'<p class="muted">{_e(n)}</p>' for n in notes)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><ul>{paths}</ul>{note}"
            f"<h2>Runs</h2>{runs_table(runs, rows)}"
            f"{downstream_table(runs)}"
            f"<h2>Figures</h2>{images or '<p class=muted>no metrics recorded yet</p>'}"
            f"{samples_section(runs)}</body></html>\n")
