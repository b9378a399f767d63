"""``dpo sweep``: the grid, the points' run directories, resuming point by point, bad input,
and the summary table."""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import textwrap
from pathlib import Path

import pytest

from dpo.core.interfaces.errors import UsageError
from dpo.core.training import sweep as sw
from dpo.testing import command_line, plugin_of, write_arithmetic_pairs

FIELDS = {"lr", "max_steps", "batch_size", "stop", "lora", "model", "data"}


def test_the_grid_is_the_product_of_its_axes_first_axis_slowest():
    axes = sw.parse_grid(["beta=0.05,0.1,0.5", "learning_rate=5e-7,1e-6"], FIELDS)
    assert [(a.key, a.values, a.field) for a in axes] == [
        ("beta", ("0.05", "0.1", "0.5"), False), ("lr", ("5e-7", "1e-6"), True)]
    names = [p.name for p in sw.expand(axes)]
    assert names == ["beta=0.05,lr=5e-07", "beta=0.05,lr=1e-06", "beta=0.1,lr=5e-07",
                     "beta=0.1,lr=1e-06", "beta=0.5,lr=5e-07", "beta=0.5,lr=1e-06"]


def test_point_names_are_safe_directory_names():
    assert sw.point_name([("model", "/models/my model/"), ("steps", "010")]) == \
        "model=my_model,steps=10"
    assert sw.point_name([("early-stopping.metric", "eval/loss")]) == \
        "early-stopping.metric=loss"
    # Two values that name alike still get a directory each.
    axes = sw.parse_grid(["model=a/x,b/x"], FIELDS)
    assert [p.name for p in sw.expand(axes)] == ["model=x", "model=x-2"]


@pytest.mark.parametrize("spec, message", [
    ("beta", "not key=value,value"),
    ("beta=", "an empty value"),
    ("beta=0.1,,0.2", "an empty value"),
    ("beta=0.1,0.1", "0.1 is given twice"),
    ("output=a,b", "output cannot vary"),
    ("options=x", "options cannot vary"),
    ("ref_model=x", "does not take ref_model"),
    ("9lives=1", "is not a key"),
])
def test_bad_axes_are_one_line(spec, message):
    with pytest.raises(UsageError, match=message):
        sw.parse_grid([spec], FIELDS)


def test_an_axis_given_twice_is_refused():
    with pytest.raises(UsageError, match="lr is already an axis"):
        sw.parse_grid(["lr=1e-6", "learning-rate=1e-5"], FIELDS)


def _fake_run(directory: Path, evals: list[dict], *, stop: list[str] | None = None,
              early: dict | None = None, finished: bool = True) -> None:
    directory.mkdir(parents=True)
    config = {"stop": stop or ["nan-guard"], "options": {}}
    record = {"status": "completed" if finished else "running", "config": config,
              "steps": max(e["step"] for e in evals),
              "resolved": {"options": {"early-stopping": early} if early else {}}}
    (directory / "run.json").write_text(json.dumps(record))
    lines = [{"step": e["step"], "loss": 0.5} for e in evals if e["step"]] + evals
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if finished:
        (directory / "final").mkdir()


def _fake_sweep(root: Path, names: list[str]) -> dict:
    return {"kind": sw.KIND, "grid": [{"key": "beta", "values": [n.split("=")[1] for n in names]}],
            "points": [{"name": n, "directory": n, "settings": {"beta": float(n.split("=")[1])},
                        "status": "pending"} for n in names]}


def test_summary_ranks_by_eval_loss_leaving_out_the_baseline(tmp_path):
    """Point a: evaluations at steps 0, 2, 4 with eval/loss 0.6931, 0.60, 0.65: final 0.65
    (step 4), best 0.60 (step 2). Point b: 0.6931, 0.62, 0.55: best 0.55 at step 4, the final
    one. The baseline (step 0) ties everywhere and is left out. Best point: b (0.55 < 0.60)."""
    a = [{"step": 0, "eval/loss": 0.6931, "eval/rewards/accuracies": 0.0},
         {"step": 2, "eval/loss": 0.60, "eval/rewards/accuracies": 0.75},
         {"step": 4, "eval/loss": 0.65, "eval/rewards/accuracies": 0.5}]
    b = [{"step": 0, "eval/loss": 0.6931, "eval/rewards/accuracies": 0.0},
         {"step": 2, "eval/loss": 0.62, "eval/rewards/accuracies": 0.5},
         {"step": 4, "eval/loss": 0.55, "eval/rewards/accuracies": 0.625}]
    _fake_run(tmp_path / "beta=0.1", a)
    _fake_run(tmp_path / "beta=0.5", b)
    summary = sw.summarise(tmp_path, _fake_sweep(tmp_path, ["beta=0.1", "beta=0.5", "beta=1.0"]))
    assert (summary["metric"], summary["mode"], summary["best"]) == ("eval/loss", "min", "beta=0.5")
    first, second, pending = summary["points"]
    assert (first["final"]["step"], first["final"]["eval/loss"]) == (4, 0.65)
    assert (first["best"]["step"], first["best"]["eval/loss"]) == (2, 0.60)
    assert (second["best"]["step"], second["best"]["eval/loss"]) == (4, 0.55)
    assert (pending["status"], pending["final"], pending["best"]) == ("pending", None, None)
    sw.write_summary(tmp_path, summary, ["beta"])
    with (tmp_path / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["point"], r["beta"], r["best eval/loss"], r["best point"]) for r in rows] == [
        ("beta=0.1", "0.1", "0.6", ""), ("beta=0.5", "0.5", "0.55", "yes"),
        ("beta=1.0", "1.0", "", "")]
    assert json.loads((tmp_path / "summary.json").read_text())["best"] == "beta=0.5"


