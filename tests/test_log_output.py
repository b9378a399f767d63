"""Output that is not a terminal (a log file, a pipe, CI): never wrapped, whatever ``COLUMNS`` or
the length of a path, and progress as a plain line now and then instead of a live bar."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.training import report
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.core.training.report import Reporter
from dpo.testing import write_arithmetic_pairs


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def log_file() -> tuple[Console, io.StringIO]:
    """A console writing to a file, as a run's console is under nohup or in a batch job."""
    buffer = io.StringIO()
    return Console(file=buffer, soft_wrap=True, width=report.UNWRAPPED_WIDTH), buffer


def long_path(tmp_path: Path) -> Path:
    """A directory whose path is well over 200 characters, in names of 40."""
    path = tmp_path.joinpath(*[f"a-rather-long-directory-name-number-{i:04d}" for i in range(6)])
    path.mkdir(parents=True)
    return path


@pytest.fixture
def cli():
    app = make_app(get_plugin_manager(load_entrypoints=False))
    return lambda *args: CliRunner().invoke(app, list(args))


# -- no wrapping -------------------------------------------------------------------------------

def test_a_run_console_off_a_terminal_never_wraps(monkeypatch, capsys, tmp_path):
    """COLUMNS=20 and a 300-character message: one line on stderr, exactly the message."""
    monkeypatch.setenv("COLUMNS", "20")
    message = f"reference log-probs: all 24 pairs read from {long_path(tmp_path) / 'ref.safetensors'}"
    assert len(message) > 250
    Reporter(tmp_path, progress=False).info(message)
    assert capsys.readouterr().err == message + "\n"


def test_long_paths_and_narrow_columns_keep_run_messages_whole(tmp_path, cli, monkeypatch):
    """A real run (tiny model) under COLUMNS=20 with its reference file and output deep in a
    long path: the run's messages naming them are whole lines of the output."""
    monkeypatch.setenv("COLUMNS", "20")
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    deep = long_path(tmp_path)
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    ref = deep / "ref.safetensors"
    args = ["run", "--no-progress", "--model", "tiny", "--data", str(data), "--backend", "cpu",
            "--max-steps", "1", "--batch-size", "4", "--ref-logps", str(ref)]
    first = cli(*args, "--output", str(deep / "a"))
    assert first.exit_code == 0, first.output
    assert f"completed after 1 steps -> {deep / 'a'}" in first.output.splitlines()
    again = cli(*args, "--output", str(deep / "b"))
    assert again.exit_code == 0, again.output
    assert f"reference log-probs: all 24 pairs read from {ref}" in again.output.splitlines()


# -- plain progress lines ----------------------------------------------------------------------

def test_training_progress_in_a_log_is_a_line_every_interval(tmp_path):
    """10 steps, interval 30 s, the clock starting at 1000 when training starts.

    step 1 at t+5: the first line, always; rate 1 step / 5 s, 9 left: ETA 45 s.
    step 2 at t+20: 15 s since the last line: nothing.
    step 3 at t+40: 35 s since: a line; rate 3 / 40 s, 7 left: 93.3 s, "ETA 1m33s".
    steps 4-9 at t+50 .. t+60 (under 30 s since t+40): nothing.
    step 10 at t+61: the last, always, with the time taken instead of an ETA: 61 s, "1m01s".
    """
    console, out = log_file()
    clock = FakeClock()
    reporter = Reporter(tmp_path, console=console, interval=30, clock=clock)
    reporter.start(total_steps=10, done=0)
    metrics = {"loss": 0.6931, "rewards/accuracies": 0.5, "tokens_per_second": 1234.4}
    for step, at in [(1, 5), (2, 20), (3, 40), (4, 50), (5, 52), (6, 54), (7, 56), (8, 58),
                     (9, 60), (10, 61)]:
        clock.now = 1000 + at
        reporter.step(step, metrics)
    reporter.close()
    assert out.getvalue().splitlines() == [
        "step 1/10  loss 0.6931  acc 0.5  tokens/s 1,234  ETA 45s",
        "step 3/10  loss 0.6931  acc 0.5  tokens/s 1,234  ETA 1m33s",
        "step 10/10  loss 0.6931  acc 0.5  tokens/s 1,234  took 1m01s",
    ]


