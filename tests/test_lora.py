"""``--lora``: an adapter trains, the base stays; the DPO reference is the base model with the
adapter disabled (in memory and precomputed alike); checkpoints hold the adapter in PEFT's format
and resume exactly; ``--merge`` / ``dpo merge`` write a plain transformers model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo.core.model import lora
from dpo.core.model.loading import load_model
from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer
from dpo.core.training.loop import TIMING_KEYS
from dpo.testing import CrashAt

peft = pytest.importorskip("peft", reason="the lora extra (peft) is not installed")

SEED = 42  # RunConfig's default seed: the tiny model's weights are drawn from it


def common(data: Path, out: Path, steps: int = 6) -> list[str]:
    return ["--model", "tiny", "--data", str(data), "--backend", "cpu", "--max-steps",
            str(steps), "--batch-size", "4", "--no-shuffle", "--lora", "-o", "lora.r=4",
            "--lr", "5e-3", "--output", str(out)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in records(out) if "loss" in r]


def test_the_adapter_trains_and_the_base_stays(tmp_path, invoke, pairs):
    """Step 1 is ln 2 (a fresh adapter is zero: policy == reference). Evaluated on the training
    pairs themselves (no batch-to-batch noise), the loss falls below ln 2 and most pairs come
    out ranked right. final/ holds the adapter alone (PEFT's files, no model.safetensors), and
    the run records its shape and that the reference is the base."""
    result = invoke("run", *common(pairs, tmp_path / "out", 20)[:-4], "--lr", "1e-2",
                    "-o", "beta=0.5", "--eval-data", str(pairs), "--eval-steps", "10",
                    "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "the reference is the base model (the adapter disabled)" in result.output
    rows = train_rows(tmp_path / "out")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    evals = [r for r in records(tmp_path / "out") if "eval/loss" in r]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval/loss"] < math.log(2) - 0.03
    assert evals[-1]["eval/rewards/accuracies"] > 0.6
    final = tmp_path / "out" / "final"
    assert {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS, lora.ADAPTER_RECORD} <= {
        p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()
    saved = load_file(str(final / lora.ADAPTER_WEIGHTS))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(t.abs().max() > 0 for k, t in saved.items() if ".lora_B." in k)  # it trained
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    adapter = run["resolved"]["lora"]
    assert (adapter["r"], adapter["alpha"]) == (4, 8)  # alpha defaults to twice r
    assert adapter["trainable_parameters"] == sum(t.numel() for t in saved.values())
    assert "LoRA adapter disabled" in run["resolved"]["reference"]
    # The heap setting of --gradient-checkpointing, which a LoRA run's peak needs too.
    assert run["resolved"]["memory"] == "freed blocks of 1 MiB and more go back to the system"


# PeftModel.from_pretrained asks transformers for a property renamed in 5.24 (its warning).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_loads_final_and_the_merge_matches_it(tmp_path, invoke, pairs):
    """final/ is PEFT's format: ``PeftModel.from_pretrained(base, final)`` gives logits equal to
    the model ``--merge`` wrote (W + B A alpha/r folded in, up to float rounding), and the
    merged directory loads with transformers alone in a process where peft cannot import."""
    result = invoke("run", *common(pairs, tmp_path / "out"), "--merge")
    assert result.exit_code == 0, result.output
    tokenizer = build_tiny_tokenizer()
    ids = torch.tensor([tokenizer("What is 2 plus 3? 5")["input_ids"]])
    with_peft = peft.PeftModel.from_pretrained(build_tiny_model(tokenizer, seed=SEED),
                                               str(tmp_path / "out" / "final")).eval()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    with torch.no_grad():
        want, got = with_peft(ids).logits, merged(ids).logits
        base = build_tiny_model(tokenizer, seed=SEED)(ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    script = ("import sys; sys.modules['peft'] = None\n"
              "from transformers import AutoModelForCausalLM\n"
              f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out' / 'merged')!r})\n"
              "print('loaded')")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert loaded.stdout.strip() == "loaded", loaded.stderr
    # dpo merge writes the same model elsewhere.
    again = invoke("merge", str(tmp_path / "out"), "--output", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    a, b = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "out" / "merged",
                                                              tmp_path / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_in_memory_and_precomputed_references_agree(tmp_path, invoke, pairs):
    """The adapter-disabled policy scoring each batch and the log-probs computed once before
    training are the same reference: every step's metrics agree. The file is keyed by the base
    weights, so a full fine-tuning run's file serves the LoRA run (nothing scored again)."""
    assert invoke("run", *common(pairs, tmp_path / "memory"), "--no-precompute-ref"
                  ).exit_code == 0
    full = [a for a in common(pairs, tmp_path / "full", 1) if a not in ("--lora", "-o",
                                                                         "lora.r=4")]
    assert invoke("run", *full).exit_code == 0
    stored = invoke("run", *common(pairs, tmp_path / "stored"))
    assert stored.exit_code == 0, stored.output
    run = json.loads((tmp_path / "stored" / "run.json").read_text())
    assert run["resolved"]["reference_logps"]["pairs_scored"] == 0
    memory, precomputed = train_rows(tmp_path / "memory"), train_rows(tmp_path / "stored")
    assert len(memory) == len(precomputed) == 6
    for a, b in zip(memory, precomputed):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_adapter_disabled_is_the_base_model():
    """The switch the reference uses: with the adapter off, logits equal the base model's
    exactly, also after the adapter's weights moved; with it on, they differ."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=3)
    lora.add_adapter(model, lora.LoraOptions(r=2), {"model": "tiny", "seed": 3})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 9, 17, 4, 30]])
    base = build_tiny_model(tokenizer, seed=3)
    with torch.no_grad():
        adapted = model(ids).logits
        with lora.adapter_disabled(model):
            off = model(ids).logits
        plain = base(ids).logits
    assert torch.equal(off, plain)
    assert (adapted - plain).abs().max() > 1e-3
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, invoke, pairs):
    """A checkpoint holds the adapter and the optimizer over it; resuming loads the base from
    --model and the adapter from the checkpoint, and ends where an uninterrupted run ends."""
    extra = ["--save-steps", "2", "--stop", "crash-at", "--grad-accum", "2", "--shuffle"]
    assert invoke("run", *common(pairs, tmp_path / "straight", 5), *extra).exit_code == 0
    CrashAt.armed_at = 3
    crashed = invoke("run", *common(pairs, tmp_path / "resumed", 5), *extra)
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / lora.ADAPTER_WEIGHTS).is_file()
    assert not (checkpoint / "model.safetensors").exists()
    resumed = invoke("run", "--resume", str(tmp_path / "resumed"))
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_file(str(tmp_path / d / "final" / lora.ADAPTER_WEIGHTS))
            for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_rows(tmp_path / "resumed") == train_rows(tmp_path / "straight")
    wrong = invoke("run", "--resume", str(tmp_path / "straight"), "--no-lora",
                   "--max-steps", "7")
    assert wrong.exit_code == 2
    assert "add --lora" in wrong.output


def test_sft_adapter_then_dpo_from_it(tmp_path, invoke, pairs):
    """SFT with LoRA, then DPO with a new adapter on the SFT model: ``--model out-sft/final``
    (an adapter directory) loads its base with the SFT adapter merged in, which is then the
    reference; step 1 is ln 2 against it, and ``dpo eval`` of the DPO adapter runs."""
    sft = invoke("sft", *common(pairs, tmp_path / "out-sft", 4))
    assert sft.exit_code == 0, sft.output
    sft_final = tmp_path / "out-sft" / "final"
    merged, _ = load_model(str(sft_final), seed=0)
    assert not lora.is_adapted(merged)
    base = build_tiny_model(build_tiny_tokenizer(), seed=SEED)
    moved = [n for n, p in base.state_dict().items()
             if not torch.equal(p, merged.state_dict()[n])]
    assert moved and all("proj" in n for n in moved)  # only the adapted layers changed
    dpo = invoke("run", *common(pairs, tmp_path / "out")[2:], "--model", str(sft_final),
                 "--eval-fraction", "0.25")
    assert dpo.exit_code == 0, dpo.output
    assert train_rows(tmp_path / "out")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    record = json.loads((tmp_path / "out" / "final" / lora.ADAPTER_RECORD).read_text())
    assert record["model"] == str(sft_final.resolve())
    evaluated = invoke("eval", "--model", str(tmp_path / "out" / "final"), "--data", str(pairs),
                       "--ref", str(sft_final), "--json")
    assert evaluated.exit_code == 0, evaluated.output
    # The run directory stands for its final/ adapter; the reference comes from its run.
    by_run = invoke("eval", "--model", str(tmp_path / "out"), "--data", str(pairs), "--json")
    assert by_run.exit_code == 0, by_run.output
    assert json.loads(by_run.stdout)["metrics"] == json.loads(evaluated.stdout)["metrics"]


@pytest.mark.parametrize("args, message", [
    (["-o", "lora.r=4"], "options given for 'lora' (-o lora.KEY=...), but the run trains no "
                         "adapter; add --lora"),
    (["--lora", "-o", "lora.rank=4"], "--lora: unknown option lora.rank (valid: lora.r, "
                                      "lora.alpha, lora.dropout, lora.targets)"),
    (["--lora", "-o", "lora.r=0"], "--lora: option lora.r=0: Input should be greater than 0"),
    (["--lora", "-o", "lora.targets=nothing"], "set -o lora.targets to module names of this "
                                               "model, or 'all-linear'"),
    (["--lora", "-o", "lora.targets=embed_tokens"], "lora.targets names an embedding"),
    (["--merge"], "merge writes a LoRA adapter merged into its base model: it needs lora"),
])
def test_bad_lora_options_are_one_line_and_write_nothing(tmp_path, invoke, pairs, args,
                                                         message):
    result = invoke("run", "--model", "tiny", "--data", str(pairs), "--max-steps", "1",
                    "--output", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_without_peft_the_error_names_the_extra(tmp_path, invoke, pairs, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    result = invoke("run", "--model", "tiny", "--data", str(pairs), "--lora",
                    "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "--lora needs the peft package: pip install 'dpo-trainer[lora]'" in result.output
    assert not (tmp_path / "out").exists()


def test_dpo_merge_refuses_what_it_cannot_merge(tmp_path, invoke, pairs):
    full = [a for a in common(pairs, tmp_path / "full", 1) if a not in ("--lora", "-o",
                                                                         "lora.r=4")]
    assert invoke("run", *full).exit_code == 0
    refused = invoke("merge", str(tmp_path / "full"))
    assert refused.exit_code == 2 and "holds a full model, not a LoRA adapter" in refused.output
    assert invoke("run", *common(pairs, tmp_path / "out", 1)).exit_code == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    refused = invoke("merge", str(tmp_path / "out"), "--output", str(tmp_path / "mine"))
    assert refused.exit_code == 2 and "not written by dpo-trainer" in refused.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_a_config_file_sets_lora_and_its_options(tmp_path, invoke, pairs):
    """``lora = true`` and an ``[options.lora]`` table in the TOML file are the flags' twins;
    a flag still wins over the file."""
    config = tmp_path / "run.toml"
    config.write_text("lora = true\nmax-steps = 1\n\n[options.lora]\nr = 8\nalpha = 4\n"
                      "targets = \"q_proj,v_proj\"\n")
    result = invoke("run", "--config", str(config), "--model", "tiny", "--data", str(pairs),
                    "-o", "lora.alpha=24", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    adapter = json.loads((tmp_path / "out" / "run.json").read_text())["resolved"]["lora"]
    assert (adapter["r"], adapter["alpha"], adapter["targets"]) == (8, 24, ["q_proj", "v_proj"])
    assert adapter["modules"] == 4  # q_proj and v_proj in each of the tiny model's 2 layers


def test_model_flops_count_no_weight_gradients_for_the_frozen_base():
    """Backward is each layer's input gradient (as much as its forward) plus, for the weights
    that train, their gradient (as much again). For body 1000 entries (10 training), head 100
    (frozen), 2 layers of attention width 8, one row of 4 tokens with 2 completion tokens:
    forward = 2*1000*4 + 2*2*8*4^2 + 2*100*2 = 8000 + 512 + 400 = 8912;
    backward = 8912 (inputs) + 512 (attention's second product) + 2*10*4 (weights) = 9504;
    a step = 8912 + 9504 = 18416 (and + 8912 with the reference's forward). With every weight
    training it is 3 x forward = 26736, as before."""
    from dpo.core.model.flops import FlopCounter

    lora_counter = FlopCounter(1000, 100, 2, 8, trained_body=10, trained_head=0)
    assert lora_counter.train_step((4,), 2, reference_forward=False) == 18416
    assert lora_counter.train_step((4,), 2, reference_forward=True) == 18416 + 8912
    assert FlopCounter(1000, 100, 2, 8).train_step((4,), 2, reference_forward=False) == 26736
    model = build_tiny_model(build_tiny_tokenizer(), seed=0)
    lora.add_adapter(model, lora.LoraOptions(r=2), {"model": "tiny", "seed": 0})
    counter = FlopCounter.of(model)
    assert counter.trained_body == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counter.trained_head == 0


def test_gradient_checkpointing_with_an_adapter_changes_nothing(tmp_path, invoke, pairs):
    """Recomputing each decoder layer in backward, where only the adapter takes gradients and
    the layers' inputs need none, gives the same steps as keeping the activations."""
    for name, extra in (("kept", []), ("recomputed", ["--gradient-checkpointing"])):
        result = invoke("run", *common(pairs, tmp_path / name, 4), "--lr", "1e-2", *extra)
        assert result.exit_code == 0, result.output
    kept, recomputed = train_rows(tmp_path / "kept"), train_rows(tmp_path / "recomputed")
    assert [r["loss"] for r in kept] == pytest.approx([r["loss"] for r in recomputed],
                                                      abs=1e-6)
    assert kept[-1]["loss"] != kept[0]["loss"]


def test_early_stopping_keeps_and_restores_the_best_adapter(tmp_path, invoke, pairs):
    """best/ holds the best evaluation's adapter (PEFT's format); at the end it is loaded back
    into the policy, so final/ holds exactly best/'s adapter."""
    result = invoke("run", *common(pairs, tmp_path / "out", 6), "--lr", "1e-2",
                    "--eval-data", str(pairs), "--eval-steps", "2", "--stop", "early-stopping",
                    "-o", "early-stopping.metric=eval/rewards/margins", "-o", "early-stopping.mode=min",
                    "-o", "early-stopping.patience=5")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    # The margins grow as the policy learns: the smallest is an early evaluation's.
    assert run["restored_best_from_step"] in (0, 2, 4)
    best, final = (load_file(str(tmp_path / "out" / d / lora.ADAPTER_WEIGHTS))
                   for d in ("best", "final"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    assert not (tmp_path / "out" / "best" / "model.safetensors").exists()
    last = load_file(str(tmp_path / "out" / "checkpoint-6" / lora.ADAPTER_WEIGHTS))
    assert any(not torch.equal(last[k], final[k]) for k in last)  # best/ was loaded back