def test_summary_ranks_by_the_early_stopping_metric_and_mode(tmp_path):
    """With early stopping on eval/rewards/accuracies (max), point a's best is 0.75 (step 2)
    and b's 0.625 (step 4): a is the best point although b has the lower eval/loss."""
    early = {"metric": "eval/rewards/accuracies", "mode": "max"}
    a = [{"step": 2, "eval/loss": 0.60, "eval/rewards/accuracies": 0.75},
         {"step": 4, "eval/loss": 0.65, "eval/rewards/accuracies": 0.5}]
    b = [{"step": 2, "eval/loss": 0.62, "eval/rewards/accuracies": 0.5},
         {"step": 4, "eval/loss": 0.55, "eval/rewards/accuracies": 0.625}]
    _fake_run(tmp_path / "beta=0.1", a, stop=["nan-guard", "early-stopping"], early=early)
    _fake_run(tmp_path / "beta=0.5", b, stop=["nan-guard", "early-stopping"], early=early)
    summary = sw.summarise(tmp_path, _fake_sweep(tmp_path, ["beta=0.1", "beta=0.5"]))
    assert (summary["metric"], summary["mode"], summary["best"]) == (
        "eval/rewards/accuracies", "max", "beta=0.1")
    assert [r["best"]["step"] for r in summary["points"]] == [2, 4]


def test_a_grid_that_varies_the_loss_ranks_points_by_reward_accuracy(tmp_path):
    """Weights 1:0.2 and 1:0.5 of dpo+ipo: eval/loss weighs ipo's (larger) loss more at the
    second point, so it is no common measure; the points are ranked by eval/rewards/accuracies
    instead: a (loss 0.5, accuracy 0.5) against b (loss 3.0, accuracy 0.75): b, though its
    eval/loss is higher. The weights show as the grid gives them; a list of names (stop) joins
    with +."""
    _fake_run(tmp_path / "weights=1_0.2", [{"step": 2, "eval/loss": 0.5,
                                             "eval/rewards/accuracies": 0.5}])
    _fake_run(tmp_path / "weights=1_0.5", [{"step": 2, "eval/loss": 3.0,
                                             "eval/rewards/accuracies": 0.75}])
    sweep = {"kind": sw.KIND, "grid": [{"key": "weights", "values": ["1:0.2", "1:0.5"]}],
             "points": [{"name": f"weights=1_{w}", "directory": f"weights=1_{w}",
                         "settings": {"weights": [1.0, w]}, "status": "completed"}
                        for w in (0.2, 0.5)]}
    summary = sw.summarise(tmp_path, sweep)
    assert (summary["metric"], summary["mode"], summary["best"]) == (
        "eval/rewards/accuracies", "max", "weights=1_0.5")
    rows = list(csv.DictReader(sw.summary_csv(summary, ["weights"]).splitlines()))
    assert [(r["weights"], r["best point"]) for r in rows] == [("1.0:0.2", ""), ("1.0:0.5", "yes")]
    assert sw.setting_text(["nan-guard", "early-stopping"]) == "nan-guard+early-stopping"
    assert sw.setting_text(0.1) == 0.1


