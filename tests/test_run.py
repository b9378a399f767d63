"""End-to-end runs of the tiny model through the CLI: outputs, resume, and the NaN guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dpo
from dpo.cli import make_app
from dpo.core.training.loop import TIMING_KEYS
from dpo.core.interfaces.plugins import get_plugin_manager, register_plugin
from dpo.plugins.losses.dpo import DPOLoss
from dpo.testing import CrashAt as Crash
from dpo.testing import write_arithmetic_pairs as write_pairs

TRL_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "grad_norm", "lr"}




class NanAt(DPOLoss):
    """DPO whose loss turns NaN once 8 pairs have gone through it (a poisoned batch: the
    third step of 4 pairs, however the steps are split into micro-batches)."""

    name = "nan-at"
    calls = 0  # pairs seen

    def __call__(self, logps):
        out = super().__call__(logps)
        NanAt.calls += out.losses.shape[0]
        if NanAt.calls > 8:
            out.losses = out.losses * float("nan")
        return out


class QAFormat(dpo.DataFormat):
    """A third-party record shape: ``{"question", "good", "bad"}``, with an optional prefix."""

    name = "qa"

    class Options(dpo.PluginOptions):
        prefix: str = ""

    @classmethod
    def detect(cls, record):
        return {"question", "good", "bad"} <= set(record)

    def parse(self, record):
        return dpo.PreferencePair(self.options.prefix + record["question"], record["good"],
                                  record["bad"])


class TestPlugin:
    """Written out hook by hook, as a plugin package would (``dpo.testing.plugin_of`` builds
    the same for tests)."""

    @dpo.hookimpl
    def dpo_register_stopping_policies(self, register):
        register(Crash)

    @dpo.hookimpl
    def dpo_register_data_formats(self, register):
        register(QAFormat)

    @dpo.hookimpl
    def dpo_register_losses(self, register):
        register(NanAt)


@pytest.fixture
def invoke():
    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, TestPlugin(), "test-plugin")
    app = make_app(pm)

    def call(*args: str):
        return CliRunner().invoke(app, ["run", "--no-progress", *args])

    return call


def base_args(tmp_path: Path, out: str, steps: int) -> list[str]:
    data = write_pairs(tmp_path / "pairs.jsonl")
    return ["--model", "tiny", "--data", str(data), "--backend", "cpu", "--loss", "dpo",
            "--max-steps", str(steps), "--lr", "1e-3", "--batch-size", "4",
            "--output", str(tmp_path / out)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_a_loadable_model_metrics_and_run_record(tmp_path, invoke):
    """At step 1 the policy equals the reference, so h = 0 for every pair and the DPO loss is
    -log sigma(0) = ln 2 = 0.693147..., with zero rewards and margins and accuracy 0 (ties are
    not counted as correct)."""
    result = invoke(*base_args(tmp_path, "out", 20), "--eval-fraction", "0.25")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"

    steps = [r for r in records(out) if "loss" in r]
    evals = [r for r in records(out) if "eval/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert TRL_KEYS <= set(steps[0]) and {"tokens_per_second", "samples_per_second"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["rewards/accuracies"] == 0.0
    # The baseline evaluation at step 0 (policy == reference: ln 2 again), then the final one.
    assert [r["step"] for r in evals] == [0, 20] and "eval/rewards/accuracies" in evals[1]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["steps"] == 20
    # --eval-fraction 0.25 holds out a quarter of the 24 pairs: 18 train, 6 held out.
    assert run["data"]["train"]["pairs_kept"] == 18 and run["data"]["eval"]["pairs_kept"] == 6
    assert run["config"]["seed"] == 42 and run["config"]["max_steps"] == 20
    assert run["resolved"]["backend"] == "cpu" and run["versions"]["torch"] == torch.__version__

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer("What is 2 plus 3? ", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    # The final checkpoint directory is a loadable Hugging Face model too, with the same weights.
    again = AutoModelForCausalLM.from_pretrained(out / "checkpoint-20")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_tiny_model_learns_its_training_pairs(tmp_path, invoke):
    """Evaluating on the training pairs themselves removes batch-to-batch noise: the eval loss
    starts at ln 2 = 0.6931 (policy == reference) and must fall well below it as the policy
    learns to prefer the right sums. beta=0.5 goes through -o to the loss's Options."""
    data = str(write_pairs(tmp_path / "pairs.jsonl"))
    result = invoke(*base_args(tmp_path, "out", 20), "--eval-data", data, "--eval-steps", "10",
                    "--lr", "3e-3", "-o", "beta=0.5")
    assert result.exit_code == 0, result.output
    evals = [r for r in records(tmp_path / "out") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["eval/loss"] < math.log(2) - 0.05
    assert evals[-1]["eval/rewards/accuracies"] > 0.5
    assert evals[-1]["eval/rewards/margins"] > 0.0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["resolved"]["options"]["dpo"]["beta"] == 0.5  # validated and typed


def test_a_plugin_data_format_is_detected_or_forced_with_its_options(tmp_path, invoke):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1 = ", "good": f"{i + 1}",
                                        "bad": f"{i + 2}"}) + "\n" for i in range(8)))
    args = ["--model", "tiny", "--data", str(data), "--backend", "cpu", "--max-steps", "2",
            "--batch-size", "4"]
    detected = invoke(*args, "--output", str(tmp_path / "a"))
    assert detected.exit_code == 0, detected.output
    assert json.loads((tmp_path / "a" / "run.json").read_text())["data"]["train"]["pairs_kept"] == 8
    forced = invoke(*args, "--output", str(tmp_path / "b"), "--format", "qa", "-o", "qa.prefix=Q: ")
    assert forced.exit_code == 0, forced.output
    bad = invoke(*args, "--output", str(tmp_path / "c"), "--format", "qa", "-o", "qa.suffix=x")
    assert bad.exit_code == 2 and "unknown option 'suffix'" in bad.output
    assert not (tmp_path / "c").exists()


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, invoke):
    common = ["--save-steps", "3", "--stop", "crash-at", "--grad-accum", "2", "--scheduler", "cosine",
              "--warmup-steps", "2"]
    assert invoke(*base_args(tmp_path, "straight", 8), *common).exit_code == 0

    Crash.armed_at = 5  # dies after the checkpoint at step 3, before the one at step 6
    crashed = invoke(*base_args(tmp_path, "resumed", 8), *common)
    assert crashed.exit_code == 1
    assert "error: stopping policy 'crash-at' raised RuntimeError" in crashed.output
    out = tmp_path / "resumed"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    assert max(r["step"] for r in records(out)) == 5

    resumed = invoke("--resume", str(out))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-3")

    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert deterministic(records(out)) == deterministic(records(tmp_path / "straight"))


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, invoke):
    NanAt.calls = 0
    args = base_args(tmp_path, "out", 10)
    args[args.index("--loss") + 1] = "nan-at"
    result = invoke(*args, "--save-steps", "2", "--stop", "nan-guard")
    assert result.exit_code == 1
    assert "stopped by nan-guard at step 3" in result.output
    out = tmp_path / "out"
    assert [p.name for p in sorted(out.iterdir()) if p.name.startswith("checkpoint")] == ["checkpoint-2"]
    assert not (out / "final").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["status"].startswith("stopped by nan-guard") and run["steps"] == 3

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")  # intact and loadable


