"""What a run promises about the user's files and its own: --overwrite removes only what a run
wrote, and only in a run directory; no weights from a poisoned update are ever saved; Ctrl-C
leaves a checkpoint; resume works from nothing, from a damaged record, and leaves a finished run
as it was; a plugin that raises is one line and a "failed" record."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dpo
from dpo.cli import make_app
from dpo.core.training import strategy as strat
from dpo.core.interfaces.errors import DataError
from dpo.core.interfaces.plugins import get_plugin_manager, register_plugin
from dpo.core.training.report import read_metrics, truncate_metrics
from dpo.testing import plugin_of, write_arithmetic_pairs


class Interrupter(dpo.StoppingPolicy):
    """Sends this process SIGINT (Ctrl-C) after a chosen step, as a user at the keyboard would."""

    name = "interrupt-at"
    at: int | None = None
    times = 1

    def on_step(self, step, metrics):
        if step == Interrupter.at:
            for _ in range(Interrupter.times):
                os.kill(os.getpid(), signal.SIGINT)
        return dpo.CONTINUE


class Raises(dpo.StoppingPolicy):
    """A stopping policy with a bug: it raises at step 2."""

    name = "raises"

    def on_step(self, step, metrics):
        if step == 2:
            raise ZeroDivisionError("division by zero in the policy")
        return dpo.CONTINUE


class BrokenLoss(dpo.Loss):
    """A loss plugin with a bug: its formula raises."""

    name = "broken"

    def __call__(self, logps):
        raise ValueError("shapes do not match\nsecond line")


@pytest.fixture
def invoke():
    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, plugin_of(Interrupter, Raises, BrokenLoss), "reliability-test")
    app = make_app(pm)

    def call(*args: str):
        return CliRunner().invoke(app, ["run", "--no-progress", *(str(a) for a in args)])

    return call


def args(tmp_path: Path, out: Path | str, steps: int = 4, *more: str) -> list[str]:
    """A tiny run; a constant learning rate, so that a run extended by --resume --max-steps
    takes the same steps as one given all its steps at once."""
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_arithmetic_pairs(data)
    return ["--model", "tiny", "--data", str(data), "--backend", "cpu", "--max-steps", str(steps),
            "--lr", "1e-3", "--batch-size", "4", "--scheduler", "constant", "--warmup-steps", "0",
            "--output", str(out), *more]


def one_line(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# -- what may be an output, and what --overwrite removes -------------------------------------

@pytest.mark.parametrize("output", [".", "", "HOME", "/", "..", "CWD"])
def test_the_current_directory_home_root_and_an_empty_path_are_never_an_output(
        tmp_path, invoke, monkeypatch, output):
    """Each is refused with one line before anything is read or written, with or without
    --overwrite; the files in the current directory stay exactly as they were."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(cwd))
    output = {"HOME": str(cwd), "CWD": str(cwd)}.get(output, output)
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        result = invoke(*args(tmp_path, output), *extra)
        line = one_line(result, 2, "--output")
        assert "never a run directory" in line or "is empty" in line
    write_arithmetic_pairs(tmp_path / "pairs.jsonl")  # args() wrote it: the only change
    assert tree(tmp_path) == {**before, "pairs.jsonl": (tmp_path / "pairs.jsonl").read_bytes()}


def test_overwrite_leaves_a_directory_that_is_not_a_run_alone(tmp_path, invoke):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "notes").write_text("also mine")
    before = tree(out)
    one_line(invoke(*args(tmp_path, out), "--overwrite"), 2, str(out), "not a dpo run directory",
             "choose another --output")
    assert tree(out) == before


def test_overwrite_replaces_only_what_the_run_wrote(tmp_path, invoke):
    """A run directory where the user has since put a file of their own and a folder named
    like a checkpoint: --overwrite replaces the run's files and keeps the user's."""
    out = tmp_path / "out"
    assert invoke(*args(tmp_path, out, 2)).exit_code == 0
    (out / "analysis.ipynb").write_text("{}")
    (out / "checkpoint-99").mkdir()
    (out / "checkpoint-99" / "my.txt").write_text("mine")
    old = record(out)["started"]
    result = invoke(*args(tmp_path, out, 3), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "analysis.ipynb").read_text() == "{}"
    assert (out / "checkpoint-99" / "my.txt").read_text() == "mine"
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-3").is_dir()
    assert record(out)["steps"] == 3 and record(out)["resumes"] == []
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert record(out)["started"] >= old


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_output_that_cannot_be_a_directory_is_refused_before_any_work(
        tmp_path, invoke, monkeypatch, where):
    """Found before the model is loaded: loading it would fail this test."""
    import dpo.core.training.run as run_module

    monkeypatch.setattr(run_module, "load_model",
                        lambda *a, **k: pytest.fail("the model was loaded before the check"))
    target = tmp_path / "taken.txt"
    target.write_text("a file")
    output = target if where == "file" else target / "out"
    one_line(invoke(*args(tmp_path, output)), 2, str(output), "directory")
    assert target.read_text() == "a file"