def test_a_resumed_run_counts_its_rate_from_where_it_resumed(tmp_path):
    """Resumed at step 100 of 200: step 101 after 10 s is 1 step / 10 s, 99 left: 990 s,
    "ETA 16m30s". A run stopped early (at 102) ends with its last step's line on close."""
    console, out = log_file()
    clock = FakeClock()
    reporter = Reporter(tmp_path, console=console, interval=30, clock=clock)
    reporter.start(total_steps=200, done=100)
    clock.now += 10
    reporter.step(101, {"loss": 0.5, "rewards/accuracies": 1.0, "tokens_per_second": 10.0})
    clock.now += 5
    reporter.step(102, {"loss": 0.25, "rewards/accuracies": 1.0, "tokens_per_second": 10.0})
    reporter.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 101/200  loss 0.5  acc 1  tokens/s 10  ETA 16m30s"
    # at step 102, 15 s in: 2 steps / 15 s, 98 left: 735 s = 12m15s
    assert lines[1:] == ["step 102/200  loss 0.25  acc 1  tokens/s 10  ETA 12m15s"]


def test_a_pass_before_training_reports_done_total_and_eta(tmp_path):
    """Scoring 384 pairs, 64 a batch, a batch every 10 s, interval 30 s: lines at the first
    batch (64 after 10 s: 320 left at 6.4/s, 50 s), then at 40 s (256 pairs: 128 left at
    6.4/s, 20 s), then the last (384 at 60 s: took 1m00s)."""
    console, out = log_file()
    clock = FakeClock()
    reporter = Reporter(tmp_path, console=console, interval=30, clock=clock)
    with reporter.task("reference", 384) as advance:
        for _ in range(6):
            clock.now += 10
            advance(64)
    assert out.getvalue().splitlines() == [
        "reference 64/384  ETA 50s",
        "reference 256/384  ETA 20s",
        "reference 384/384  took 1m00s",
    ]


def test_no_progress_silences_the_plain_lines(tmp_path):
    console, out = log_file()
    reporter = Reporter(tmp_path, console=console, progress=False, interval=0, clock=FakeClock())
    reporter.start(total_steps=2, done=0)
    with reporter.task("reference", 4) as advance:
        advance(4)
    reporter.step(1, {"loss": 0.5})
    reporter.step(2, {"loss": 0.5})
    reporter.close()
    assert out.getvalue() == ""


def test_a_terminal_keeps_the_live_bar(tmp_path):
    """An interactive console gets rich's bar, not the plain lines."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, force_interactive=True, width=100)
    reporter = Reporter(tmp_path, console=console, interval=0, clock=FakeClock())
    reporter.start(total_steps=2, done=0)
    reporter.step(1, {"loss": 0.5, "rewards/accuracies": 1.0, "tokens_per_second": 10.0})
    reporter.step(2, {"loss": 0.5, "rewards/accuracies": 1.0, "tokens_per_second": 10.0})
    reporter.close()
    assert "step 1/2" not in buffer.getvalue() and "━" in buffer.getvalue()


def test_the_interval_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(report.PROGRESS_INTERVAL_ENV, "120")
    assert report.progress_interval() == 120
    monkeypatch.delenv(report.PROGRESS_INTERVAL_ENV)
    assert report.progress_interval() == report.DEFAULT_PROGRESS_INTERVAL
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(report.PROGRESS_INTERVAL_ENV, bad)
        with pytest.raises(UsageError, match=f"{report.PROGRESS_INTERVAL_ENV}={bad}: not a number"):
            Reporter(tmp_path)


def test_a_run_into_a_log_prints_step_lines(tmp_path, cli, monkeypatch):
    """`dpo run` with its output going to a file and an interval of 0: a line for each of the
    3 steps and each reference batch, the last step with the time taken; `--no-progress`: none."""
    monkeypatch.setenv(report.PROGRESS_INTERVAL_ENV, "0")
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl", n=8)
    args = ["run", "--model", "tiny", "--data", str(data), "--backend", "cpu", "--max-steps", "3",
            "--batch-size", "4", "--no-eval-at-start"]
    result = cli(*args, "--output", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(" loss " in line and " acc " in line and " tokens/s " in line for line in steps)
    assert " ETA " in steps[0] and " took " in steps[-1]
    passes = [line.split()[1] for line in lines if re.match(r"reference \d+/\d+", line)]
    assert passes == ["4/8", "8/8"]
    quiet = cli(*args, "--no-progress", "--output", str(tmp_path / "b"))
    assert quiet.exit_code == 0, quiet.output
    assert not [line for line in quiet.output.splitlines()
                if re.match(r"(step|reference) \d+/\d+", line)]
