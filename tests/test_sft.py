"""``dpo sft`` end to end on the tiny model: the token-mean objective, its run directory, resume,
and the hand-off to ``dpo run --model out-sft/final``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo.core.data.batching import collate_examples
from dpo.core.data.reading import load_demonstrations
from dpo.core.data.tokenization import tokenize_demonstrations
from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.core.model.loading import load_model
from dpo.core.model.logps import batch_logps
from dpo.core.model.paths import PLAIN
from dpo.core.training.loop import TIMING_KEYS
from dpo.testing import CrashAt, command_line, plugin_of, write_arithmetic_pairs

HH = (Path(__file__).resolve().parents[2] / "shared" / "data"
      / "hh-rlhf-harmless-base-test-2000.jsonl.gz")


@pytest.fixture
def invoke():
    return command_line(plugin_of(CrashAt))


def write_demonstrations(path: Path, n: int = 16) -> Path:
    """Prompt/completion records whose completions differ in length (0 to 3 extra words, growing
    along the file: examples 0-3 have 0 or 1, examples 4-7 have 2 or 3), so that a mean over
    tokens and a mean over examples or micro-batches differ."""
    with path.open("w") as fh:
        for i in range(n):
            a, b = i % 7 + 1, i % 5 + 2
            fh.write(json.dumps({"prompt": f"What is {a} plus {b}? ",
                                 "completion": f"{a + b}" + " indeed" * (i % 8 // 2)}) + "\n")
    return path


def common(data: Path, out: Path, steps: int = 4) -> list[str]:
    return ["--model", "tiny", "--data", str(data), "--backend", "cpu", "--max-steps",
            str(steps), "--lr", "1e-3", "--batch-size", "4", "--no-shuffle",
            "--no-group-by-length", "--output", str(out)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_sft_writes_a_model_that_dpo_run_starts_from(tmp_path, invoke):
    """SFT's run directory is a run's: run.json (objective sft), metrics.jsonl with the loss,
    eval/loss and eval/perplexity = exp(eval/loss), and final/, which `dpo run --model` then
    trains with DPO (its reference is the SFT model too)."""
    data = write_demonstrations(tmp_path / "demos.jsonl")
    sft = invoke("sft", *common(data, tmp_path / "out-sft", 6), "--eval-fraction", "0.25")
    assert sft.exit_code == 0, sft.output
    run = json.loads((tmp_path / "out-sft" / "run.json").read_text())
    assert run["status"] == "completed" and run["steps"] == 6
    assert run["config"]["objective"] == "sft" and run["resolved"]["objective"] == "sft"
    assert run["resolved"]["reference"].startswith("none")
    rows = records(tmp_path / "out-sft")
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert {"grad_norm", "lr", "tokens_per_second", "samples_per_second"} <= set(steps[0])
    assert "rewards/accuracies" not in steps[0]
    assert [r["step"] for r in evals] == [0, 6]
    for r in evals:
        assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-9)
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]  # it learned something

    pairs = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    dpo_run = invoke("run", "--model", str(tmp_path / "out-sft" / "final"), "--data", str(pairs),
                     "--backend", "cpu", "--max-steps", "2", "--batch-size", "4",
                     "--output", str(tmp_path / "out-dpo"))
    assert dpo_run.exit_code == 0, dpo_run.output
    record = json.loads((tmp_path / "out-dpo" / "run.json").read_text())
    assert record["resolved"]["objective"] == "dpo"
    # At step 1 the policy is its reference (the SFT model): DPO's loss is ln 2.
    assert records(tmp_path / "out-dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def hand_token_mean(data: Path, rows: list[list[int]]) -> tuple[float, list[float]]:
    """The first step's loss computed apart from the loop: the tiny model as the run builds it
    (seed 42), each example's summed log-probability of its trained tokens on the plain path,
    and the step's loss = -(sum over the step's examples) / (their trained tokens). Also the
    mean of the micro-batches' own token means, which a loop averaging per micro-batch gives."""
    model, tokenizer = load_model("tiny", 42)
    catalog = collect(get_plugin_manager(load_entrypoints=False))
    demos = load_demonstrations(str(data), catalog.formats)
    examples, _ = tokenize_demonstrations(tokenizer, demos, 512, 256)
    model.eval()
    totals, counts = [], []
    with torch.no_grad():
        for micro in rows:
            batch = collate_examples([examples[i] for i in micro], tokenizer.pad_token_id)
            logps, tokens = batch_logps(model, batch, PLAIN)
            totals.append(-float(logps.sum()))
            counts.append(int(tokens.sum()))
    return sum(totals) / sum(counts), [t / c for t, c in zip(totals, counts)]