# -- a checkpoint that is saved is good -----------------------------------------------------

POISON = ["--lr", "3e38", "--weight-decay", "2", "--warmup-steps", "0"]


def test_a_poisoned_update_is_never_saved(tmp_path, invoke):
    """A learning rate far too high: step 1's loss (ln 2) and gradient are finite, so the update
    is applied, and AdamW's decay multiplies every weight by 1 - lr * weight_decay = 1 - 6e38,
    past float32's largest value (3.4e38): the weights become inf (nan where they were 0). The
    run fails at once with one line; no checkpoint, no final/, and the record says failed.
    (Intel's fused AdamW refuses the product lr * weight_decay as a float32 and raises in the
    step instead: the same line, saying so, and the same outcome on disk.)"""
    out = tmp_path / "out"
    result = invoke(*args(tmp_path, out, 4, "--save-steps", "1", *POISON, "--stop", "nan-guard"))
    one_line(result, 1, "step 1's update", "nothing from it was saved", "lower --lr")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "run.json"]
    assert record(out)["status"].startswith("failed: step 1's update")


def test_a_poisoned_update_after_a_checkpoint_names_that_checkpoint(tmp_path, invoke):
    """Two good steps at a sane learning rate and a checkpoint; then --resume with the new
    --lr and --weight-decay (both honoured from there on) poisons step 3: checkpoint-2 stays
    the newest and the error names it."""
    out = tmp_path / "out"
    assert invoke(*args(tmp_path, out, 2, "--save-steps", "1")).exit_code == 0
    result = invoke("--resume", out, "--max-steps", "4", *POISON)
    one_line(result, 1, "step 3's update", "resume from checkpoint-2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_the_finite_flag_sees_parameters_and_optimizer_state():
    """The flag is 0 when every value is finite, 1 for a nan or inf in a parameter or in
    AdamW's moments (exp_avg_sq can overflow while the weights are fine); a huge finite value
    whose square overflows the fused norm raises the flag too, and the exact check, run only
    then, clears it."""
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    params = list(layer.parameters())

    def flag() -> float:
        return strat.nonfinite_flag(params, optimizer).item()

    assert flag() == 0.0 and strat.exactly_finite(params, optimizer)
    optimizer.state[layer.weight]["exp_avg_sq"][0, 0] = math.inf
    assert flag() == 1.0 and not strat.exactly_finite(params, optimizer)
    optimizer.state[layer.weight]["exp_avg_sq"][0, 0] = 0.0
    with torch.no_grad():
        layer.bias[1] = math.nan
    assert flag() == 1.0 and not strat.exactly_finite(params, optimizer)
    with torch.no_grad():  # finite, though its square (1e60) overflows float32's 3.4e38
        layer.bias[1] = 1e30
    assert flag() == 1.0 and strat.exactly_finite(params, optimizer)


def test_a_poisoned_update_is_found_with_the_next_steps_metrics(tmp_path, invoke):
    """Without a checkpoint at step 1, the flag of step 1's update is read with step 2's
    metrics (no host read of its own): the run fails there, naming step 1, and step 2's
    metrics (computed on poisoned weights) are not recorded."""
    out = tmp_path / "out"
    result = invoke(*args(tmp_path, out, 4, "--save-steps", "0", *POISON))
    line = one_line(result, 1, "step 1's update", "start again with a lower --lr")
    # Intel's fused AdamW raises inside step 1 (see above): then not even step 1 is recorded.
    recorded = [] if "failed in the optimizer" in line else [1]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == recorded
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "run.json"]


def test_a_half_written_metrics_line_is_dropped_and_complete_lines_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    truncate_metrics(path, 5)
    assert path.read_text() == '{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n'
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage inside: not a kill mid-write
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(path)


def test_resume_after_a_kill_mid_write_of_metrics(tmp_path, invoke):
    """A run killed while writing step 4's line: the resumed run keeps steps 1-2 (up to its
    checkpoint), rewrites 3-4 and ends equal to an uninterrupted run."""
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert invoke(*args(tmp_path, straight, 4)).exit_code == 0
    assert invoke(*args(tmp_path, out, 2, "--save-steps", "2")).exit_code == 0
    data = record(out)
    data["status"] = "running"  # as a kill leaves it
    (out / "run.json").write_text(json.dumps(data))
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss": 0.69}\n{"step": 4, "lo')
    result = invoke("--resume", out, "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert same_weights(straight / "final", out / "final")


# -- resume ------------------------------------------------------------------------------------

def test_resume_from_nothing_starts_again_in_that_directory(tmp_path, invoke):
    """Killed before its first checkpoint, a run leaves run.json ("running") and maybe some
    metrics: --resume starts it again from step 0 there, and ends as a fresh run would."""
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert invoke(*args(tmp_path, fresh, 3)).exit_code == 0
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "running", "config": record(fresh)["config"]
                                              | {"output": str(out)}}))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"st')
    again = invoke(*args(tmp_path, out, 3))
    one_line(again, 2, "already holds files", f"--resume {out}")
    result = invoke("--resume", out)
    assert result.exit_code == 0, result.output
    assert "no checkpoint yet; starting the run again from step 0" in " ".join(result.output.split())
    assert record(out)["status"] == "completed"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert same_weights(fresh / "final", out / "final")