def test_point_states_come_from_the_run_directory(tmp_path):
    _fake_run(tmp_path / "done", [{"step": 1, "eval/loss": 0.6}])
    _fake_run(tmp_path / "cut", [{"step": 1, "eval/loss": 0.6}], finished=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    assert [sw.point_state(tmp_path / n)[0] for n in ("done", "cut", "empty", "theirs", "none")] \
        == [sw.FINISHED, sw.INTERRUPTED, sw.PENDING, sw.FOREIGN, sw.PENDING]


@pytest.fixture
def pairs(tmp_path):
    return write_arithmetic_pairs(tmp_path / "pairs.jsonl", n=16)


@pytest.mark.parametrize("args, message", [
    (["--grid", "bogus_field_x=1,2"], "--grid bogus_field_x=1: loss 'dpo': unknown option 'bogus_field_x'"),
    (["--grid", "lr=0.1,-1"], "--grid lr=-1: --lr=-1.0: Input should be greater than 0"),
    (["--grid", "beta=abc"], "--grid beta=abc: .*beta"),
    (["--grid", "max_steps=two"], "--grid max_steps=two: Invalid value for '--max-steps'"),
    (["--grid", "lora=maybe"], "--grid lora=maybe: lora is a switch; give true or false"),
    (["--grid", "loss=nope"], "--grid loss=nope: .*nope"),
    (["--grid", "beta=0.1", "--overwrite"], "--overwrite: a sweep never replaces a run"),
    (["--grid", "beta=0.1", "--max-steps", "x"], "Invalid value for '--max-steps'"),
    (["--grid", "beta=0.1", "--command", "sft"], "`dpo sft` has no loss to take a plain key"),
    ([], "no --grid given"),
    (["--grid", "lr=1e-4", "--lr", "1e-5"], "--lr is given to every run and is an axis"),
    (["--grid", "beta=0.1", "-o", "beta=0.2"], "-o beta is given to every run and is an axis"),
    (["--grid", "beta=0.1", "stray"], "Got unexpected extra argument"),
    (["--grid", "weights=1,0.2", "--loss", "dpo", "--loss", "ipo"],
     r"--grid weights=1: 1 weight\(s\) for 2 losses \(dpo, ipo\); a grid value gives one "
     r"point's weights, separated by ':' \(e.g. --grid weights=1.0:1.0,0.5:1.0\)"),
    (["--grid", "weights=1:0.5:2", "--loss", "dpo", "--loss", "ipo"],
     r"--grid weights=1:0.5:2: 3 weight\(s\) for 2 losses"),
    (["--grid", "weights=1:-2", "--loss", "dpo", "--loss", "ipo"],
     r"--grid weights=1:-2: loss 'dpo\+ipo': option weights=1,-2: each weight must be"),
    (["--grid", "weights=1:2", "--loss", "dpo"], r"--grid weights=1:2: .*weighs losses trained"),
    (["--grid", "loss=dpo+ipo,dpo+dpo"], r"--grid loss=dpo\+dpo: loss 'dpo' is named twice"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, pairs, args, message):
    result = command_line()("sweep", "--output", str(tmp_path / "sw"), "--model", "tiny",
                            "--data", str(pairs), *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "sw").exists()


def test_a_directory_that_is_no_sweep_is_left_alone(tmp_path, pairs):
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "notes.txt").write_text("mine")
    result = command_line()("sweep", "--output", str(tmp_path / "sw"), "--grid", "beta=0.1",
                            "--model", "tiny", "--data", str(pairs))
    assert result.exit_code == 2
    assert "already holds files and no sweep.json" in result.output
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["notes.txt"]


# A stopping policy for the points' own processes (installed for them through a dist-info on
# PYTHONPATH): at step 2 it counts down the number in $SWEEP_CRASH_FILE and raises when that
# reaches 0, like a machine dying in the middle of that point.
CRASH_PLUGIN = '''
import os
from pathlib import Path

import dpo
from dpo.core.interfaces.stopping import CONTINUE, StoppingPolicy


class CrashOnce(StoppingPolicy):
    name = "crash-once"

    def on_step(self, step, metrics):
        if step == 2:
            path = Path(os.environ["SWEEP_CRASH_FILE"])
            left = int(path.read_text()) - 1
            path.write_text(str(left))
            if left == 0:
                raise RuntimeError("simulated crash")
        return CONTINUE


@dpo.hookimpl
def dpo_register_stopping_policies(register):
    register(CrashOnce)
'''


@pytest.fixture
def crash_plugin(tmp_path, monkeypatch):
    """Installs ``crash-once`` for this process and the points' processes; returns its
    counter file."""
    where = tmp_path / "plugin"
    dist = where / "sweep_crash-0.1.dist-info"
    dist.mkdir(parents=True)
    (where / "sweep_crash.py").write_text(textwrap.dedent(CRASH_PLUGIN))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sweep-crash\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dpo]\nsweep-crash = sweep_crash\n")
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(where), *filter(None, [os.environ.get("PYTHONPATH")])]))
    counter = tmp_path / "crash-count"
    monkeypatch.setenv("SWEEP_CRASH_FILE", str(counter))
    return importlib.import_module("sweep_crash"), counter


