"""Runs past one process: torchrun with 2 CPU processes over gloo, DDP and FSDP2, against one
process with the same global batch.

Tolerance: per-step metrics within 1e-5 (relative and absolute) and final weights within 1e-4
absolute. The runs see the same pairs in each optimizer step (BatchSampler cuts each global step
first, then deals it to the ranks), so they differ only in floating-point summation order: each
rank sums its own pairs and the all-reduce adds the ranks' sums, where one process sums all
pairs at once (and pads each micro-batch to its own longest row). That is about 1 ulp of the
summed log-probs (~2e-6 measured on values near -20). Adam then divides by sqrt(v): for weights
whose gradients are nearly zero that rounding is amplified, but an Adam step moves a weight by
at most about lr (1e-3 here); 1e-4 is a tenth of one step (max measured: about 1e-5).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.training.loop import TIMING_KEYS
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.testing import write_arithmetic_pairs as write_pairs

pytestmark = pytest.mark.distributed

TIMEOUT = 300  # seconds per launched run: a hang fails the test instead of blocking CI
METRIC_TOL = 1e-5
WEIGHT_TOL = 1e-4
# 24 pairs, 6 held out: 18 training pairs, 8 per optimizer step (4 x 2 micro-batches in one
# process; 2 x 2 micro-batches on each of 2 ranks), so steps of 8, 8 and 2 pairs per epoch.
COMMON = ["--model", "tiny", "--eval-fraction", "0.25", "--max-steps", "3", "--lr", "1e-3",
          "--scheduler", "constant", "--grad-accum", "2", "--save-steps", "1",
          "--no-progress"]




def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "dpo", "run", *args]
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def dpo_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo", "run", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def steps(out: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_metrics_close(a: Path, b: Path) -> float:
    ra, rb = steps(a), steps(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    worst = 0.0
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=METRIC_TOL, abs=METRIC_TOL), (x["step"], key)
            worst = max(worst, abs(x[key] - y[key]))
    return worst


def assert_weights_close(a: Path, b: Path, tol: float = WEIGHT_TOL) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, worst
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run (4 pairs x 2 micro-batches) for the others to match."""
    root = tmp_path_factory.mktemp("dist")
    write_pairs(root / "pairs.jsonl")
    done = dpo_run(*COMMON, "--data", "pairs.jsonl", "--batch-size", "4", "--output", "single",
                   cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_ddp_via_nproc_matches_one_process(runs):
    done = dpo_run(*COMMON, "--data", "pairs.jsonl", "--batch-size", "2", "--nproc", "2",
                   "--output", "ddp", cwd=runs)
    assert done.returncode == 0, done.stderr[-3000:]
    print("ddp metrics max diff", assert_metrics_close(runs / "single", runs / "ddp"))
    print("ddp weights max diff", assert_weights_close(runs / "single/final", runs / "ddp/final"))
    run = json.loads((runs / "ddp/run.json").read_text())
    assert run["status"] == "completed"
    assert (run["resolved"]["world_size"], run["resolved"]["strategy"]) == (2, "ddp")


def test_fsdp_matches_one_process_and_saves_plain_hf(runs):
    done = torchrun(*COMMON, "--data", "pairs.jsonl", "--batch-size", "2", "--strategy", "fsdp",
                    "--output", "fsdp", cwd=runs)
    assert done.returncode == 0, done.stderr[-3000:]
    print("fsdp metrics max diff", assert_metrics_close(runs / "single", runs / "fsdp"))
    print("fsdp weights max diff",
          assert_weights_close(runs / "single/final", runs / "fsdp/final"))
    from transformers import AutoModelForCausalLM

    for directory in ("final", "checkpoint-3"):
        model = AutoModelForCausalLM.from_pretrained(runs / "fsdp" / directory)
        saved = load_file(runs / "fsdp" / directory / "model.safetensors")
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())
    record = json.loads((runs / "fsdp/checkpoint-3/trainer_state.json").read_text())
    assert record["distributed"] == {"world_size": 2, "strategy": "fsdp"}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_checkpointing_on_two_ranks_matches_one_process(runs, strategy):
    """Our per-layer checkpoint wraps each layer's forward, inside the hooks DDP and FSDP2 put
    on its call: recomputed in backward, the layers still give the single-process run (which
    does not checkpoint). DDP keeps the shared prompt, FSDP runs padded rows."""
    out = f"{strategy}-checkpointed"
    done = torchrun(*COMMON, "--data", "pairs.jsonl", "--batch-size", "2", "--strategy",
                    strategy, "--gradient-checkpointing", "--output", out, cwd=runs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_metrics_close(runs / "single", runs / out)
    assert_weights_close(runs / "single/final", runs / out / "final")
    resolved = json.loads((runs / out / "run.json").read_text())["resolved"]
    assert resolved["share_prompt"] is (strategy == "ddp")


def test_fsdp_resume_equals_uninterrupted_and_checks_world_size(runs):
    """Stop at step 2 (as a crash after checkpoint-2 would leave it), resume to step 3: the
    same weights as the uninterrupted FSDP run, exactly up to the same 2-rank arithmetic."""
    if not (runs / "fsdp/final").is_dir():
        pytest.skip("needs test_fsdp_matches_one_process_and_saves_plain_hf's run")
    args = [*COMMON[:COMMON.index("--max-steps")], *COMMON[COMMON.index("--max-steps") + 2:],
            "--data", "pairs.jsonl", "--batch-size", "2", "--strategy", "fsdp"]
    done = torchrun(*args, "--max-steps", "2", "--output", "part", cwd=runs)
    assert done.returncode == 0, done.stderr[-3000:]

    # Another world size: one line, exit 2, nothing written (through --nproc and without).
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (runs / "part").rglob("*"))
    one = dpo_run("--resume", "part", "--max-steps", "3", cwd=runs)
    assert one.returncode == 2
    assert "written by 2 process(es); resume it with 2, not 1" in one.stderr
    assert "Traceback" not in one.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (runs / "part").rglob("*")) == before

    done = torchrun("--resume", "part", "--max-steps", "3", cwd=runs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_weights_close(runs / "fsdp/final", runs / "part/final", tol=0.0)
    train = [r for r in steps(runs / "part") if "grad_norm" in r]
    assert train == [r for r in steps(runs / "fsdp") if "grad_norm" in r]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_on_two_ranks_matches_one_process(tmp_path, strategy):
    """A LoRA adapter on two ranks, with the reference as the policy's adapter switched off
    in every step (--no-precompute-ref: the wrapped model runs twice per batch, once without
    the adapter), matches one process: every metric of every step and the adapter's weights."""
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    write_pairs(tmp_path / "pairs.jsonl")
    lora = [*COMMON, "--data", "pairs.jsonl", "--lora", "-o", "lora.r=4", "--lr", "1e-2",
            "--no-precompute-ref"]
    done = dpo_run(*lora, "--batch-size", "4", "--output", "single", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = dpo_run(*lora, "--batch-size", "2", "--nproc", "2", "--strategy", strategy,
                   "--output", strategy, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"lora {strategy} metrics max diff",
          assert_metrics_close(tmp_path / "single", tmp_path / strategy))
    wa, wb = (load_file(tmp_path / d / "final" / "adapter_model.safetensors")
              for d in ("single", strategy))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= WEIGHT_TOL


def write_demonstrations(path: Path, n: int = 24) -> Path:
    """Completions of 1 to 6 words: the ranks' shares of a step hold different token counts."""
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"Say {i} ", "completion": " ".join(["yes"] * (i % 6 + 1))})
                     + "\n")
    return path


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sft_on_two_ranks_matches_one_process(tmp_path, strategy):
    """SFT's loss is a mean over the step's tokens. The two ranks' shares of a step hold
    different numbers of tokens, so each rank divides its sum by the step's tokens over both
    ranks (known on every rank from the data order): the same step as one process, where a
    mean of the ranks' own token means would not be."""
    write_demonstrations(tmp_path / "demos.jsonl")
    args = [*COMMON, "--data", "demos.jsonl"]
    single = subprocess.run([sys.executable, "-m", "dpo", "sft", *args, "--batch-size", "4",
                             "--output", "single"], cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-3000:]
    # DDP through the --nproc launcher, FSDP under torchrun directly: both ways of launching.
    launcher = ([sys.executable, "-m", "dpo", "sft", "--nproc", "2"] if strategy == "ddp" else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "-m", "dpo", "sft"])
    command = [*launcher, *args, "--batch-size", "2", "--strategy", strategy, "--output", "two"]
    two = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_metrics_close(tmp_path / "single", tmp_path / "two")
    assert_weights_close(tmp_path / "single/final", tmp_path / "two/final")