def test_resume_of_a_finished_run_leaves_it_as_it_was(tmp_path, invoke):
    out = tmp_path / "out"
    assert invoke(*args(tmp_path, out, 2)).exit_code == 0
    before = tree(out)
    result = invoke("--resume", out)
    assert result.exit_code == 0, result.output
    assert "already complete (completed, 2 steps)" in " ".join(result.output.split())
    assert tree(out) == before
    # More steps asked for: the run goes on from its last checkpoint, its start kept.
    started = record(out)["started"]
    longer = invoke("--resume", out, "--max-steps", "3")
    assert longer.exit_code == 0, longer.output
    assert record(out)["steps"] == 3 and record(out)["started"] == started
    assert [r["from"] for r in record(out)["resumes"]] == ["checkpoint-2"]


def test_a_damaged_run_record_is_rebuilt_from_the_newest_checkpoint(tmp_path, invoke):
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert invoke(*args(tmp_path, straight, 4)).exit_code == 0
    assert invoke(*args(tmp_path, out, 2)).exit_code == 0
    (out / "run.json").write_text('{"status": "runn')
    result = invoke("--resume", out, "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert record(out)["status"] == "completed" and record(out)["config"]["lr"] == 1e-3
    assert same_weights(straight / "final", out / "final")
    (out / "run.json").write_text("{")
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "trainer_state.json").write_text("{")
    one_line(invoke("--resume", out), 2, "run.json: damaged")


def test_without_keep_checkpoints_a_complete_run_keeps_only_its_model(tmp_path, invoke):
    out = tmp_path / "out"
    result = invoke(*args(tmp_path, out, 2, "--save-steps", "1", "--no-keep-checkpoints"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl", "run.json"]
    one_line(invoke("--resume", out, "--max-steps", "3"), 2, "checkpoints were removed",
             f"--model {out / 'final'}")


# -- Ctrl-C ------------------------------------------------------------------------------------

def test_ctrl_c_checkpoints_the_step_and_resume_ends_as_an_uninterrupted_run(tmp_path, invoke):
    """Ctrl-C during step 2 (the demo saves only at the end, so there is no checkpoint yet):
    the step finishes, checkpoint-2 is written, the record says interrupted, exit 130; the
    resumed run ends bitwise equal to one never interrupted."""
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert invoke(*args(tmp_path, straight, 4, "--save-steps", "0")).exit_code == 0
    Interrupter.at, Interrupter.times = 2, 1
    result = invoke(*args(tmp_path, out, 4, "--save-steps", "0", "--stop", "interrupt-at"))
    one_line(result, 130, "stopped on request at step 2", f"--resume {out}", "checkpoint-2")
    assert (out / "checkpoint-2").is_dir() and not (out / "final").exists()
    assert record(out)["status"].startswith("interrupted: ")
    Interrupter.at = None
    resumed = invoke("--resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert same_weights(straight / "final", out / "final")


def test_a_second_ctrl_c_stops_at_once_and_says_how_to_go_on(tmp_path, invoke):
    out = tmp_path / "out"
    Interrupter.at, Interrupter.times = 2, 2
    try:
        result = invoke(*args(tmp_path, out, 4, "--save-steps", "0", "--stop", "interrupt-at"))
    finally:
        Interrupter.at, Interrupter.times = None, 1
    one_line(result, 130, "before the first checkpoint", f"--resume {out}", "step 0")
    assert not list(out.glob("checkpoint-*"))
    assert record(out)["status"].startswith("interrupted: ")


def test_ctrl_c_before_training_leaves_a_resumable_record(tmp_path, invoke, monkeypatch):
    import dpo.core.training.run as run_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "check_paths", interrupted)  # once run.json is written
    out = tmp_path / "out"
    one_line(invoke(*args(tmp_path, out)), 130, "interrupted before the first checkpoint")
    assert record(out)["status"].startswith("interrupted")
    monkeypatch.undo()
    assert invoke("--resume", out).exit_code == 0


# -- plugins that raise ---------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragments", [
    (["--loss", "broken"], ["loss 'broken' raised ValueError", "shapes do not match"]),
    (["--stop", "raises"], ["stopping policy 'raises' raised ZeroDivisionError"]),
])
def test_a_plugin_that_raises_mid_run_is_one_line_and_a_failed_record(tmp_path, invoke, flags,
                                                                       fragments):
    out = tmp_path / "out"
    line = one_line(invoke(*args(tmp_path, out, 4), *flags), 1, *fragments)
    assert "second line" not in line
    assert record(out)["status"].startswith("failed: ")
