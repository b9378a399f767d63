"""The xla backend: bucketed batch widths, value-independent shapes, a bounded number of compiles
and one host read per step, and losses that match the CPU's.

Tests marked ``backend("xla")`` need torch_xla (the CI lane ``xla``: torch 2.9.0, torch-xla
2.9.0, ``PJRT_DEVICE=CPU``) and skip with the backend's own reason elsewhere. The others check
the pieces the backend relies on and run everywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dpo
from dpo.backends.xla import XLABackend
from dpo.cli import make_app
from dpo.core.data.batching import bucket_length, collate
from dpo.core.model.logps import completion_logps
from dpo.core.interfaces.plugins import get_plugin_manager, register_plugin
from dpo.core.data.tokenization import TokenizedPair
from dpo.plugins.losses.dpo import DPOLoss

XLA_AVAILABLE = XLABackend.is_available()


# -- everywhere: the pieces ------------------------------------------------------------------

def test_bucket_widths_are_few_and_padding_is_bounded():
    assert [bucket_length(n) for n in (1, 64, 65, 128, 129, 257, 512, 513, 1000, 1025)] == [
        64, 64, 128, 128, 192, 320, 512, 640, 1024, 1280]
    widths = {bucket_length(n) for n in range(1, 4097)}
    assert len({w for w in widths if w <= 512}) == 8 and len(widths) == 20
    for n in range(1, 4097):
        width = bucket_length(n)
        assert n <= width < n + max(64, n / 4)
    assert bucket_length(100, minimum=32, per_doubling=2) == 128
    with pytest.raises(ValueError, match="positive"):
        bucket_length(0)


def pair(prompt: int, chosen: int, rejected: int, start: int = 300) -> TokenizedPair:
    ids = list(range(start, start + prompt + max(chosen, rejected)))
    return TokenizedPair(tuple(ids[:prompt]), tuple(ids[prompt:prompt + chosen]),
                         tuple(ids[prompt:prompt + rejected][::-1]))


def test_collate_pads_to_the_xla_backends_buckets():
    """The width is the bucket of the longest row (70 tokens -> 128); padding adds no real or
    completion positions. XLABackend.padded_length needs no torch_xla."""
    pairs = [pair(60, 10, 5), pair(3, 2, 4)]
    plain = collate(pairs, pad_token_id=0)
    bucketed = collate(pairs, pad_token_id=0, pad_length=XLABackend().padded_length)
    assert plain.input_ids.shape == (4, 70) and bucketed.input_ids.shape == (4, 128)
    assert torch.equal(bucketed.input_ids[:, :70], plain.input_ids)
    assert not bucketed.attention_mask[:, 70:].any() and not bucketed.completion_mask[:, 70:].any()
    assert bucketed.real_tokens == plain.real_tokens == 70 + 5 + 65 + 7
    assert collate(pairs, 0, pad_to_multiple_of=96, pad_length=bucket_length).input_ids.shape[1] == 192
    with pytest.raises(ValueError, match="shorter than the longest row"):
        collate(pairs, 0, pad_length=lambda n: n - 1)


def test_masked_logps_equal_the_selected_ones_with_their_gradients(tiny_model):
    """The static-shape path (every position scored, the mask applied by where) gives the same
    log-probs, token counts and gradients as the selection path, on a padded batch."""
    batch = collate([pair(5, 4, 7), pair(9, 3, 2), pair(2, 6, 6)], pad_token_id=0,
                    pad_length=bucket_length)
    from dpo.core.model.paths import Paths

    results = []
    for paths in (Paths(batched=True, unmasked=True, chunked_head=True), Paths(static_shapes=True)):
        tiny_model.zero_grad()
        logps, counts = completion_logps(tiny_model, batch.input_ids, batch.attention_mask,
                                         batch.completion_mask, paths)
        logps.sum().backward()
        grads = [p.grad.clone() for p in tiny_model.parameters()]
        results.append((logps.detach(), counts, grads))
    (a, ca, ga), (b, cb, gb) = results
    assert torch.equal(ca, cb) and ca.tolist() == [4, 3, 6, 7, 2, 6]
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))


# -- on torch_xla ----------------------------------------------------------------------------

LONG = "Think step by step before answering, and check the sum twice: "


def write_pairs(path: Path, long: int, short: int) -> Path:
    """``long`` pairs of 70-odd tokens (bucket 128) and ``short`` ones of about 20 (bucket 64)."""
    rows = []
    for i in range(long + short):
        a, b = i % 7 + 1, i % 5 + 2
        prompt = (LONG if i < long else "") + f"What is {a} plus {b}? "
        rows.append({"prompt": prompt, "chosen": f"{a + b}.", "rejected": f"{a + b + 1}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class NanFromThirdCall(DPOLoss):
    """DPO whose loss turns NaN from its third call on (a poisoned batch)."""

    name = "nan-from-third"
    calls = 0

    def __call__(self, logps):
        out = super().__call__(logps)
        NanFromThirdCall.calls += 1
        if NanFromThirdCall.calls >= 3:
            out.losses = out.losses * float("nan")
        return out


class NanPlugin:
    @dpo.hookimpl
    def dpo_register_losses(self, register):
        register(NanFromThirdCall)


def dpo_run(*args: str):
    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, NanPlugin(), "nan-plugin")
    return CliRunner().invoke(make_app(pm), ["run", "--no-progress", *args])


@pytest.mark.backend("xla")
def test_xla_run_matches_the_cpu_with_bounded_compiles_and_one_host_read_per_step(tmp_path):
    """18 training pairs in batches of 4: per epoch, widths 128, 128, 128 (mixed), 64, and a
    short batch of 2 at width 64; 6 held-out pairs. Three epochs: every shape is seen in the
    first, so the compile count must not grow after it (a recompile per batch is the bug this
    guards against). Each step reads its metrics from the device once, nothing falls back to
    the CPU, and losses, gradient norms and evaluations match a CPU run of the same seed."""
    train = write_pairs(tmp_path / "train.jsonl", long=10, short=8)
    held_out = write_pairs(tmp_path / "eval.jsonl", long=3, short=3)
    common = ["--model", "tiny", "--data", str(train), "--eval-data", str(held_out),
              "--batch-size", "4", "--max-steps", "15", "--eval-steps", "5", "--lr", "1e-3",
              "--warmup-steps", "2"]
    runs = {}
    for backend in ("xla", "cpu"):
        out = tmp_path / backend
        result = dpo_run(*common, "--backend", backend, "--output", str(out))
        assert result.exit_code == 0, result.output
        runs[backend] = records(out)

    steps = [r for r in runs["xla"] if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 16))
    compiles = [r["xla/compiles"] for r in steps]
    assert compiles[4] == compiles[-1], compiles  # nothing new after the first epoch
    assert compiles[-1] <= 16, compiles  # 2 widths x 2 batch sizes, optimizer, metrics, eval
    # One host read per step, its metrics; the evaluations after steps 5 and 10 read theirs
    # once each, which shows in the count of the step after them.
    transfers = [r["xla/host_transfers"] for r in steps]
    reads = [later - earlier for earlier, later in zip(transfers, transfers[1:])]
    assert reads == [2 if step - 1 in (5, 10) else 1 for step in range(2, 16)], reads
    assert all(r["xla/cpu_fallbacks"] == 0 for r in steps)

    for xla, cpu in zip(runs["xla"], runs["cpu"], strict=True):
        assert xla["step"] == cpu["step"]
        for key in ("loss", "grad_norm", "rewards/margins", "eval/loss", "eval/rewards/margins"):
            if key in cpu:
                assert xla[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-4), (xla["step"], key)

    run = json.loads((tmp_path / "xla" / "run.json").read_text())
    assert run["final"]["xla/compiles"] == compiles[-1]
    assert run["resolved"]["device"] == "xla (CPU)"

    from transformers import AutoModelForCausalLM

    saved = {b: AutoModelForCausalLM.from_pretrained(tmp_path / b / "final") for b in runs}
    assert saved["xla"].lm_head.weight is saved["xla"].model.embed_tokens.weight
    for name, value in saved["cpu"].state_dict().items():
        assert torch.allclose(saved["xla"].state_dict()[name], value, atol=1e-4), name


@pytest.mark.backend("xla")
def test_xla_resume_equals_an_uninterrupted_run(tmp_path):
    """The checkpoint written from XLA tensors (CPU copies, ties kept), the optimizer state and
    the device RNG seed restore into a run that ends where an uninterrupted one does; with
    gradient accumulation, which cuts a graph per micro-batch."""
    train = write_pairs(tmp_path / "train.jsonl", long=4, short=4)
    # A constant schedule, so that stopping at step 2 and going on to 4 changes no rate.
    common = ["--model", "tiny", "--data", str(train), "--backend", "xla", "--batch-size", "2",
              "--grad-accum", "2", "--lr", "1e-3", "--scheduler", "constant",
              "--save-steps", "2", "--no-eval-at-start"]
    assert dpo_run(*common, "--max-steps", "4", "--output", str(tmp_path / "straight")).exit_code == 0
    first = dpo_run(*common, "--max-steps", "2", "--output", str(tmp_path / "resumed"))
    assert first.exit_code == 0, first.output
    resumed = dpo_run("--resume", str(tmp_path / "resumed"), "--max-steps", "4")
    assert resumed.exit_code == 0, resumed.output

    def losses(out: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in records(out) if "loss" in r]

    straight, again = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [s for s, _ in again] == [1, 2, 3, 4]
    assert [v for _, v in again] == pytest.approx([v for _, v in straight], abs=1e-6)


@pytest.mark.backend("xla")
def test_xla_sft_matches_the_cpu_and_resumes(tmp_path):
    """`dpo sft --backend xla` on pairs of two lengths (their chosen side): the token-mean loss,
    gradient norms and held-out perplexity of the CPU run, no new graph after the first epoch;
    stopped at its checkpoint and resumed, the same losses again."""
    train = write_pairs(tmp_path / "train.jsonl", long=4, short=4)
    app = make_app(get_plugin_manager(load_entrypoints=False))
    common = ["sft", "--no-progress", "--model", "tiny", "--data", str(train), "--eval-data",
              str(train), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
              "--scheduler", "constant", "--warmup-ratio", "0", "--save-steps", "3",
              "--eval-steps", "3"]
    runs = {}
    for backend in ("xla", "cpu"):
        out = tmp_path / backend
        result = CliRunner().invoke(app, [*common, "--backend", backend, "--max-steps", "6",
                                          "--output", str(out)])
        assert result.exit_code == 0, result.output
        runs[backend] = records(out)
    for xla, cpu in zip(runs["xla"], runs["cpu"], strict=True):
        for key in ("loss", "grad_norm", "eval/loss", "eval/perplexity"):
            if key in cpu:
                assert xla[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-4), (xla["step"], key)
    compiles = [r["xla/compiles"] for r in runs["xla"] if "loss" in r]
    # Two steps per epoch: every batch shape by step 2; the checkpoint after step 3 reads the
    # update's finite flag on its own, one small graph, once. Nothing new after that.
    assert compiles[3] == compiles[-1], compiles

    part = tmp_path / "part"
    first = CliRunner().invoke(app, [*common, "--backend", "xla", "--max-steps", "3",
                                     "--output", str(part)])
    assert first.exit_code == 0, first.output
    resumed = CliRunner().invoke(app, ["sft", "--no-progress", "--resume", str(part),
                                       "--max-steps", "6"])
    assert resumed.exit_code == 0, resumed.output
    losses = [r["loss"] for r in records(part) if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in runs["xla"] if "loss" in r], abs=1e-6)


@pytest.mark.backend("xla")
def test_xla_lora_matches_the_cpu_with_its_reference_the_adapter_switched_off(tmp_path):
    """`dpo run --backend xla --lora` with the reference scored in every step (the same model,
    adapter off: a second graph per batch shape, compiled once): losses, gradient norms and
    margins of the CPU run, no new graph after the first epoch, and the same adapter saved."""
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    from safetensors.torch import load_file

    train = write_pairs(tmp_path / "train.jsonl", long=4, short=4)
    common = ["--model", "tiny", "--data", str(train), "--batch-size", "2", "--max-steps", "8",
              "--lr", "1e-2", "--lora", "-o", "lora.r=4", "--no-precompute-ref",
              "--no-eval-at-start"]
    runs = {}
    for backend in ("xla", "cpu"):
        result = dpo_run(*common, "--backend", backend, "--output", str(tmp_path / backend))
        assert result.exit_code == 0, result.output
        runs[backend] = [r for r in records(tmp_path / backend) if "loss" in r]
    for xla, cpu in zip(runs["xla"], runs["cpu"], strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert xla[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-4), (xla["step"], key)
    compiles = [r["xla/compiles"] for r in runs["xla"]]
    assert compiles[3] == compiles[-1], compiles  # 4 steps an epoch: every shape by then
    adapters = {b: load_file(tmp_path / b / "final" / "adapter_model.safetensors") for b in runs}
    for name, value in adapters["cpu"].items():
        assert torch.allclose(adapters["xla"][name], value, atol=1e-4), name


@pytest.mark.backend("xla")
def test_xla_configure_model_reties_weights_and_uses_eager_attention(tiny_model):
    """Moving to an XLA device unties the embedding and the output head (new Parameter objects);
    configure_model ties them again and swaps sdpa (which reads masks on the host) for eager."""
    backend = XLABackend()
    device = backend.device()
    tiny_model.to(device)
    assert tiny_model.lm_head.weight is not tiny_model.model.embed_tokens.weight
    backend.configure_model(tiny_model)
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    assert tiny_model.config._attn_implementation == "eager"
    assert len(list(tiny_model.parameters())) == len(list(tiny_model.state_dict())) - 1
    assert backend.default_dtype() == torch.float32  # PJRT on the CPU; bf16 on TPUs
    assert backend.peak_flops(torch.bfloat16) is None  # not a TPU
    assert backend.memory_stats().peak_bytes is None  # the CPU client keeps no statistics
    assert not math.isnan(backend.step_metrics()["xla/compiles"])


@pytest.mark.backend("xla")
def test_xla_non_finite_loss_skips_the_update_and_nan_guard_stops(tmp_path):
    """The skip is decided on the host from the step's one metrics read: no extra read, the
    update is not applied, nan-guard stops at step 3 and writes no checkpoint, as on the CPU."""
    NanFromThirdCall.calls = 0
    train = write_pairs(tmp_path / "train.jsonl", long=4, short=4)
    out = tmp_path / "out"
    result = dpo_run("--model", "tiny", "--data", str(train), "--backend", "xla",
                     "--loss", "nan-from-third", "--batch-size", "4", "--max-steps", "6",
                     "--output", str(out))
    assert result.exit_code == 1, result.output
    assert "step 3: non-finite loss or gradient; update skipped" in result.output
    assert "stopped by nan-guard at step 3" in result.output
    assert not [p for p in out.iterdir() if p.name.startswith("checkpoint") or p.name == "final"]
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and math.isnan(steps[-1]["loss"])
    transfers = [r["xla/host_transfers"] for r in steps]
    assert [b - a for a, b in zip(transfers, transfers[1:])] == [1, 1]