def test_a_step_loss_is_the_token_mean_over_the_whole_step(tmp_path, invoke):
    """Two micro-batches of 4 (no shuffle, no length grouping: examples 0-3 then 4-7). The
    second's completions are longer (2 or 3 "indeed"s against 0 or 1), so the step's token
    mean, sum(NLL) / sum(tokens), differs from the mean of the two micro-batches' own means;
    the run's step-1 loss is the former (the model before the update)."""
    data = write_demonstrations(tmp_path / "demos.jsonl")
    result = invoke("sft", *common(data, tmp_path / "out", 1), "--grad-accum", "2",
                    "--no-eval-at-start")
    assert result.exit_code == 0, result.output
    want, per_micro = hand_token_mean(data, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert abs(sum(per_micro) / 2 - want) > 1e-3  # the two means differ here: the test can fail
    assert records(tmp_path / "out")[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_the_step_is_the_same_however_it_is_split_into_micro_batches(tmp_path, invoke):
    """Eight examples per step as one micro-batch of 8 or four of 2: the same token-mean
    gradient, so the same losses and (to float32 summation order) the same weights."""
    data = write_demonstrations(tmp_path / "demos.jsonl")
    one = invoke("sft", *common(data, tmp_path / "one", 3), "--batch-size", "8")
    four = invoke("sft", *common(data, tmp_path / "four", 3), "--batch-size", "2",
                  "--grad-accum", "4")
    assert one.exit_code == 0 and four.exit_code == 0, one.output + four.output
    a, b = records(tmp_path / "one"), records(tmp_path / "four")
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    wa, wb = weights(tmp_path / "one" / "final"), weights(tmp_path / "four" / "final")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, invoke):
    data = write_demonstrations(tmp_path / "demos.jsonl")
    extra = ["--save-steps", "2", "--stop", "crash-at", "--grad-accum", "2", "--shuffle",
             "--scheduler", "cosine", "--warmup-steps", "1"]
    assert invoke("sft", *common(data, tmp_path / "straight", 5), *extra).exit_code == 0
    CrashAt.armed_at = 3  # after the checkpoint at step 2
    crashed = invoke("sft", *common(data, tmp_path / "resumed", 5), *extra)
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    resumed = invoke("sft", "--resume", str(tmp_path / "resumed"))
    assert resumed.exit_code == 0, resumed.output
    wa, wb = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (deterministic(records(tmp_path / "resumed"))
            == deterministic(records(tmp_path / "straight")))


def test_sft_on_preference_pairs_trains_the_chosen_side(tmp_path, invoke):
    """Preference data gives SFT its chosen completions: 24 pairs are 24 examples, and the
    first step's loss is the token mean over the chosen sides of its examples."""
    pairs = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    result = invoke("sft", *common(pairs, tmp_path / "out", 1), "--no-eval-at-start")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    kept = {k: v for k, v in run["data"]["train"].items() if k.endswith("_kept")}
    assert list(kept.values()) == [24]
    want, _ = hand_token_mean(pairs, [[0, 1, 2, 3]])
    assert records(tmp_path / "out")[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_sft_on_chat_messages_trains(tmp_path, invoke):
    """Chat `messages` records with two assistant turns each go through the tokenizer's chat
    template; the run trains and its loss falls on its own training data."""
    data = tmp_path / "chat.jsonl"
    with data.open("w") as fh:
        for i in range(8):
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} plus 1?"},
                {"role": "assistant", "content": f"{i + 1}"},
                {"role": "user", "content": "And plus 2?"},
                {"role": "assistant", "content": f"{i + 2}"}]}) + "\n")
    result = invoke("sft", *common(data, tmp_path / "out", 6), "--eval-data", str(data))
    assert result.exit_code == 0, result.output
    evals = [r for r in records(tmp_path / "out") if "eval/loss" in r]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]


@pytest.mark.skipif(not HH.is_file(), reason="the HH-RLHF sample is not beside the repository")
def test_sft_reads_hh_rlhf(tmp_path, invoke):
    """The real HH-RLHF file: its chosen dialogues train the tiny model for two steps."""
    result = invoke("sft", "--model", "tiny", "--data", str(HH), "--backend", "cpu",
                    "--max-steps", "2", "--batch-size", "2", "--max-length", "128",
                    "--max-prompt-length", "64", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "completed" and run["config"]["objective"] == "sft"


def test_stopping_on_a_metric_sft_does_not_report_is_refused_before_anything_is_written(
        tmp_path, invoke):
    """early-stopping's default metric is DPO's eval/rewards/accuracies: one line naming what
    SFT reports instead, exit 2, no run directory; watching eval/loss (lower is better) runs."""
    data = write_demonstrations(tmp_path / "demos.jsonl")
    args = [*common(data, tmp_path / "out", 2), "--eval-fraction", "0.25", "--stop",
            "early-stopping"]
    refused = invoke("sft", *args)
    assert refused.exit_code == 2
    assert ("--stop early-stopping watches eval/rewards/accuracies, which dpo sft does not "
            "report (its evaluations: eval/loss, eval/perplexity)") in refused.output
    assert not (tmp_path / "out").exists()
    runs = invoke("sft", *args, "-o", "early-stopping.metric=eval/loss",
                  "-o", "early-stopping.mode=min")
    assert runs.exit_code == 0, runs.output


def test_dpo_eval_of_an_sft_run_gives_its_loss_and_perplexity(tmp_path, invoke):
    """`dpo eval --model OUT` of a `dpo sft` run evaluates as SFT (the run's objective): on
    the run's own held-out file, the loss and perplexity its final evaluation logged (the
    same model, examples and token mean; batches of another size sum in another order).
    A reference or a loss is refused for SFT in one line."""
    data = write_demonstrations(tmp_path / "demos.jsonl")
    run = invoke("sft", *common(data, tmp_path / "out", 3), "--eval-data", str(data))
    assert run.exit_code == 0, run.output
    final = [r for r in records(tmp_path / "out") if "eval/loss" in r][-1]
    result = invoke("eval", "--model", str(tmp_path / "out"), "--data", str(data),
                    "--backend", "cpu", "--batch-size", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["objective"] == "sft" and report["examples"] == 16
    assert report["metrics"]["loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    assert report["metrics"]["perplexity"] == pytest.approx(final["eval/perplexity"], rel=1e-5)
    refused = invoke("eval", "--model", str(tmp_path / "out"), "--data", str(data),
                     "--ref", "tiny")
    assert refused.exit_code == 2
    assert "--ref: an SFT evaluation has no loss plugin and no reference" in refused.output