def test_unusable_records_are_counted_or_refused_under_strict(tmp_path, invoke):
    """HH lines: line 2 has no assistant turn in common (rejected does not start with the
    chosen's prompt), line 3 has identical chosen and rejected. Without --strict both are
    dropped and counted per reason in run.json; with --strict the first one stops the run with
    its file and line, before anything is written."""
    good = {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}
    lines = [good,
             {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
             {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y"},
             good, good, good]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = ["--model", "tiny", "--data", str(data), "--backend", "cpu", "--max-steps", "1",
            "--batch-size", "2", "-o", "hh.render=chat"]
    kept = invoke(*args, "--output", str(tmp_path / "a"))
    assert kept.exit_code == 0, kept.output
    counts = json.loads((tmp_path / "a" / "run.json").read_text())["data"]["train"]
    assert counts["pairs_kept"] == 4 and counts["dropped_identical"] == 1
    assert counts["dropped_no_shared_prompt"] == 1

    strict = invoke(*args, "--output", str(tmp_path / "b"), "--strict")
    assert strict.exit_code == 2 and f"{data}:2: hh format" in strict.output
    assert not (tmp_path / "b").exists()

    bad_option = invoke(*args[:-2], "-o", "hh.render=fancy", "--output", str(tmp_path / "c"))
    assert bad_option.exit_code == 2 and "option render=fancy" in bad_option.output
    assert not (tmp_path / "c").exists()


def test_without_data_the_run_uses_the_demo_and_its_preset(tmp_path, invoke, monkeypatch):
    """No --data: the built-in demo (320 training questions, 64 held out, chat records) with the
    demo's preset (lr 5e-5, batch 8, evaluation every 10 steps) for whatever no flag sets."""
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    result = invoke("--model", "tiny", "--backend", "cpu", "--max-steps", "2",
                    "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["data"] == "demo"
    assert (run["config"]["lr"], run["config"]["batch_size"], run["config"]["eval_steps"]) == (5e-5, 8, 10)
    assert run["data"]["train"]["pairs_kept"] == 320 and run["data"]["eval"]["pairs_kept"] == 64
    assert run["config"]["max_steps"] == 2  # a flag wins over the preset

    other = invoke("--model", "tiny", "--backend", "cpu", "--max-steps", "1",
                   "--data", str(write_pairs(tmp_path / "pairs.jsonl")), "--output", str(tmp_path / "b"))
    assert other.exit_code == 0, other.output
    config = json.loads((tmp_path / "b" / "run.json").read_text())["config"]
    assert (config["lr"], config["batch_size"]) == (1e-6, 4)  # no preset for other data


def test_the_demo_holds_out_its_own_questions_for_stopping_and_samples(tmp_path, invoke,
                                                                       monkeypatch):
    """``--data demo`` without --eval-data or --eval-fraction evaluates on the demo's 64
    held-out questions, so a policy watching an eval metric (early stopping on
    eval/rewards/accuracies) and --sample-prompts are accepted, as they are refused for a
    file with nothing held out."""
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    result = invoke("--model", "tiny", "--backend", "cpu", "--data", "demo", "--max-steps", "2",
                    "--eval-steps", "1", "--stop", "early-stopping", "--sample-prompts", "1",
                    "--sample-max-new-tokens", "2", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in
               (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/rewards/accuracies" in r] == [0, 1, 2]

    refused = invoke("--model", "tiny", "--backend", "cpu", "--max-steps", "1",
                     "--data", str(write_pairs(tmp_path / "pairs.jsonl")),
                     "--stop", "early-stopping", "--output", str(tmp_path / "b"))
    assert refused.exit_code == 2 and "needs held-out pairs" in refused.output
    assert not (tmp_path / "b").exists()
