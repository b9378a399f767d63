"""A GPT-NeoX model (Pythia's architecture) through SFT then DPO from the SFT model, full
fine-tuning and LoRA: the second family of ``benchmarks/sft_vs_dpo.py`` beside the default
(Llama-class) model, tiny and random here, saved as a model directory with the tiny tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.core.model.tiny import VOCAB_MULTIPLE, build_tiny_tokenizer
from dpo.testing import write_arithmetic_pairs

# Every linear layer of a GPT-NeoX decoder layer: the fused attention input and its output, the
# MLP's two (embed_out, the output layer, takes no adapter).
NEOX_LINEAR = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


@pytest.fixture
def neox(tmp_path) -> Path:
    """A two-layer GPT-NeoX with the tiny tokenizer, saved as ``from_pretrained`` reads it."""
    tokenizer = build_tiny_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=-(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=512, rotary_pct=0.25, use_parallel_residual=True,
        attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(config)
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    path = tmp_path / "neox"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def invoke(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    app = make_app(get_plugin_manager(load_entrypoints=False))

    def call(*args: str):
        result = CliRunner().invoke(app, [args[0], "--no-progress", *args[1:]])
        assert result.exit_code == 0, result.output
        return result

    return call


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gpt_neox_sft_then_dpo(tmp_path, neox, invoke, lora):
    """``dpo sft`` on the pairs' chosen sides, then ``dpo run --model out-sft/final``: DPO
    starts at ln 2 (the policy is its reference, the SFT model) and both runs write final/.
    With --lora, all-linear finds the four linear layers of GPT-NeoX in both runs, and final/
    holds the adapter."""
    pairs = write_arithmetic_pairs(tmp_path / "pairs.jsonl", n=8)
    common = ["--data", str(pairs), "--backend", "cpu", "--batch-size", "4", "--max-steps", "2",
              "--no-shuffle", "--save-steps", "0", "--no-keep-checkpoints"]
    adapter = ["--lora", "-o", "lora.r=4"] if lora else []
    sft, dpo = tmp_path / "out-sft", tmp_path / "out-dpo"
    invoke("sft", "--model", str(neox), *common, *adapter, "--lr", "1e-3", "--output", str(sft))
    invoke("run", "--model", str(sft / "final"), *common, *adapter, "--lr", "1e-3",
           "--output", str(dpo))
    rows = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    for out in (sft, dpo):
        final = {p.name for p in (out / "final").iterdir()}
        assert ("adapter_model.safetensors" if lora else "model.safetensors") in final
        resolved = record(out)["resolved"]
        if lora:
            assert set(resolved["lora"]["targets"]) == NEOX_LINEAR
            assert resolved["lora"]["modules"] == len(NEOX_LINEAR) * 2  # in each of 2 layers
        else:
            assert not resolved.get("lora")