def write_unpaired_answers(path: Path, n: int = 16) -> Path:
    """Sums with one shared completion, " 7.", labelled desirable where it is the answer
    (about two in three: the policy raises " 7." on the whole, so the KL estimate rises above
    0 and the reference point takes part)."""
    with path.open("w") as fh:
        for i in range(n):
            a = i % 6 + 1 if i % 3 else i % 5 + 1
            b = 7 - a if i % 3 else a + 1
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}?", "completion": " 7.",
                                 "label": a + b == 7}) + "\n")
    return path


def test_kto_on_two_ranks_matches_one_process(tmp_path):
    """KTO's reference point z is a mean over the micro-batch's mismatched rows (each prompt
    with another example's completion), summed and counted over the ranks before dividing.
    With one completion shared by every example the mismatched rows are the micro-batch's
    examples whichever way they are split, and rank r's micro-batch k holds every other
    example of one process's micro-batch k (BatchSampler): so z, the loss, every per-label
    metric and the weights of 2 ranks x 2 examples match one process's 4, up to summation
    order. 16 examples, no held-out share: 2 steps of 8 per epoch, 4 steps."""
    write_unpaired_answers(tmp_path / "answers.jsonl")
    kto = ["--model", "tiny", "--data", "answers.jsonl", "--loss", "kto", "--max-steps", "4",
           "--lr", "1e-3", "--scheduler", "constant", "--grad-accum", "2", "--no-progress"]
    done = dpo_run(*kto, "--batch-size", "4", "--output", "single", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = dpo_run(*kto, "--batch-size", "2", "--nproc", "2", "--output", "two", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = steps(tmp_path / "single")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["kl"] > 0  # the estimate moved off 0 as the policy left its reference
    assert 0 < rows[0]["fraction/chosen"] < 1  # both labels in a step
    print("kto metrics max diff", assert_metrics_close(tmp_path / "single", tmp_path / "two"))
    print("kto weights max diff",
          assert_weights_close(tmp_path / "single/final", tmp_path / "two/final"))


def test_ctrl_c_under_nproc_checkpoints_says_where_and_resumes(tmp_path):
    """Ctrl-C at the terminal (SIGINT to the launcher, torchrun and both workers, one process
    group): the workers finish their step and rank 0 checkpoints it; the launcher waits for
    that and relays the workers' two lines and nothing of torchrun's (no log lines, no
    traceback), exit 130. The run record says where it stopped, and `--resume` with
    `--nproc 2` goes on from there to the end."""
    write_pairs(tmp_path / "pairs.jsonl")
    args = ["--model", "tiny", "--data", "pairs.jsonl", "--batch-size", "2", "--nproc", "2",
            "--no-progress", "--save-steps", "1000", "--output", "out"]
    process = subprocess.Popen([sys.executable, "-m", "dpo", "run", *args, "--max-steps",
                                "100000"], cwd=tmp_path, env=env(), stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "no steps"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    try:
        err = process.communicate(timeout=TIMEOUT)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err[-3000:]
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    step = int(re.search(r"stopped on request at step (\d+)", record["status"])[1])
    assert (tmp_path / "out" / f"checkpoint-{step}").is_dir()
    lines = err.splitlines()
    assert lines[-2:] == [
        "warning: stopping after this step, with a checkpoint; press Ctrl-C again to stop at once",
        f"error: stopped on request at step {step}; resume with --resume out (from "
        f"checkpoint-{step})"]
    assert "Traceback" not in err and "torch/distributed" not in err

    done = dpo_run("--resume", "out", "--nproc", "2", "--max-steps", str(step + 2), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == step + 2


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "--nproc 0: give at least 1"),
    pytest.param(["--nproc", "2", "--backend", "cuda"], "backend 'cuda' is not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is here")),
])
def test_bad_launch_is_one_line(tmp_path, args, message):
    write_pairs(tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(make_app(get_plugin_manager()),
                                ["run", "--model", "tiny", "--data", str(tmp_path / "pairs.jsonl"),
                                 "--output", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert message in result.output and not (tmp_path / "out").exists()


def test_nproc_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    write_pairs(tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(make_app(get_plugin_manager()),
                                ["run", "--model", "tiny", "--data", str(tmp_path / "pairs.jsonl"),
                                 "--output", str(tmp_path / "out"), "--nproc", "2"])
    assert result.exit_code == 2 and "already runs under torchrun" in result.output


def test_check_launch_counts_accelerator_devices():
    from dpo.core.interfaces.errors import UsageError
    from dpo.core.training.strategy import check_launch, decoder_layers

    check_launch(4, "cpu", 1, on_accelerator=False)  # CPU processes share the host
    with pytest.raises(UsageError, match="--nproc 4: backend 'cuda' has 2 device"):
        check_launch(4, "cuda", 2, on_accelerator=True)
    with pytest.raises(UsageError, match="cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))