def test_a_sweep_resumes_point_by_point(tmp_path, pairs, crash_plugin):
    """Two points, three steps each, a checkpoint every step. The second point crashes at step
    2: the sweep reports it, goes on, and exits 1. Run again, it keeps the first point (not
    rerun: its files are untouched) and resumes the second from checkpoint-1."""
    module, counter = crash_plugin
    counter.write_text("2")  # the second point to reach step 2 crashes
    cli = command_line(plugin_of(module.CrashOnce))
    out = tmp_path / "sw"
    args = ["sweep", "--grid", "beta=0.05,0.5", "--grid", "lr=1e-4", "--output", str(out),
            "--model", "tiny", "--data", str(pairs), "--eval-fraction", "0.25",
            "--max-steps", "3", "--eval-steps", "1", "--save-steps", "1", "--batch-size", "2",
            "--stop", "nan-guard", "--stop", "crash-once", "--no-progress"]
    first = cli(*args)
    assert first.exit_code == 1, first.output
    assert "1 of 2 points failed (beta=0.5,lr=0.0001)" in " ".join(first.output.split())
    record = json.loads((out / "sweep.json").read_text())
    assert [(p["name"], p["settings"], p["status"]) for p in record["points"]] == [
        ("beta=0.05,lr=0.0001", {"beta": 0.05, "lr": 0.0001}, "completed"),
        ("beta=0.5,lr=0.0001", {"beta": 0.5, "lr": 0.0001}, "failed (exit 1)")]
    assert [a["key"] for a in record["grid"]] == ["beta", "lr"]
    done, cut = out / "beta=0.05,lr=0.0001", out / "beta=0.5,lr=0.0001"
    run = json.loads((done / "run.json").read_text())
    assert run["config"]["options"]["dpo"]["beta"] == "0.05"
    assert run["resolved"]["options"]["dpo"]["beta"] == 0.05
    assert run["config"]["lr"] == 1e-4 and run["steps"] == 3
    assert json.loads((cut / "run.json").read_text())["status"].startswith("failed")
    kept = {p: p.stat().st_mtime_ns for p in [done / "run.json", *(done / "final").iterdir()]}

    # Another grid in the same directory is refused, and changes nothing.
    other = cli(*[a.replace("beta=0.05,0.5", "beta=0.1") for a in args])
    assert other.exit_code == 2
    assert "records another grid" in other.output and len(other.output.splitlines()) == 1

    second = command_line(plugin_of(module.CrashOnce))("sweep", "--resume", str(out))
    assert second.exit_code == 0, second.output
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    resumed = json.loads((cut / "run.json").read_text())
    assert resumed["status"] == "completed" and resumed["steps"] == 3
    assert Path(resumed["resumed_from"]).name == "checkpoint-1"
    record = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == ["completed", "completed"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "eval/loss" and summary["best"] in {
        "beta=0.05,lr=0.0001", "beta=0.5,lr=0.0001"}
    assert [r["final"]["step"] for r in summary["points"]] == [3, 3]

    # The table again, without running anything.
    shown = command_line()("sweep", "--summary", str(out))
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "best by eval/loss (lower is better)" in text
    assert f"best point: {summary['best']}" in text
    assert "final loss" in text and "best accuracy" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "beta=0.05,lr=0.0001", "beta=0.5,lr=0.0001", "summary.csv", "summary.json",
        "sweep.json"]


