"""``dpo report``: figures, the side-by-side table and the HTML page, from a real tiny run and
from hand-written run directories."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.report import figures, legend_labels
from dpo.report.output import MANIFEST
from dpo.report.page import sample_rows
from dpo.report.runs import format_value, read_runs, settings
from dpo.report.summary import rows
from dpo.testing import write_arithmetic_pairs as write_pairs

pytest.importorskip("matplotlib")

SINGLE = (800, 450)  # one panel: 8.0 x 4.5 inches at 100 dpi
DOUBLE = (920, 450)  # two panels side by side: 2 x 4.6 x 4.5 inches


def cli(*args: str):
    return CliRunner().invoke(make_app(get_plugin_manager(load_entrypoints=False)), list(args))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def write_run(path: Path, records: list, *, status: str = "completed", steps: int | None = None,
              restored: int | None = None, raw_tail: str = "", **config) -> Path:
    """A run directory by hand: ``run.json`` with ``config`` over a few defaults, and
    ``metrics.jsonl`` with ``records`` (dicts, or raw strings written as they are)."""
    path.mkdir(parents=True)
    full = {"model": "tiny", "loss": "dpo", "lr": 1e-6, "max_steps": 4, "objective": "dpo",
            "output": str(path), "options": {}, **config}
    beta = full.pop("beta", 0.1)
    record = {"config": full, "status": status, "steps": steps,
              "restored_best_from_step": restored,
              "resolved": {"options": {full["loss"]: {"beta": beta}}}}
    (path / "run.json").write_text(json.dumps(record))
    (path / "metrics.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records) + raw_tail)
    return path


# -- a real run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny run that early stopping ends at step 4 and restores step 0's weights: with
    min_delta 10 no evaluation can improve on the step-0 baseline's eval/loss, so the
    evaluations at steps 2 and 4 are the two (patience 2) without improvement."""
    tmp = tmp_path_factory.mktemp("report")
    data = str(write_pairs(tmp / "pairs.jsonl"))
    out = tmp / "run"
    result = cli("run", "--no-progress", "--model", "tiny", "--data", data, "--eval-data", data,
                 "--backend", "cpu", "--batch-size", "4", "--lr", "3e-3", "-o", "beta=0.5",
                 "--max-steps", "20", "--eval-steps", "2", "--stop", "early-stopping",
                 "-o", "early-stopping.metric=eval/loss", "-o", "early-stopping.mode=min",
                 "-o", "early-stopping.patience=2", "-o", "early-stopping.min_delta=10",
                 "--output", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_report_of_a_real_run(tiny_run):
    result = cli("report", str(tiny_run))
    assert result.exit_code == 0, result.output
    report = tiny_run / "report"
    names = ["loss", "rewards-accuracies", "rewards-margins", "rewards", "logps", "grad-norm",
             "lr", "throughput", "memory"]
    assert json.loads((report / "report.json").read_text())["figures"] == [f"{n}.png" for n in names]
    for name in names:
        assert png_size(report / f"{name}.png") == (DOUBLE if name in ("rewards", "logps") else SINGLE)

    # One page, every figure inside it as the very bytes of its PNG, nothing fetched.
    page = (report / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [(report / f"{n}.png").read_bytes() for n in names]
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)

    # The table holds the metrics as the run recorded them.
    lines = metric_lines(tiny_run)
    evals = [r for r in lines if "eval/loss" in r]
    last_train = [r for r in lines if "loss" in r][-1]
    run = json.loads((tiny_run / "run.json").read_text())
    table = {(r["group"], r["name"]): r["values"][0]
             for r in json.loads((report / "report.json").read_text())["rows"]}
    assert table["outcome", "stopped at"] == 4 == run["steps"]
    assert table["outcome", "best step"] == "0 (restored)"
    assert table["last eval", "eval/loss"] == evals[-1]["eval/loss"] and evals[-1]["step"] == 4
    assert table["best eval", "eval/loss"] == run["final_eval"]["eval/loss"] == evals[0]["eval/loss"]
    assert table["last step", "rewards/accuracies"] == last_train["rewards/accuracies"]
    assert table["setting", "beta"] == 0.5 and table["setting", "lr"] == 0.003
    assert table["setting", "model"] == "tiny" and table["setting", "max_steps"] == 20

    # The terminal shows the same table and where the report went.
    assert "stopped at" in result.output and "0 (restored)" in result.output
    assert f"{evals[-1]['eval/loss']:.4g}" in result.output
    assert f"-> {report}" in result.output.replace("\n", "")

    # The marks: stopped at 4 by early-stopping, best (restored) at 0, on eval/loss.
    runs = read_runs([tiny_run])
    marks = [(m.kind, m.step, m.text) for m in figures.markers(runs)]
    assert marks == [("stopped", 4, "stopped by early-stopping"),
                     ("best", 0, "best eval/loss, restored as final")]


def test_rerunning_updates_the_report_and_keeps_a_users_files(tiny_run, tmp_path):
    out = tmp_path / "r"
    assert cli("report", str(tiny_run), "--output", str(out)).exit_code == 0
    (out / "notes.txt").write_text("mine")
    (out / "old-figure.png").write_bytes(b"stale")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].append("old-figure.png")  # as if an earlier report had drawn it
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "loss.png").write_bytes(b"old")
    result = cli("report", str(tiny_run), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert png_size(out / "loss.png") == SINGLE
    assert (out / "notes.txt").read_text() == "mine" and not (out / "old-figure.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary left behind


def test_a_directory_the_report_did_not_write_is_refused(tiny_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    result = cli("report", str(tiny_run), "--output", str(out))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "not written by dpo report" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    file = tmp_path / "file"
    file.write_text("x")
    result = cli("report", str(tiny_run), "--output", str(file))
    assert result.exit_code == 2 and "not a directory" in result.output and file.read_text() == "x"


def test_without_matplotlib_one_line_names_the_extra_and_nothing_is_written(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", [{"step": 1, "loss": 0.7}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = cli("report", str(run))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "pip install 'dpo-trainer[report]'" in result.output
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "run.json"]


def test_a_path_that_is_no_run_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        result = cli("report", str(path))
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "no run.json" in result.output


# -- hand-written runs -------------------------------------------------------------------------

def test_series_from_a_crashed_resumed_run(tmp_path):
    """Step 2 written twice (the second wins), a damaged line in the middle (skipped and
    counted), a last line cut short by a crash (skipped), an evaluation and downstream scores
    at one step (each where it belongs; two task records merge), a nan kept as a gap."""
    run_dir = write_run(tmp_path / "run", [
        {"step": 0, "eval/loss": 0.69},
        {"step": 1, "loss": 0.70, "lr": 1e-6, "grad_norm": 1.5},
        {"step": 2, "loss": 0.9, "lr": 2e-6},
        "{not json",
        {"step": 2, "loss": 0.60, "lr": 2e-6},
        {"step": 2, "eval/loss": 0.65, "eval/rewards/accuracies": 0.5},
        {"step": 2, "eval/tasks/arc_easy/acc": 0.4, "eval/tasks/arc_easy/acc_stderr": 0.02},
        {"step": 2, "eval/tasks/hellaswag/acc_norm": 0.3},
        {"step": 3, "loss": float("nan"), "lr": 3e-6, "note": "text is ignored"},
    ], raw_tail='{"step": 4, "loss": 0.5', status="running")
    run, = read_runs([run_dir])
    assert run.skipped_lines == 2
    assert run.series("loss") == ([1, 2, 3], [0.70, 0.60, pytest.approx(math.nan, nan_ok=True)])
    assert run.series("eval/loss") == ([0, 2], [0.69, 0.65])
    assert run.series("grad_norm") == ([1], [1.5])
    assert run.task_keys() == ["eval/tasks/arc_easy/acc", "eval/tasks/hellaswag/acc_norm"]
    assert run.stopped is None and run.best is None and run.status == "running"

    specs = {s.name: s for s in figures.figure_specs([run])}
    assert list(specs) == ["loss", "rewards-accuracies", "grad-norm", "lr", "downstream"]
    acc = figures.panel_series([run], specs["rewards-accuracies"].panels[0])
    assert [(s.kind, s.steps, s.values) for s in acc] == [("eval", [2], [0.5])]
    loss = figures.panel_series([run], specs["loss"].panels[0])
    assert [(s.kind, s.steps) for s in loss] == [("train", [1, 2, 3]), ("eval", [0, 2])]
    down = [figures.panel_series([run], p) for p in specs["downstream"].panels]
    assert [(s.key, s.values, s.errors) for [s] in down] == [
        ("eval/tasks/arc_easy/acc", [0.4], [0.02]),
        ("eval/tasks/hellaswag/acc_norm", [0.3], [pytest.approx(math.nan, nan_ok=True)])]


def test_a_sweep_directory_is_its_runs_compared(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    (sweep / "notes").mkdir()  # no run.json: not a run
    for beta, acc in ((0.5, 0.75), (0.1, 0.5)):
        write_run(sweep / f"beta-{beta}", [
            {"step": 0, "eval/loss": 0.69, "eval/rewards/accuracies": 0.0},
            {"step": 1, "loss": 0.6, "rewards/accuracies": acc, "lr": 1e-6},
            {"step": 1, "eval/loss": 0.6, "eval/rewards/accuracies": acc}], beta=beta, steps=1)
    runs = read_runs([sweep])
    assert [r.name for r in runs] == ["beta-0.1", "beta-0.5"]
    labels = legend_labels(runs)
    assert [labels[id(r)] for r in runs] == ["beta-0.1 (beta=0.1)", "beta-0.5 (beta=0.5)"]
    for run in runs:  # named as dpo sweep names its points: the name says it all
        run.name = f"beta={format_value(settings(run)['beta'])}"
    labels = legend_labels(runs)
    assert [labels[id(r)] for r in runs] == ["beta=0.1", "beta=0.5"]
    table = {(r.group, r.name): r.values for r in rows(runs)}
    assert table["setting", "beta"] == [0.1, 0.5] and table["setting", "lr"] == [1e-6, 1e-6]
    assert table["last eval", "eval/rewards/accuracies"] == [0.5, 0.75]
    assert ("outcome", "stopped at") not in table  # no run stopped early

    result = cli("report", str(sweep))
    assert result.exit_code == 0, result.output
    report = sweep / "beta-0.1" / "report"
    assert json.loads((report / "report.json").read_text())["columns"] == ["beta-0.1", "beta-0.5"]
    assert "beta-0.1" in result.output and "beta-0.5" in result.output


def test_runs_of_one_name_are_told_apart_by_their_parents(tmp_path):
    for where in ("a", "b"):
        write_run(tmp_path / where / "out", [{"step": 1, "loss": 0.5}])
    runs = read_runs([tmp_path / "a" / "out", tmp_path / "b" / "out"])
    assert [r.name for r in runs] == ["a/out", "b/out"]


def test_an_sft_run_and_a_run_in_progress(tmp_path):
    sft = write_run(tmp_path / "sft", [
        {"step": 0, "eval/loss": 5.0, "eval/perplexity": math.exp(5.0)},
        {"step": 1, "loss": 4.0, "perplexity": math.exp(4.0)}], objective="sft", lr=2e-5)
    live = write_run(tmp_path / "live", [
        {"step": 0, "eval/loss": 0.69}, {"step": 2, "eval/loss": 0.6},
        {"step": 4, "eval/loss": 0.65}], status="running")
    (live / "best").mkdir()
    (live / "best" / "dpo_best.json").write_text(json.dumps({"step": 2, "metrics": {}}))
    sft_run, live_run = read_runs([sft, live])
    assert [s.name for s in figures.figure_specs([sft_run])] == ["loss", "perplexity"]
    assert live_run.best == (2, False)
    assert [m.text for m in figures.markers([live_run])] == ["best step so far"]
    table = {(r.group, r.name): r.values for r in rows([sft_run, live_run])}
    assert table["setting", "loss"] == ["sft", "dpo"]
    assert table["best eval", "eval/loss"] == [None, 0.6]
    assert table["last step", "perplexity"] == [math.exp(4.0), None]


def test_samples_show_the_first_and_last_completion_escaped(tmp_path):
    run_dir = write_run(tmp_path / "run", [{"step": 0, "eval/loss": 0.7},
                                           {"step": 5, "eval/loss": 0.5}])
    samples = [{"step": step, "index": i, "prompt": f"<b>Q{i}</b> & co", "chosen": "yes",
                "rejected": None, "completion": f"answer {i} at {step}"}
               for step in (0, 5) for i in range(5)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    run, = read_runs([run_dir])
    first, last, shown = sample_rows(run)
    assert (first, last) == (0, 5) and [r["index"] for r in shown] == [0, 1, 2]
    assert shown[1]["first"] == "answer 1 at 0" and shown[1]["last"] == "answer 1 at 5"
    assert cli("report", str(run_dir)).exit_code == 0
    page = (run_dir / "report" / "report.html").read_text()
    assert "&lt;b&gt;Q0&lt;/b&gt; &amp; co" in page and "<b>Q0" not in page
    assert "policy at step 0" in page and "answer 2 at 5" in page and "answer 3" not in page


def test_samples_of_unpaired_examples_are_shown_as_desirable_or_undesirable(tmp_path):
    """A KTO run's sample lines carry a label and one answer (under ``chosen`` when desirable,
    ``rejected`` when undesirable): the table's answer columns are then named desirable and
    undesirable, each answer in its label's column and a dash in the other."""
    run_dir = write_run(tmp_path / "run", [{"step": 0, "eval/loss": 0.7},
                                           {"step": 2, "eval/loss": 0.5}])
    samples = [{"step": step, "index": i, "prompt": f"Q{i}", "label": i == 0,
                "chosen": "good" if i == 0 else None, "rejected": None if i == 0 else "bad",
                "completion": f"answer {i} at {step}"} for step in (0, 2) for i in range(2)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    run, = read_runs([run_dir])
    _, _, shown = sample_rows(run)
    assert [r["label"] for r in shown] == [True, False]
    assert cli("report", str(run_dir)).exit_code == 0
    page = (run_dir / "report" / "report.html").read_text()
    assert "<th>desirable</th><th>undesirable</th>" in page and "<th>chosen</th>" not in page
    dash = '<td class="text"><span class=muted>-</span></td>'
    assert (f'<td class="text">Q0</td><td class="text">good</td>{dash}' in page
            and f'<td class="text">Q1</td>{dash}<td class="text">bad</td>' in page)


def test_a_failure_midway_leaves_the_previous_report_as_it_was(tmp_path, monkeypatch):
    run_dir = write_run(tmp_path / "run", [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}])
    assert cli("report", str(run_dir)).exit_code == 0
    report = run_dir / "report"
    before = {p.name: p.read_bytes() for p in report.iterdir()}

    def broken(spec, runs, labels, path):
        path.write_bytes(b"half a figure")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(figures, "draw", broken)
    result = cli("report", str(run_dir))
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "report", "run.json"]


def test_the_users_matplotlib_state_is_left_alone(tmp_path):
    """No pyplot, no backend switch, no style setting left behind."""
    import matplotlib

    run_dir = write_run(tmp_path / "run", [{"step": 1, "loss": 0.7}])
    def settings():  # dict's own items: rcParams["backend"] would resolve (import pyplot)
        return dict(dict.items(matplotlib.rcParams))

    had_pyplot = "matplotlib.pyplot" in sys.modules
    before = settings()
    assert cli("report", str(run_dir)).exit_code == 0
    assert settings() == before
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    assert png_size(run_dir / "report" / "loss.png") == SINGLE


def test_a_paused_run_is_shown_paused(tmp_path, monkeypatch):
    """A run that budget's max_time paused at step 2 (for --resume) beside one that budget
    stopped at step 3: the table says which ended how and where, report.json has both, and
    every figure marks the pause with a dash-dot line at step 2 that its legend names."""
    lines = [{"step": 1, "loss": 0.69, "lr": 1e-6}, {"step": 2, "loss": 0.6, "lr": 1e-6},
             {"step": 3, "loss": 0.5, "lr": 1e-6}]
    paused = write_run(tmp_path / "paused", lines[:2], steps=2, status=(
        "paused by budget: 3500s of max_time=3600s used at step 2, and a step takes up to 120.0s"))
    stopped = write_run(tmp_path / "stopped", lines, steps=3, status=(
        "stopped by budget: 24 pairs at step 3 reached max_pairs=24"))
    runs = read_runs([paused, stopped])
    assert [r.paused for r in runs] == [(2, "budget"), None]
    assert [r.stopped for r in runs] == [None, (3, "budget")]
    table = {(r.group, r.name): r.values for r in rows(runs)}
    assert table["outcome", "status"] == ["paused by budget", "stopped by budget"]
    assert table["outcome", "paused at"] == [2, None]
    assert table["outcome", "stopped at"] == [None, 3]
    assert [(m.kind, m.step, m.text) for m in figures.markers(runs)] == [
        ("paused", 2, "paused by budget"), ("stopped", 3, "stopped by budget")]

    legends = []
    real_legend = figures._legend

    def legend(fig, handles, names):
        legends.append({n: h.get_linestyle() for h, n in zip(handles, names)})
        real_legend(fig, handles, names)

    monkeypatch.setattr(figures, "_legend", legend)
    result = cli("report", str(paused), str(stopped), "--output", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    assert legends and all(seen["paused by budget"] == "-." and seen["stopped by budget"] == "--"
                           for seen in legends)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(r["paused"], r["stopped"]) for r in report["runs"]] == [
        ({"step": 2, "by": "budget"}, None), (None, {"step": 3, "by": "budget"})]
    assert "paused at" in result.output
