"""Stopping policies under two processes (gloo on CPU): a stop or pause that one process's
policies decide is every process's, with the same reason; budget's limits (max_time,
max_pairs, max_tokens) are taken under --nproc and count the run's pairs and tokens over every
process, as one process counts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpo.core.training.loop import TIMING_KEYS
from dpo.testing import write_arithmetic_pairs as write_pairs

pytestmark = pytest.mark.distributed

TIMEOUT = 180  # seconds per run: processes that disagree would wait on each other; fail instead
METRIC_TOL = 1e-5  # as tests/test_distributed.py: only the summation order differs

# A policy for the runs' processes (installed through a dist-info on PYTHONPATH) that pauses
# the run at step $RANK_PAUSE_AT on the process of rank 1 alone: rank 0, which writes run.json,
# decides nothing, so the pause and its reason can only reach it from rank 1.
RANK_PAUSE = '''
import os

import dpo
from dpo.core.interfaces.stopping import CONTINUE, Decision, StoppingPolicy


class RankPause(StoppingPolicy):
    name = "rank-pause"

    def on_step(self, step, metrics):
        rank = int(os.environ.get("RANK", 0))
        if rank == 1 and step == int(os.environ["RANK_PAUSE_AT"]):
            return Decision(stop=True, resumable=True, reason=f"rank {rank} asked at step {step}")
        return CONTINUE


@dpo.hookimpl
def dpo_register_stopping_policies(register):
    register(RankPause)
'''

# 24 pairs, 6 held out: 18 training pairs, two micro-batches a step (of up to 4 pairs in one
# process, up to 2 per process under two), which the sampler fills with 6 and then 8 pairs.
COMMON = ["--model", "tiny", "--data", "pairs.jsonl", "--eval-fraction", "0.25",
          "--max-steps", "3", "--lr", "1e-3", "--scheduler", "constant", "--grad-accum", "2",
          "--no-progress", "--stop", "rank-pause", "--stop", "budget",
          "-o", "budget.max_time=1h", "-o", "budget.max_pairs=14"]


@pytest.fixture
def root(tmp_path):
    where = tmp_path / "plugin"
    info = where / "rank_pause-0.1.dist-info"
    info.mkdir(parents=True)
    (where / "rank_pause.py").write_text(textwrap.dedent(RANK_PAUSE))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rank-pause\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dpo]\nrank-pause = rank_pause\n")
    write_pairs(tmp_path / "pairs.jsonl")
    return tmp_path


def dpo_run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               RANK_PAUSE_AT="1", PYTHONPATH=os.pathsep.join(
                   [str(root / "plugin"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, "-m", "dpo", "run", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def counted(row: dict, what: str) -> int:
    """The step's pairs or tokens as budget reads them back from its speed and time."""
    return round(row[f"{what}_per_second"] * row["step_time"])


def test_one_process_s_pause_is_every_process_s_and_budget_counts_the_run(root):
    """Under --nproc 2, rank-pause pauses at step 1 on rank 1 only: the run pauses there on
    both (exit 0, checkpoint-1, no final/), with rank 1's reason in rank 0's run.json. Resumed,
    budget (max_time 1h, max_pairs 14) ends it at 6 + 8 = 14 pairs at step 2, as one process
    does with the same global batch: the same step, status and metrics, and each step's
    pairs and tokens over both processes equal to one process's."""
    single = dpo_run(root, *COMMON, "--batch-size", "4", "--output", "single")
    assert single.returncode == 0, single.stderr[-3000:]
    ended = "stopped by budget: 14 pairs at step 2 reached max_pairs=14"
    assert (run_record(root / "single")["status"], run_record(root / "single")["steps"]) == (
        ended, 2)

    two = dpo_run(root, *COMMON, "--batch-size", "2", "--nproc", "2", "--output", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    record = run_record(root / "two")
    assert record["status"] == "paused by rank-pause: rank 1 asked at step 1"
    assert record["steps"] == 1 and record["resolved"]["world_size"] == 2
    assert (root / "two/checkpoint-1").is_dir() and not (root / "two/final").exists()

    resumed = dpo_run(root, "--resume", "two", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = run_record(root / "two")
    assert (record["status"], record["steps"]) == (ended, 2) and (root / "two/final").is_dir()

    a, b = rows(root / "single"), rows(root / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x.keys() - TIMING_KEYS:
            assert y[key] == pytest.approx(x[key], rel=METRIC_TOL, abs=METRIC_TOL), (x["step"], key)
    steps = [(x, y) for x, y in zip(a, b) if "loss" in x]
    assert [counted(y, "samples") for _, y in steps] == [counted(x, "samples") for x, _ in steps]
    assert [counted(x, "samples") for x, _ in steps] == [6, 8]
    assert [counted(y, "tokens") for _, y in steps] == [counted(x, "tokens") for x, _ in steps]