def test_an_sft_sweep_from_a_config_file(tmp_path, pairs):
    """The base config's objective picks `dpo sft`; the grid varies its learning rate."""
    config = tmp_path / "base.toml"
    config.write_text(f'objective = "sft"\nmodel = "tiny"\ndata = "{pairs}"\nmax_steps = 1\n'
                      'eval_fraction = 0.25\nprogress = false\n')
    out = tmp_path / "sw"
    result = command_line()("sweep", "--config", str(config), "--grid", "lr=1e-4",
                            "--output", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sweep.json").read_text())
    assert record["command"] == "sft" and record["config"]["table"]["max_steps"] == 1
    run = json.loads((out / "lr=0.0001" / "run.json").read_text())
    assert run["config"]["objective"] == "sft" and run["config"]["lr"] == 1e-4
    assert json.loads((out / "summary.json").read_text())["best"] == "lr=0.0001"
    # The config file changed: the sweep is another one.
    config.write_text(config.read_text().replace("max_steps = 1", "max_steps = 2"))
    again = command_line()("sweep", "--resume", str(out))
    assert again.exit_code == 2 and "records another base config" in again.output


def test_a_point_directory_that_holds_other_files_fails_the_point_and_is_left_alone(tmp_path,
                                                                                     pairs):
    """The first point's directory holds a user's file: that point fails without a run (the
    file stays), and --fail-fast stops there: the second point never starts."""
    out = tmp_path / "sw"
    args = ["--model", "tiny", "--data", str(pairs)]
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({
        "kind": sw.KIND, "command": "run", "config": None, "args": args,
        "grid": [{"key": "beta", "values": ["0.1", "0.2"]}], "points": []}))
    (out / "beta=0.1").mkdir()
    (out / "beta=0.1" / "notes.txt").write_text("mine")
    result = command_line()("sweep", "--grid", "beta=0.1,0.2", "--output", str(out), *args,
                            "--fail-fast")
    assert result.exit_code == 1, result.output
    assert "holds files that no run wrote" in " ".join(result.output.split())
    assert [p.name for p in (out / "beta=0.1").iterdir()] == ["notes.txt"]
    assert not (out / "beta=0.2").exists()
    record = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == [
        "failed: its directory holds files no run wrote", "pending"]


def _loss_parts(out: Path) -> list[dict]:
    return [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_a_grid_of_losses_trains_each_and_ranks_by_reward_accuracy(tmp_path, pairs):
    """--grid loss=dpo+ipo,dpo: a point trains dpo and ipo together (weights 1, 1: its step
    loss is loss/dpo + loss/ipo), the other dpo alone (no per-part metrics). eval/loss measures
    another objective at each point, so the summary ranks them by eval/rewards/accuracies."""
    out = tmp_path / "sw"
    result = command_line()("sweep", "--grid", "loss=dpo+ipo,dpo", "--output", str(out),
                            "--model", "tiny", "--data", str(pairs), "--backend", "cpu",
                            "--max-steps", "1", "--batch-size", "4", "--eval-fraction", "0.25",
                            "--no-eval-at-start", "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sweep.json").read_text())
    assert [(p["name"], p["settings"], p["status"]) for p in record["points"]] == [
        ("loss=dpo+ipo", {"loss": "dpo+ipo"}, "completed"),
        ("loss=dpo", {"loss": "dpo"}, "completed")]
    both, alone = out / "loss=dpo+ipo", out / "loss=dpo"
    assert json.loads((both / "run.json").read_text())["config"]["loss"] == "dpo+ipo"
    assert json.loads((alone / "run.json").read_text())["config"]["loss"] == "dpo"
    [step] = _loss_parts(both)
    assert step["loss"] == pytest.approx(step["loss/dpo"] + step["loss/ipo"], rel=1e-5)
    [step] = _loss_parts(alone)
    assert not any(k.startswith("loss/") for k in step)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["metric"], summary["mode"]) == ("eval/rewards/accuracies", "max")
    assert [r["final"]["step"] for r in summary["points"]] == [1, 1]


def test_a_grid_of_weights_separates_one_point_s_weights_with_colons(tmp_path, pairs):
    """--loss dpo --loss ipo --grid weights=1:0.2,1:0.5: two points, each trained with its
    weights (a step's loss is loss/dpo + w_ipo * loss/ipo) and recorded as a list; the summary
    shows them as the grid gives them."""
    out = tmp_path / "sw"
    result = command_line()("sweep", "--grid", "weights=1:0.2,1:0.5", "--output", str(out),
                            "--model", "tiny", "--data", str(pairs), "--backend", "cpu",
                            "--loss", "dpo", "--loss", "ipo", "--max-steps", "1",
                            "--batch-size", "4", "--no-eval-at-start", "--no-progress")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sweep.json").read_text())
    points = [(p["name"], p["settings"], p["status"]) for p in record["points"]]
    assert points == [("weights=1_0.2", {"weights": [1.0, 0.2]}, "completed"),
                      ("weights=1_0.5", {"weights": [1.0, 0.5]}, "completed")]
    for name, weight in (("weights=1_0.2", 0.2), ("weights=1_0.5", 0.5)):
        run = json.loads((out / name / "run.json").read_text())
        assert run["resolved"]["options"]["dpo+ipo"] == {"weights": [1.0, weight]}
        [step] = _loss_parts(out / name)
        assert step["loss"] == pytest.approx(step["loss/dpo"] + weight * step["loss/ipo"],
                                             rel=1e-5)
    with (out / "summary.csv").open() as fh:
        assert [r["weights"] for r in csv.DictReader(fh)] == ["1.0:0.2", "1.0:0.5"]
