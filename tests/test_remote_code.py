"""Models that ship their own modelling code (``--trust-remote-code``), on a BTLM-style model
written for these tests (``dpo.testing_models.btlm``, written out by
``dpo.testing.write_btlm_style_model``): refused in one line without the flag; with it, DPO and
SFT train it on the plain path, its checkpoints and ``final/`` load again with transformers, and
a resumed run equals an uninterrupted one. Then the modelling code itself: ALiBi's biases by
hand, causality, padding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo.core.model.activations import decoder_layers_of
from dpo.core.model.dropout import disable_dropout
from dpo.core.model.flops import FlopCounter
from dpo.core.model.loading import code_files, load_model, runs_shipped_code, shipped_code
from dpo.core.model.paths import verified_paths
from dpo.core.training.loop import TIMING_KEYS
from dpo.testing import CrashAt, command_line, plugin_of, write_arithmetic_pairs, write_btlm_style_model
from dpo.testing_models.btlm.configuration_btlm import BtlmConfig
from dpo.testing_models.btlm.modeling_btlm import (BtlmLMHeadModel, alibi_slopes,
                                                   attention_bias)
from test_cli import assert_one_line_error

# Where IPEX is installed (the CI lane `intel`) and an earlier test imported it, a backward
# through LayerNorm outside a run warns about IPEX's kernel; the gradients are torch's
# (tests/test_intel.py), and a run silences it itself (dpo.backends._intel).
pytestmark = pytest.mark.filterwarnings(
    "ignore:aten..layer_norm. an autograd kernel was not registered:UserWarning")

UNTRUSTED = "ships its own modelling code (configuration_btlm.py, modeling_btlm.py); rerun with --trust-remote-code if you trust it"
TRUSTING = "trusting the modelling code shipped with"
PLAIN = ("policy speed paths: none (the plain path): BtlmLMHeadModel comes from "
         "transformers_modules, not from transformers (remote code or a custom class)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_btlm_style_model(tmp_path_factory.mktemp("btlm") / "btlm")


@pytest.fixture
def invoke():
    return command_line(plugin_of(CrashAt))


def train_args(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--backend", "cpu", "--max-steps",
            str(steps), "--lr", "1e-3", "--batch-size", "4", "--output", str(out)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def reloaded(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


# -- without the flag ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "sft", "precompute-ref"])
def test_without_the_flag_a_model_with_its_own_code_is_refused_in_one_line(
        command, model_dir, tmp_path, invoke):
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    args = ["--model", str(model_dir), "--data", str(data), "--backend", "cpu"]
    if command != "precompute-ref":
        args += ["--output", str(tmp_path / "out")]
    result = invoke(command, *args)
    assert_one_line_error(result, 2, f"--model {model_dir}: {UNTRUSTED}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # nothing written


def test_dpo_eval_asks_for_the_flag_itself(model_dir, tmp_path, invoke):
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    args = ["--model", str(model_dir), "--ref", str(model_dir), "--data", str(data),
            "--backend", "cpu", "--json"]
    assert_one_line_error(invoke("eval", *args), 2, UNTRUSTED)
    result = invoke("eval", *args, "--trust-remote-code")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference


def test_load_model_names_the_files_and_says_once_that_it_trusts_them(model_dir, capsys):
    assert shipped_code(str(model_dir)) == ["configuration_btlm.py", "modeling_btlm.py"]
    model, tokenizer = load_model(str(model_dir), seed=0, trust_remote_code=True)
    err = capsys.readouterr().err
    assert err.count(TRUSTING) == 1 and "modeling_btlm.py" in err
    assert runs_shipped_code(model) and type(model).__name__ == "BtlmLMHeadModel"
    assert tokenizer.pad_token_id is not None
    # transformers' own model types ship nothing to trust, whatever their config says.
    assert code_files({"AutoModelForCausalLM": "org/repo--modeling_x.XForCausalLM",
                       "AutoTokenizer": ["tokenization_x.XTokenizer", None]}) == [
        "modeling_x.py", "tokenization_x.py"]


def test_the_written_directory_loads_only_when_its_code_is_trusted(model_dir):
    from transformers import AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_btlm.BtlmConfig",
                                  "AutoModelForCausalLM": "modeling_btlm.BtlmLMHeadModel"}
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    model = reloaded(model_dir)
    assert runs_shipped_code(model) and model.lm_head.weight is model.transformer.wte.weight


def test_dpo_paths_and_dpo_demo_take_the_flag(model_dir, tmp_path, invoke):
    """`dpo paths --model` names why every path is off; `dpo demo` trusts the code in both
    stages and in the comparison (whose greedy replies go through the model's generate)."""
    assert_one_line_error(invoke("paths", "--model", str(model_dir), "--backend", "cpu"), 2,
                          UNTRUSTED)
    found = invoke("paths", "--model", str(model_dir), "--backend", "cpu", "--json",
                   "--trust-remote-code")
    assert found.exit_code == 0, found.output
    paths = json.loads(found.stdout)["paths"]
    assert not any(p["on"] for p in paths.values())
    assert all("remote code" in p["why_off"] for p in paths.values())
    study = invoke("demo", "--model", str(model_dir), "--backend", "cpu", "--steps", "1",
                   "--held-out", "2", "--no-progress", "--output", str(tmp_path / "study"),
                   "--trust-remote-code")
    assert study.exit_code == 0, study.output
    written = json.loads((tmp_path / "study" / "comparison.json").read_text())
    assert [m["name"] for m in written["models"]] == ["base", "sft", "dpo"]


# -- training it ---------------------------------------------------------------------------------

def test_dpo_trains_it_on_the_plain_path_and_final_loads_with_transformers(
        model_dir, tmp_path, invoke):
    """Step 1: the policy is its reference, and the config's dropout (0.1) is off in training,
    so the loss is ln 2 exactly. Evaluated on its own training pairs, the loss then falls and
    the pairs come to be ranked right. final/ (with the modelling files beside the weights)
    loads with transformers and computes what our own copy of the class computes from its
    weights."""
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    result = invoke("run", *train_args(model_dir, data, tmp_path / "out", 20), "--lr", "3e-3",
                    "-o", "beta=0.5", "--eval-data", str(data), "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert result.output.count(TRUSTING) == 1
    assert PLAIN in result.output
    rows = records(tmp_path / "out")
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval/loss"] < math.log(2) - 0.05
    assert evals[-1]["eval/rewards/accuracies"] > 0.5
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["trust_remote_code"] is True
    assert run["resolved"]["paths"]["used"] == []

    final = tmp_path / "out" / "final"
    assert {"configuration_btlm.py", "modeling_btlm.py"} <= {p.name for p in final.iterdir()}
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_btlm.BtlmLMHeadModel"
    assert config["resid_pdrop"] == 0.1  # the user's dropout, not training's zeros
    loaded = reloaded(final)
    ours = BtlmLMHeadModel(BtlmConfig.from_pretrained(final)).eval()
    ours.load_state_dict(load_file(final / "model.safetensors"), strict=False)
    ours.tie_weights()
    ids = torch.tensor([[5, 60, 61, 62, 70, 80, 90]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)
        start = reloaded(model_dir)
        assert not torch.equal(loaded(ids).logits, start(ids).logits)  # it did train
    checkpoint = reloaded(tmp_path / "out" / "checkpoint-20")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, checkpoint.state_dict()[name]), name


def test_the_trust_comes_from_a_config_file_too(model_dir, tmp_path, invoke):
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    config = tmp_path / "run.toml"
    config.write_text("trust_remote_code = true\n")
    result = invoke("run", *train_args(model_dir, data, tmp_path / "out", 1),
                    "--config", str(config), "--no-eval-at-start")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["trust_remote_code"]


def test_sft_trains_it(model_dir, tmp_path, invoke):
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    result = invoke("sft", *train_args(model_dir, data, tmp_path / "out", 8), "--lr", "3e-3",
                    "--eval-data", str(data), "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert "policy speed paths: none (the plain path)" in result.output
    evals = [r for r in records(tmp_path / "out") if "eval/loss" in r]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.1
    reloaded(tmp_path / "out" / "final")


def test_resume_after_a_crash_equals_an_uninterrupted_run(model_dir, tmp_path, invoke):
    """The resumed run loads checkpoint-2's weights with the modelling code the checkpoint
    carries, and trusts it as the recorded run did."""
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    extra = ["--save-steps", "2", "--stop", "crash-at", "--grad-accum", "2",
             "--scheduler", "cosine", "--warmup-steps", "1", "--trust-remote-code"]
    straight = invoke("run", *train_args(model_dir, data, tmp_path / "straight", 5), *extra)
    assert straight.exit_code == 0, straight.output
    CrashAt.armed_at = 3  # after the checkpoint at step 2
    crashed = invoke("run", *train_args(model_dir, data, tmp_path / "resumed", 5), *extra)
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    resumed = invoke("run", "--resume", str(tmp_path / "resumed"))
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and resumed.output.count(TRUSTING) == 1
    wa = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    def deterministic(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records(out)]

    assert deterministic(tmp_path / "resumed") == deterministic(tmp_path / "straight")


def test_gradient_checkpointing_runs_the_models_own_and_changes_no_value(
        model_dir, tmp_path, invoke):
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    losses = {}
    for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        out = tmp_path / flag.strip("-")
        result = invoke("run", *train_args(model_dir, data, out, 3), flag, "--trust-remote-code",
                        "--no-eval-at-start")
        assert result.exit_code == 0, result.output
        losses[flag] = [r["loss"] for r in records(out) if "loss" in r]
    assert losses["--gradient-checkpointing"] == pytest.approx(
        losses["--no-gradient-checkpointing"], rel=1e-5)


# -- the model as our introspection sees it ------------------------------------------------------

def test_introspection_takes_it_as_an_unverified_model(model_dir):
    model, _ = load_model(str(model_dir), seed=0, trust_remote_code=True)
    paths = verified_paths(model)
    assert paths.used() == [] and "remote code" in paths.reasons()["batched"]
    assert len(decoder_layers_of(model)) == 2
    counter = FlopCounter.of(model)
    assert counter is not None and counter.layers == 2 and counter.attention_width == 64
    disable_dropout(model)
    model.train()
    ids = torch.tensor([[5, 60, 61, 62, 70]])
    assert torch.equal(model(ids).logits, model(ids).logits)


# -- the modelling code --------------------------------------------------------------------------

def tiny(**overrides) -> BtlmLMHeadModel:
    torch.manual_seed(0)
    config = BtlmConfig(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                        **overrides)
    return BtlmLMHeadModel(config).eval()


def test_alibi_slopes_are_the_papers():
    """2^(-8h/n) for h = 1..n: for n = 4 the exponents are -2, -4, -6, -8; for n = 8, -1 to -8.
    n = 6 (not a power of two): the 4 slopes of n = 4, then the odd ones of n = 8 (2^-1, 2^-3)."""
    assert alibi_slopes(4) == [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    assert alibi_slopes(8) == [2.0 ** -h for h in range(1, 9)]
    assert alibi_slopes(6) == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]


def test_alibi_bias_by_hand():
    """Query i on key j <= i gets -m (i - j); later keys and padded keys are masked."""
    slopes = torch.tensor(alibi_slopes(4))
    masked = torch.finfo(torch.float32).min
    bias = attention_bias(slopes, 3, None)
    assert bias.shape == (1, 4, 3, 3)
    assert bias[0, 0].tolist() == [[0, masked, masked], [-1 / 4, 0, masked],
                                   [-2 / 4, -1 / 4, 0]]
    assert bias[0, 3].tolist() == [[0, masked, masked], [-1 / 256, 0, masked],
                                   [-2 / 256, -1 / 256, 0]]
    padded = attention_bias(slopes, 3, torch.tensor([[0, 1, 1]]))
    assert padded[0, 1].tolist() == [[masked, masked, masked], [masked, 0, masked],
                                     [masked, -1 / 16, 0]]


def test_the_model_adds_the_bias_to_its_scores():
    """With zero queries and keys every score is the bias alone: the attention probabilities
    of head h over keys 0..i are softmax(-m_h (i - j))."""
    model = tiny()
    attn = model.transformer.h[0].attn
    seen = {}
    attn.attn_dropout.register_forward_hook(lambda m, i, o: seen.setdefault("probs", o))
    with torch.no_grad():
        attn.c_attn.weight[:64].zero_()  # the query and key rows of the fused projection
        attn.c_attn.bias[:64].zero_()
        model(torch.tensor([[1, 2, 3]]))
    slope = 1 / 16  # head 2 of 4
    want = torch.tensor([-2 * slope, -slope, 0.0]).softmax(-1)
    assert torch.allclose(seen["probs"][0, 1, 2], want, atol=1e-6)


def test_later_tokens_leave_earlier_logits_alone():
    model = tiny()
    a = torch.tensor([[3, 4, 5, 6, 7, 8]])
    b = a.clone()
    b[0, 4:] = torch.tensor([40, 41])
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert torch.equal(la[0, :4], lb[0, :4])
    assert not torch.allclose(la[0, 4:], lb[0, 4:])


def test_logps_do_not_depend_on_padding_left_or_right():
    model = tiny()
    row = [3, 4, 5, 6, 7]
    pad = 0

    def token_logps(ids, mask, real):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), attention_mask=torch.tensor([mask])).logits[0]
        logps = logits[real][:-1].log_softmax(-1)
        return logps.gather(-1, torch.tensor(row[1:])[:, None])[:, 0]

    alone = token_logps(row, [1] * 5, slice(0, 5))
    left = token_logps([pad] * 3 + row, [0] * 3 + [1] * 5, slice(3, 8))
    right = token_logps(row + [pad] * 3, [1] * 5 + [0] * 3, slice(0, 5))
    assert torch.allclose(left, alone, atol=1e-5) and torch.allclose(right, alone, atol=1e-5)
    assert torch.isfinite(model(torch.tensor([[pad] * 3 + row]),
                                attention_mask=torch.tensor([[0] * 3 + [1] * 5])).logits).all()


def test_labels_give_the_mean_next_token_cross_entropy():
    model = tiny()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    labels = ids.clone()
    labels[0, :2] = -100
    out = model(ids, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[0, 1:4], ids[0, 2:])
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_its_own_gradient_checkpointing_replays_blocks_and_keeps_the_gradient():
    model = tiny()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    model.train()
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    calls = []
    model.transformer.h[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model(ids, labels=ids).loss.backward()
    assert model.transformer.gradient_checkpointing and len(calls) == 2  # forward, then replay
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain[name], atol=1e-6), name


def test_greedy_generation_is_argmax_step_by_step():
    model = tiny()
    ids = torch.tensor([[3, 4, 5]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    want = ids
    with torch.no_grad():
        for _ in range(4):
            want = torch.cat([want, model(want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, want)


# -- with the rest of the trainer ----------------------------------------------------------------

def test_early_stopping_restores_the_best_weights_of_a_model_with_its_own_code(
        model_dir, tmp_path, invoke):
    """A stopping policy that keeps the best evaluation's weights reloads best/ at the end, with
    the model's own code: final/ then holds exactly best/'s weights."""
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    result = invoke("run", *train_args(model_dir, data, tmp_path / "out", 6), "--trust-remote-code",
                    "--eval-data", str(data), "--eval-steps", "2", "--stop", "early-stopping",
                    "-o", "early-stopping.metric=eval/rewards/margins", "-o", "early-stopping.mode=min",
                    "-o", "early-stopping.patience=5")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    # The margins grow as the policy learns: the smallest is an early evaluation's.
    assert run["restored_best_from_step"] in (0, 2, 4)
    best, final = (load_file(tmp_path / "out" / d / "model.safetensors") for d in ("best", "final"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    last = load_file(tmp_path / "out" / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(last[k], final[k]) for k in last)  # best/ was loaded back


def test_lora_sft_then_dpo_on_it_the_published_recipe(model_dir, tmp_path, invoke):
    """BTLM-chat's recipe trained LoRA adapters: SFT with one, then DPO with a new one on the
    SFT model (the adapter directory as --model: its base, loaded with its own code, with the
    SFT adapter merged), then --merge. The adapter finds the model's linear layers (GPT-2
    names), step 1 is ln 2 against the SFT model, and the merged model loads with transformers
    and the model's code, no peft."""
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    lora = ["--trust-remote-code", "--lora", "-o", "lora.r=4"]
    sft = invoke("sft", *train_args(model_dir, data, tmp_path / "out-sft", 4), *lora)
    assert sft.exit_code == 0, sft.output
    run = json.loads((tmp_path / "out-sft" / "run.json").read_text())
    assert run["resolved"]["lora"]["targets"] == ["c_attn", "c_fc", "c_proj"]
    assert run["resolved"]["lora"]["modules"] == 2 * 4  # 2 blocks: c_attn, 2 c_proj, c_fc
    untrusted = invoke("run", *train_args(tmp_path / "out-sft" / "final", data,
                                          tmp_path / "refused", 2), "--lora")
    assert untrusted.exit_code == 2 and "--trust-remote-code" in untrusted.output
    dpo = invoke("run", *train_args(tmp_path / "out-sft" / "final", data, tmp_path / "out", 4),
                 *lora, "--merge")
    assert dpo.exit_code == 0, dpo.output
    rows = [r for r in records(tmp_path / "out") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    merged = reloaded(tmp_path / "out" / "merged")
    assert type(merged).__name__ == "BtlmLMHeadModel"
