"""Our DPO training step against Hugging Face TRL's ``DPOTrainer``, on the same batches.

Both trainers fine-tune SmolLM2-135M-Instruct (float32, CPU, by default) with the sigmoid DPO
loss on the same Anthropic HH-RLHF pairs, in file order, ``--batch-size`` pairs a step, no
shuffling and no length grouping. Each run is a child process of its own (for a clean
peak-memory figure), and the two alternate: ours, TRL, ours, TRL, ... for ``--repeats`` rounds.
One table compares throughput, step time, peak memory, end-to-end wall time and the first
step's loss and metrics.

TRL lives in a separate virtualenv (never this project's), made once:

    python -m venv .bench/trl && .bench/trl/bin/pip install -r benchmarks/requirements-trl.txt

then, from the repository root, with this project's environment:

    python benchmarks/vs_trl.py                           # 6 steps x 2 rounds
    python benchmarks/vs_trl.py --steps 2 --repeats 1     # a quick check
    python benchmarks/vs_trl.py --json out/vs_trl.json    # also write the results
    python benchmarks/vs_trl.py --device cuda --dtype bfloat16 --random-model llama-1b \\
        --batch-size 8                                    # a 1B Llama on one NVIDIA GPU

What is compared:

- Data: pairs from ``../shared/data/hh-rlhf-harmless-base-test-2000.jsonl.gz`` beside the
  repository (``--data``). The prompt is each dialogue up to and including its last
  ``"\\n\\nAssistant:"``; the completions are the rest of the chosen and the rejected dialogue. Only
  pairs that neither trainer truncates and that both tokenize to the same ids are used (prompt
  alone, each completion alone plus EOS; TRL tokenizes prompt + completion as one text and splits
  at the common prefix, so a pair whose boundary merges into one token would differ and is
  skipped). The chosen pairs go to one JSONL file that both children read.
- Ours: ``python -m dpo run`` with its defaults for what is not pinned here; in particular the
  reference log-probs are computed once before training (reported as "one-off before training",
  and the reference model is then not in memory). The file is fresh for every run, so each run pays
  for it. ``--ours-arg`` passes further flags (e.g. ``--ours-arg=--no-precompute-ref`` for a frozen
  reference model scoring each batch, as TRL does). It writes its final model at the end, which is
  part of its end-to-end wall time; TRL saves nothing.
- TRL: ``DPOTrainer`` with ``DPOConfig`` as close as it allows (sequential sampler, no gradient
  checkpointing, bf16 only with ``--dtype bfloat16``, constant learning rate, reference = a
  second copy of the model), and TRL's own optimizer default (``adamw_torch_fused``).
- Step time: from fetching the step's batch to the end of its optimizer step (ours: as logged in
  its metrics.jsonl; TRL: measured around ``get_batch_samples`` and ``on_step_end``). The first
  step of each child is left out of step-time and throughput statistics (warm-up) when there is
  more than one step. Tokens/s = tokens of the counted steps / their summed step time; "real"
  counts the non-pad prompt + completion tokens of the chosen and rejected rows, "padded" the
  rows x width of the tensors run.
- Peak memory: on CPU, the child's maximum resident set size (``os.wait4``). On CUDA, the
  caching allocator's peak (``torch.cuda.max_memory_allocated``: tensors only, not the
  allocator's reserve or the CUDA context), reset when each step's batch is fetched and read
  at the step's end, the largest over the child's steps (ours: ``peak_memory_gb`` of its
  metrics.jsonl; TRL: measured the same way around its steps).

Device and precision:

- ``--device cuda`` (default ``cpu``): ours runs ``dpo run --backend cuda``, TRL trains on the
  GPU (``use_cpu=False``). Both children see one GPU: the first of ``CUDA_VISIBLE_DEVICES``
  (GPU 0 when unset), so that TRL's Trainer cannot spread over several. TRL's step clock
  waits for the GPU (``torch.cuda.synchronize``) before it stops, as ours does. Both
  interpreters are checked for a usable GPU before anything runs.
- ``--dtype bfloat16`` (default ``float32``): ours ``--dtype bfloat16``, TRL ``bf16=True``.
  Both keep float32 weights, gradients and optimizer state and run the forward (the
  reference's too) under bf16 autocast: ours always loads float32 and autocasts; TRL is
  given ``model_init_kwargs={"dtype": "float32"}`` (its reference copy follows the policy's
  dtype) and its ``bf16=True`` is Accelerate's bf16 autocast around both models' forward.
  Neither side casts the weights themselves to bf16.
- ``--random-model llama-1b|tiny`` (default: none, the SmolLM2 model above): a
  ``LlamaForCausalLM`` with random weights (fixed seed), saved once per workdir as a Hugging
  Face directory (``WORKDIR/models/random-PRESET``, float32) with the tokenizer of the
  default model, so both sides see the same token ids; the vocabulary is the tokenizer's
  length rounded up to a multiple of 64. It is rebuilt only when the saved description
  (configuration, seed, tokenizer) differs. ``llama-1b``: hidden 2048, 16 layers, 32 query
  and 8 key/value heads, MLP 8192, rope theta 500000, untied embeddings (1.17B parameters
  with the 49,152-token vocabulary). ``tiny``: a 3M-parameter Llama to try the mechanics on
  CPU.
- Model FLOPs (CUDA only): both sides are counted by one formula, ``dpo.core.model.flops``
  (``FlopCounter``: policy forward + backward, plus the reference forward when it runs in the
  step). Ours: as its metrics.jsonl logs them (``tflops`` x ``step_time``); its reference
  forward counts only when the reference scores the batch in the step, not when its
  log-probs were computed before training (the default; ``--ours-arg=--no-precompute-ref``
  puts it in the step). TRL: from the real row lengths and completion tokens of the tensors
  it ran each step, with the reference forward it runs every step. "model TFLOP/s" is the
  counted steps' FLOPs over their summed step time; "MFU" divides that by the GPU's dense
  peak for the dtype, as the dpo cuda backend knows it ("-" for a GPU not in its table).

Both children get the same environment; ``--threads N`` sets ``OMP_NUM_THREADS`` for both
(default: left as it is).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test-2000.jsonl.gz"
DEFAULT_TRL_PYTHON = Path(".bench") / "trl" / "bin" / "python"
DEFAULT_WORKDIR = Path(".bench") / "vs_trl"
TRL_SETUP = ("python -m venv .bench/trl && "
             ".bench/trl/bin/pip install -r benchmarks/requirements-trl.txt")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
ASSISTANT = "\n\nAssistant:"
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
RESULT_MARKER = "VS_TRL_RESULT "  # the TRL child's one line of results on stdout
SIDES = ("ours", "trl")
Row = tuple[str, str, str, str]  # a table row: label, ours, TRL, comparison
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16")

# Random-weight Llama models (--random-model): the shape of each, beside the tokenizer's
# vocabulary. Position embeddings are rotary (no parameters), so a generous maximum is free.
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "llama-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 8192, "rope_theta": 500000.0,
                 "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 256, "rope_theta": 10000.0,
             "tie_word_embeddings": True},
}
RANDOM_MODEL_SEED = 20240601
RANDOM_MODEL_POSITIONS = 8192  # max_position_embeddings; --max-length may not exceed it
VOCAB_MULTIPLE = 64  # the embedding and output matrices' rows, rounded up for tensor cores
RANDOM_MODEL_MARKER = "vs_trl-random-model.json"  # what a saved random model was built from


@dataclass
class Settings:
    """What both children train with."""

    model: str
    pairs: str
    steps: int
    batch_size: int
    max_length: int
    max_prompt_length: int
    beta: float
    lr: float
    seed: int
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast over float32 weights)


@dataclass
class ChildResult:
    """One child's run: per-step figures, the first step's metrics and process-level costs."""

    side: str
    step_times: list[float]
    real_tokens: list[int]
    padded_tokens: list[int]
    losses: list[float]
    first_step: dict[str, float]
    one_off_s: float | None = None  # work before the first step that the trainer reports
    wall_s: float = 0.0  # the child process, start to exit
    peak_rss_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    peak_device_bytes: int | None = None  # CUDA allocator's peak over the steps (cuda only)
    row_lengths: list[list[int]] = field(default_factory=list)  # real tokens of each row, a step
    completion_tokens: list[int] = field(default_factory=list)  # chosen + rejected, a step
    step_flops: list[float] = field(default_factory=list)  # model FLOPs of each step (cuda)


# -- data ----------------------------------------------------------------------------------------

def split_dialogue(text: str) -> tuple[str, str] | None:
    """(prompt up to and including the last Assistant turn marker, the completion after it)."""
    at = text.rfind(ASSISTANT)
    if at < 0:
        return None
    cut = at + len(ASSISTANT)
    return text[:cut], text[cut:]


def select_pairs(data: Path, model_dir: str, count: int, max_length: int,
                 max_prompt_length: int) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The first ``count`` usable pairs of ``data`` in file order, and why others were skipped.

    Usable: one prompt shared by chosen and rejected, two different non-blank completions, no
    truncation by either trainer (prompt <= ``max_prompt_length`` tokens, prompt + completion +
    EOS <= ``max_length`` on both sides), and the same token ids from both trainers' tokenization.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    # Our rule: a BOS in front of the prompt only if the tokenizer adds one by itself.
    auto_bos = [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    skipped = {"no_assistant_turn": 0, "prompts_differ": 0, "blank_or_identical": 0,
               "too_long": 0, "token_boundary": 0}
    chosen_pairs: list[dict[str, str]] = []
    with gzip.open(data, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(chosen_pairs) == count:
                break
            if not line.strip():
                continue
            record = json.loads(line)
            good, bad = split_dialogue(record["chosen"]), split_dialogue(record["rejected"])
            if good is None or bad is None:
                skipped["no_assistant_turn"] += 1
                continue
            (prompt, chosen), (other_prompt, rejected) = good, bad
            if prompt != other_prompt:
                skipped["prompts_differ"] += 1
                continue
            if not chosen.strip() or not rejected.strip() or chosen == rejected:
                skipped["blank_or_identical"] += 1
                continue
            prompt_ids = auto_bos + ids(prompt)
            completions = [ids(chosen) + [eos], ids(rejected) + [eos]]
            if (len(prompt_ids) > max_prompt_length
                    or any(len(prompt_ids) + len(c) > max_length for c in completions)):
                skipped["too_long"] += 1
                continue
            # TRL: tokenizer(prompt) and tokenizer(prompt + completion + eos_token), special
            # tokens added by the tokenizer's own rule; the completion is what follows the prompt.
            trl_prompt = list(tokenizer(prompt)["input_ids"])
            trl_whole = [list(tokenizer(prompt + text + tokenizer.eos_token)["input_ids"])
                         for text in (chosen, rejected)]
            if trl_prompt != prompt_ids or any(whole != prompt_ids + c
                                               for whole, c in zip(trl_whole, completions)):
                skipped["token_boundary"] += 1
                continue
            chosen_pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return chosen_pairs, {k: v for k, v in skipped.items() if v}


# -- model ---------------------------------------------------------------------------------------

_RESOLVE_DEFAULT = f"""
import sys
from pathlib import Path
from dpo.core.model.loading import converted_gguf, resolve_source
source = resolve_source({DEFAULT_MODEL_NAME!r})
if source.kind == "gguf":
    print(converted_gguf(Path(source.location), announce=True))
elif source.kind == "directory":
    print(source.location)
else:
    sys.exit(f"{{source.describe()}} is not a local model; pass --model DIR")
"""


def default_model(python: str) -> str:
    """The local directory our package loads for its default model (converted once from the
    GGUF file it ships with, and cached)."""
    done = subprocess.run([python, "-c", _RESOLVE_DEFAULT], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"could not resolve the default model {DEFAULT_MODEL_NAME} through "
                         f"the dpo package ({tail}); pass --model DIR")
    return done.stdout.strip().splitlines()[-1]


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def random_model_config(preset: str, vocab: int, bos: int | None, eos: int | None,
                        pad: int | None) -> dict[str, Any]:
    """``LlamaConfig`` keywords of the random model ``preset`` for a tokenizer of ``vocab``
    tokens (its length, added tokens included) and these special token ids."""
    shape = dict(RANDOM_MODELS[preset])
    rope_theta = shape.pop("rope_theta")
    return {
        **shape,
        "vocab_size": round_up(vocab),
        "hidden_act": "silu",
        "max_position_embeddings": RANDOM_MODEL_POSITIONS,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def llama_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Llama with these ``LlamaConfig`` keywords (without building it)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o; k, v
    mlp = 3 * hidden * config["intermediate_size"]  # gate, up, down
    layer = attention + mlp + 2 * hidden  # and two RMS norms
    embeddings = vocab * hidden * (1 if config["tie_word_embeddings"] else 2)
    return config["num_hidden_layers"] * layer + hidden + embeddings  # + the final norm


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    import hashlib

    described = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()),
                            "special": tokenizer.special_tokens_map}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()


def random_model(preset: str, tokenizer_dir: str, root: Path) -> tuple[str, int]:
    """The directory of the random model ``preset`` under ``root`` (built there once, or
    again when what it was built from changed) and its parameter count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = random_model_config(preset, len(tokenizer), tokenizer.bos_token_id,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id)
    wanted = {"preset": preset, "seed": RANDOM_MODEL_SEED, "config": config,
              "tokenizer": _tokenizer_fingerprint(tokenizer)}
    target = root / f"random-{preset}"
    marker = target / RANDOM_MODEL_MARKER
    if marker.is_file() and (target / "config.json").is_file():
        try:
            saved = json.loads(marker.read_text())
        except ValueError:
            saved = {}
        if {k: saved.get(k) for k in wanted} == wanted:
            return str(target), int(saved["parameters"])

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"building the random model {preset} (seed {RANDOM_MODEL_SEED}) in {target}",
          flush=True)
    building = root / f"random-{preset}.building"
    shutil.rmtree(building, ignore_errors=True)
    torch.manual_seed(RANDOM_MODEL_SEED)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(building)
    del model
    tokenizer.save_pretrained(building)
    (building / RANDOM_MODEL_MARKER).write_text(
        json.dumps({**wanted, "parameters": parameters}, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return str(target), parameters


def flop_counter(model_dir: str) -> Any:
    """``dpo.core.model.flops.FlopCounter`` of the model in ``model_dir``, read from a weightless
    copy of it (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo.core.model.flops import FlopCounter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    counter = FlopCounter.of(model)
    if counter is None:
        raise SystemExit(f"cannot count the model FLOPs of {model_dir}")
    return counter


def trl_step_flops(counter: Any, row_lengths: list[list[int]],
                   completion_tokens: list[int]) -> list[float]:
    """Model FLOPs of each TRL step: policy forward + backward and the reference forward
    (which TRL runs every step), over the real rows it ran."""
    return [counter.train_step(rows, completion, reference_forward=True)
            for rows, completion in zip(row_lengths, completion_tokens)]


# -- device checks -------------------------------------------------------------------------------

_PROBE_OURS = """
import json, sys
import torch
from dpo.backends.cuda import CUDABackend
backend = CUDABackend()
reason = backend.unavailable_reason()
if reason is not None:
    print(json.dumps({"error": reason}))
else:
    backend.device(0)
    print(json.dumps({
        "name": torch.cuda.get_device_name(0),
        "dtypes": [str(d).removeprefix("torch.") for d in backend.supported_dtypes()],
        "peak_flops": backend.peak_flops(getattr(torch, sys.argv[1])),
    }))
"""

_PROBE_TRL = """
import json
import torch
if torch.version.cuda is None:
    print(json.dumps({"error": f"its torch {torch.__version__} is built without CUDA"}))
elif not torch.cuda.is_available():
    print(json.dumps({"error": f"its torch {torch.__version__} sees no CUDA device"}))
else:
    print(json.dumps({"name": torch.cuda.get_device_name(0),
                      "bf16": torch.cuda.is_bf16_supported(including_emulation=False)}))
"""


def _probe(python: str, code: str, args: list[str], env: dict[str, str], who: str
           ) -> dict[str, Any]:
    done = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"--device cuda: could not check the GPU with {who} ({tail})")
    return json.loads(lines[-1])


def check_cuda(python: str, trl_python: str, dtype: str, env: dict[str, str]
               ) -> dict[str, Any]:
    """The GPU both children will use, as both interpreters see it: its name and dense peak
    FLOP/s for ``dtype`` (None when the dpo cuda backend does not know it). Exits with one
    line when either interpreter cannot train on it in ``dtype``."""
    ours = _probe(python, _PROBE_OURS, [dtype], env, f"this project's interpreter {python}")
    if "error" in ours:
        raise SystemExit(f"--device cuda: this project's interpreter {python} cannot use "
                         f"CUDA: {ours['error']}")
    if dtype not in ours["dtypes"]:
        raise SystemExit(f"--dtype {dtype}: the dpo cuda backend supports "
                         f"{', '.join(ours['dtypes'])} on {ours['name']}")
    trl = _probe(trl_python, _PROBE_TRL, [], env, f"the TRL interpreter {trl_python}")
    if "error" in trl:
        raise SystemExit(f"--device cuda: the TRL interpreter {trl_python} cannot use CUDA: "
                         f"{trl['error']}")
    if dtype == "bfloat16" and not trl["bf16"]:
        raise SystemExit(f"--dtype bfloat16: {trl['name']} has no native bf16")
    return {"name": ours["name"], "peak_flops": ours["peak_flops"]}


def one_gpu(env: dict[str, str]) -> str:
    """The CUDA_VISIBLE_DEVICES entry both children get: the first one visible."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "0"
    first = visible.split(",")[0].strip()
    if not first:
        raise SystemExit(f'--device cuda: CUDA_VISIBLE_DEVICES="{visible}" hides every GPU')
    return first


# -- children ------------------------------------------------------------------------------------

def run_child(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, int]:
    """Run ``command`` with stdout and stderr to ``log``: (exit code, wall seconds, peak RSS
    bytes of the process)."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss * 1024  # Linux reports KiB


def failed(side: str, log: Path, code: int) -> SystemExit:
    lines = log.read_text(errors="replace").splitlines()
    tail = "\n".join("  " + line for line in lines[-25:])
    return SystemExit(f"{side} child failed (exit {code}); the end of {log}:\n{tail}")


def run_ours(settings: Settings, python: str, workdir: Path, env: dict[str, str],
             extra_args: list[str]) -> ChildResult:
    run_dir, ref_file = workdir / "run", workdir / "ref-logps.safetensors"
    command = [
        python, "-m", "dpo", "run", "--model", settings.model, "--data", settings.pairs,
        "--format", "preference", "--batch-size", str(settings.batch_size),
        "--max-steps", str(settings.steps), "--max-length", str(settings.max_length),
        "--max-prompt-length", str(settings.max_prompt_length), "--lr", str(settings.lr),
        "--scheduler", "constant", "--warmup-steps", "0", "--loss", "dpo",
        "-o", f"dpo.beta={settings.beta}", "--seed", str(settings.seed),
        "--output", str(run_dir), "--overwrite", "--no-progress", "--save-steps", "0",
        "--no-eval-at-start", "--backend", settings.device, "--dtype", settings.dtype,
        "--no-shuffle", "--no-group-by-length", "--ref-logps", str(ref_file), *extra_args,
    ]
    log = workdir / "child.log"
    code, wall, rss = run_child(command, log, env)
    if code != 0:
        raise failed("ours", log, code)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    steps = [r for r in rows if "step_time" in r and not any(k.startswith("eval/") for k in r)]
    if len(steps) != settings.steps:
        raise SystemExit(f"ours: {len(steps)} training steps logged, {settings.steps} expected "
                         f"(see {run_dir / 'metrics.jsonl'})")
    record = json.loads((run_dir / "run.json").read_text())
    reference = (record.get("resolved") or {}).get("reference_logps") or {}
    peak_device = None
    if settings.device == "cuda" and all("peak_memory_gb" in r for r in steps):
        peak_device = round(max(r["peak_memory_gb"] for r in steps) * 2**30)
    # The step's model FLOPs as dpo.core.model.flops counted them (tflops = FLOPs / step time).
    flops = ([r["tflops"] * 1e12 * r["step_time"] for r in steps]
             if all("tflops" in r for r in steps) else [])
    return ChildResult(
        side="ours",
        step_times=[r["step_time"] for r in steps],
        real_tokens=[round(r["tokens_per_second"] * r["step_time"]) for r in steps],
        padded_tokens=[round(r["padded_tokens_per_second"] * r["step_time"]) for r in steps],
        losses=[r["loss"] for r in steps],
        first_step={k: steps[0][k] for k in METRICS},
        one_off_s=reference.get("seconds"),
        wall_s=wall, peak_rss_bytes=rss,
        extra={"reference": (record.get("resolved") or {}).get("reference"),
               "data": (record.get("data") or {}).get("train"),
               "device": (record.get("resolved") or {}).get("device")},
        peak_device_bytes=peak_device, step_flops=flops,
    )


def run_trl(settings: Settings, python: str, workdir: Path, env: dict[str, str]) -> ChildResult:
    command = [python, str(Path(__file__).resolve()), "--child", "trl",
               "--child-settings", json.dumps(asdict(settings)),
               "--child-output", str(workdir / "run")]
    log = workdir / "child.log"
    code, wall, rss = run_child(command, log, env)
    if code != 0:
        raise failed("trl", log, code)
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if line.startswith(RESULT_MARKER)]
    if not lines:
        raise failed("trl", log, code)
    result = ChildResult(**json.loads(lines[-1][len(RESULT_MARKER):]))
    result.wall_s, result.peak_rss_bytes = wall, rss
    return result


def trl_child(settings: Settings, output: str) -> None:
    """The TRL side, run with the TRL interpreter: train and print one line of results."""
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = settings.device == "cuda"

    datasets.disable_progress_bars()
    with open(settings.pairs, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    dataset = datasets.Dataset.from_list(records)  # plain text: TRL appends the EOS itself

    class Clock(TrainerCallback):
        """Step times (batch fetch to end of optimizer step), tokens, the logged metrics and,
        on CUDA, each step's peak of the caching allocator."""

        def __init__(self) -> None:
            self.batch_started = 0.0
            self.step_times: list[float] = []
            self.real: list[int] = []
            self.padded: list[int] = []
            self.rows: list[list[int]] = []
            self.completion: list[int] = []
            self.peaks: list[int] = []
            self.logs: list[dict[str, float]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:  # the step's kernels are queued, not necessarily done
                torch.cuda.synchronize()
            self.step_times.append(time.perf_counter() - self.batch_started)
            if cuda:
                self.peaks.append(torch.cuda.max_memory_allocated())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs and "rewards/chosen" in logs:
                self.logs.append(dict(logs))

    clock = Clock()

    class TimedDPOTrainer(DPOTrainer):
        """Starts the step clock when the step's batch is fetched (and collated), as ours does,
        and counts the tokens of the tensors the model runs on."""

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
            clock.batch_started = time.perf_counter()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if batches:
                # Rows 0..B-1 chosen, B..2B-1 rejected: prompt + completion, right-padded.
                rows = [n for b in batches for n in b["attention_mask"].sum(dim=1).tolist()]
                clock.rows.append(rows)
                clock.real.append(sum(rows))
                clock.padded.append(sum(b["input_ids"].numel() for b in batches))
                clock.completion.append(sum(int(b["completion_mask"].sum()) for b in batches))
            return batches, num_items

    config = DPOConfig(
        output_dir=output,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        max_length=settings.max_length,  # TRL 1.16 has no max_prompt_length; nothing is cut
        beta=settings.beta,
        loss_type=["sigmoid"],
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # DPOConfig's default is True
        bf16=settings.dtype == "bfloat16",  # autocast; DPOConfig's default is True unless fp16
        fp16=False,
        use_cpu=not cuda,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        max_steps=settings.steps,
        seed=settings.seed,
        train_sampling_strategy="sequential",  # file order, no length grouping
        dataloader_num_workers=0,
        disable_tqdm=True,
        precompute_ref_log_probs=False,
        padding_free=False,
        model_init_kwargs={"dtype": "float32"},
    )
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = TimedDPOTrainer(model=settings.model, ref_model=None, args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[clock])
    trainer.train()

    if not clock.logs:
        raise SystemExit("trl: no training step was logged")
    result = ChildResult(
        side="trl", step_times=clock.step_times, real_tokens=clock.real,
        padded_tokens=clock.padded, losses=[log["loss"] for log in clock.logs],
        first_step={k: float(clock.logs[0][k]) for k in METRICS},
        extra={"versions": _versions(("trl", "transformers", "torch", "accelerate", "datasets")),
               "optimizer": str(getattr(config.optim, "value", config.optim)),
               "device": torch.cuda.get_device_name() if cuda else "cpu"},
        peak_device_bytes=max(clock.peaks) if clock.peaks else None,
        row_lengths=clock.rows, completion_tokens=clock.completion,
    )
    print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in packages}


# -- summary -------------------------------------------------------------------------------------

def counted(results: list[ChildResult]) -> tuple[list[float], int, int]:
    """Step times, real and padded tokens of every child's steps after the first (all steps
    when there is only one)."""
    times: list[float] = []
    real = padded = 0
    for r in results:
        skip = 1 if len(r.step_times) > 1 else 0
        times += r.step_times[skip:]
        real += sum(r.real_tokens[skip:])
        padded += sum(r.padded_tokens[skip:])
    return times, real, padded


def counted_flops(results: list[ChildResult]) -> float | None:
    """Model FLOPs of the steps that ``counted`` keeps; None unless every step has them."""
    total = 0.0
    for r in results:
        if not r.step_times or len(r.step_flops) != len(r.step_times):
            return None
        skip = 1 if len(r.step_times) > 1 else 0
        total += sum(r.step_flops[skip:])
    return total


def utilisation(flops: float | None, seconds: float, peak_flops: float | None
                ) -> tuple[float | None, float | None]:
    """(model TFLOP/s, MFU as a fraction of the peak) of ``flops`` done in ``seconds``."""
    if flops is None or seconds <= 0:
        return None, None
    rate = flops / seconds
    return rate / 1e12, (rate / peak_flops if peak_flops else None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def spread(times: list[float]) -> tuple[str, float, float]:
    """("min-max", lo, hi) for fewer than 10 values, else ("p10-p90", ...)."""
    ordered = sorted(times)
    if len(ordered) < 10:
        return "min-max", ordered[0], ordered[-1]
    q = statistics.quantiles(ordered, n=10, method="inclusive")
    return "p10-p90", q[0], q[-1]


def summarise(results: dict[str, list[ChildResult]],
              setup: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-side figures, ours/TRL ratios and the first step's differences. ``setup``: the
    device ("cpu" or "cuda"), dtype, GPU name and its peak FLOP/s (``peak_flops``, for MFU)."""
    setup = setup or {"device": "cpu", "dtype": "float32"}
    out: dict[str, Any] = {"setup": setup}
    for side, runs in results.items():
        times, real, padded = counted(runs)
        label, lo, hi = spread(times)
        one_off = [r.one_off_s for r in runs if r.one_off_s is not None]
        device_peaks = [r.peak_device_bytes for r in runs]
        tflops, mfu = utilisation(counted_flops(runs), sum(times), setup.get("peak_flops"))
        out[side] = {
            "real_tokens_per_s": real / sum(times),
            "padded_tokens_per_s": padded / sum(times),
            "step_time_median_s": statistics.median(times),
            "step_time_spread": [label, lo, hi],
            "counted_steps": len(times),
            "peak_rss_gib": max(r.peak_rss_bytes for r in runs) / 2**30,
            "one_off_s": statistics.median(one_off) if one_off else None,
            "wall_s": statistics.median(r.wall_s for r in runs),
            "first_step": runs[0].first_step,
            "real_tokens_per_step": runs[0].real_tokens,
            "padded_tokens_per_step": runs[0].padded_tokens,
            "peak_device_gib": (max(device_peaks) / 2**30
                                if device_peaks and None not in device_peaks else None),
            "model_tflops": tflops,
            "mfu": mfu,
        }
    ours, trl = out["ours"], out["trl"]
    out["ratios"] = {
        "real_tokens_per_s": ours["real_tokens_per_s"] / trl["real_tokens_per_s"],
        "padded_tokens_per_s": ours["padded_tokens_per_s"] / trl["padded_tokens_per_s"],
        "step_time_median": ours["step_time_median_s"] / trl["step_time_median_s"],
        "peak_rss": ours["peak_rss_gib"] / trl["peak_rss_gib"],
        "wall": ours["wall_s"] / trl["wall_s"],
        "peak_device": _ratio(ours["peak_device_gib"], trl["peak_device_gib"]),
        "model_tflops": _ratio(ours["model_tflops"], trl["model_tflops"]),
        "mfu": _ratio(ours["mfu"], trl["mfu"]),
    }
    out["first_step_abs_diff"] = {k: abs(ours["first_step"][k] - trl["first_step"][k])
                                  for k in METRICS}
    out["same_real_tokens"] = ours["real_tokens_per_step"] == trl["real_tokens_per_step"]
    return out


def table(summary: dict[str, Any], steps: int, repeats: int, batch_size: int) -> str:
    ours, trl, ratio = summary["ours"], summary["trl"], summary["ratios"]
    if steps > 1:
        warm = (f"step{'' if steps == 2 else 's'} {'2' if steps == 2 else f'2-{steps}'} of each "
                "child (the first left out as warm-up)")
    else:
        warm = "the only step of each child"
    head = (f"ours vs TRL: {repeats} round(s) x {steps} step(s) of {batch_size} pairs; step "
            f"figures over {warm}, {ours['counted_steps']} step(s) a side")
    setup = summary.get("setup") or {"device": "cpu", "dtype": "float32"}
    cuda = setup["device"] == "cuda"
    if cuda:
        head += f"\non {setup.get('gpu') or 'CUDA'}, {setup['dtype']} autocast"
    elif setup["dtype"] != "float32":
        head += f"\non the CPU, {setup['dtype']} autocast"
    if setup.get("model"):
        head += f"; model {setup['model']}"

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def compared(name: str, key: str, fmt: str, ratio_key: str | None = None) -> Row:
        return (name, num(ours[key], fmt), num(trl[key], fmt),
                num(ratio[ratio_key], ".3f") if ratio_key else "")

    def span(side: dict[str, Any]) -> str:
        return "{:.3f}-{:.3f}".format(*side["step_time_spread"][1:])

    def percent(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    if cuda:
        memory = compared("peak CUDA allocated (GiB)", "peak_device_gib", ".3f", "peak_device")
    else:
        memory = compared("peak RSS (GiB)", "peak_rss_gib", ".3f", "peak_rss")
    device_rows: list[Row] = []
    if cuda:
        peak = setup.get("peak_flops")
        mfu_label = (f"MFU (of {peak / 1e12:g} TFLOP/s)" if peak else "MFU (peak unknown)")
        device_rows = [
            compared("model TFLOP/s", "model_tflops", ".1f", "model_tflops"),
            (mfu_label, percent(ours["mfu"]), percent(trl["mfu"]), num(ratio["mfu"], ".3f")),
        ]

    performance: list[Row] = [
        ("", "ours", "TRL", "ours/TRL"),
        compared("real tokens/s", "real_tokens_per_s", ".1f", "real_tokens_per_s"),
        compared("padded tokens/s", "padded_tokens_per_s", ".1f", "padded_tokens_per_s"),
        compared("step time median (s)", "step_time_median_s", ".3f", "step_time_median"),
        (f"step time {ours['step_time_spread'][0]} (s)", span(ours), span(trl), ""),
        memory,
        compared("one-off before training (s)", "one_off_s", ".2f"),
        compared("end-to-end wall (s)", "wall_s", ".2f", "wall"),
        *device_rows,
    ]
    first_step: list[Row] = [("first step", "ours", "TRL", "|diff|")] + [
        (k, num(ours["first_step"][k], ".8g"), num(trl["first_step"][k], ".8g"),
         num(summary["first_step_abs_diff"][k], ".2e")) for k in METRICS]
    widths = [max(len(r[i]) for r in performance + first_step) for i in range(4)]
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    lines = [head]
    for section in (performance, first_step):
        lines.append(rule)
        lines += ["  ".join([r[0].ljust(widths[0])]
                            + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip()
                  for r in section]
    if not summary["same_real_tokens"]:
        lines.append("note: the two sides counted different real tokens per step: "
                     f"ours {ours['real_tokens_per_step']}, TRL {trl['real_tokens_per_step']}")
    if cuda:
        lines.append("model FLOPs by dpo.core.model.flops on both sides: policy forward + backward, "
                     "and the reference forward where it runs in the step (TRL: every step)")
        if ours["one_off_s"] is not None:
            lines.append("note: ours computed its reference log-probs before training, so its "
                         "FLOPs hold no reference forward; --ours-arg=--no-precompute-ref puts "
                         "it in the step, as TRL does")
        if not setup.get("peak_flops"):
            lines.append(f"note: no {setup['dtype']} peak FLOP/s known for "
                         f"{setup.get('gpu') or 'this GPU'}: no MFU")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of ours then TRL (default 2)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF JSONL(.gz)")
    p.add_argument("--model", help="local Hugging Face model directory (default: the directory "
                   f"the dpo package loads for {DEFAULT_MODEL_NAME})")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter with this project installed (default: this one)")
    p.add_argument("--trl-python", type=Path, default=DEFAULT_TRL_PYTHON,
                   help=f"interpreter of the TRL virtualenv (default {DEFAULT_TRL_PYTHON})")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both children")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where both sides train (default cpu; cuda: one NVIDIA GPU)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32, or bfloat16 autocast over float32 weights (default float32)")
    p.add_argument("--random-model", choices=list(RANDOM_MODELS),
                   help="train a random-weight Llama (built once in WORKDIR/models, with the "
                   "default model's tokenizer) instead of the default model")
    p.add_argument("--ours-arg", action="append", default=[],
                   help="extra flag for `dpo run` (repeatable; --ours-arg=--flag)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"pairs file, child logs and run directories (default {DEFAULT_WORKDIR})")
    p.add_argument("--keep", action="store_true", help="keep the children's run directories")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    p.add_argument("--child-settings", help=argparse.SUPPRESS)
    p.add_argument("--child-output", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "trl":
        trl_child(Settings(**json.loads(args.child_settings)), args.child_output)
        return
    for name in ("steps", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.max_prompt_length < args.max_length:
        raise SystemExit("--max-prompt-length must be at least 1 and below --max-length")
    data = args.data if args.data.is_absolute() else Path.cwd() / args.data
    if not data.is_file():
        raise SystemExit(f"no data file {data}; give the HH-RLHF JSONL(.gz) with --data")
    trl_python = args.trl_python if args.trl_python.is_absolute() else REPO / args.trl_python
    if not trl_python.exists():
        raise SystemExit(f"no TRL interpreter at {trl_python}; create it from the repository "
                         f"root with `{TRL_SETUP}`, or pass --trl-python")
    if args.random_model:
        if args.model:
            raise SystemExit("--random-model builds its own model: leave out --model")
        if args.max_length > RANDOM_MODEL_POSITIONS:
            raise SystemExit(f"--max-length {args.max_length}: the random models take at most "
                             f"{RANDOM_MODEL_POSITIONS} positions")

    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("TQDM_DISABLE", "1")
    setup: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = one_gpu(env)
        gpu = check_cuda(args.python, str(trl_python), args.dtype, env)
        setup.update(gpu=gpu["name"], peak_flops=gpu["peak_flops"],
                     cuda_visible_devices=env["CUDA_VISIBLE_DEVICES"])
        peak = (f"dense {args.dtype} peak {gpu['peak_flops'] / 1e12:g} TFLOP/s"
                if gpu["peak_flops"] else f"no known {args.dtype} peak")
        print(f"GPU {gpu['name']} ({peak}), CUDA_VISIBLE_DEVICES="
              f"{env['CUDA_VISIBLE_DEVICES']} for both sides", flush=True)

    workdir = (args.workdir if args.workdir.is_absolute() else REPO / args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.random_model:
        model, parameters = random_model(args.random_model, default_model(args.python),
                                         workdir / "models")
        setup["model"] = f"random {args.random_model} ({parameters / 1e6:,.1f}M parameters)"
        print(f"random model {args.random_model}: {parameters:,} parameters", flush=True)
    else:
        model = str(Path(args.model).resolve()) if args.model else default_model(args.python)
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a Hugging Face model directory (no config.json)")
    counter = flop_counter(model) if args.device == "cuda" else None

    count = args.steps * args.batch_size
    pairs, skipped = select_pairs(data, model, count, args.max_length, args.max_prompt_length)
    if len(pairs) < count:
        raise SystemExit(f"{data}: only {len(pairs)} usable pairs, {count} needed "
                         f"(skipped: {skipped})")
    pairs_file = workdir / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"{count} pairs from {data.name} -> {pairs_file}"
          + (f" (skipped {skipped})" if skipped else ""), flush=True)
    print(f"model {model}", flush=True)

    settings = Settings(model=model, pairs=str(pairs_file), steps=args.steps,
                        batch_size=args.batch_size, max_length=args.max_length,
                        max_prompt_length=args.max_prompt_length, beta=args.beta, lr=args.lr,
                        seed=args.seed, device=args.device, dtype=args.dtype)

    results: dict[str, list[ChildResult]] = {side: [] for side in SIDES}
    for round_ in range(1, args.repeats + 1):
        for side in SIDES:
            child_dir = workdir / f"round{round_}-{side}"
            shutil.rmtree(child_dir, ignore_errors=True)
            child_dir.mkdir(parents=True)
            if side == "ours":
                result = run_ours(settings, args.python, child_dir, env, args.ours_arg)
            else:
                result = run_trl(settings, str(trl_python), child_dir, env)
                if counter is not None:
                    result.step_flops = trl_step_flops(counter, result.row_lengths,
                                                       result.completion_tokens)
            results[side].append(result)
            device_peak = ("" if result.peak_device_bytes is None else
                           f", peak CUDA allocated {result.peak_device_bytes / 2**30:.2f} GiB")
            print(f"round {round_} {side}: wall {result.wall_s:.1f} s, peak RSS "
                  f"{result.peak_rss_bytes / 2**30:.2f} GiB{device_peak}, steps "
                  + " ".join(f"{t:.2f}" for t in result.step_times) + " s", flush=True)
            if not args.keep:
                shutil.rmtree(child_dir / "run", ignore_errors=True)
                (child_dir / "ref-logps.safetensors").unlink(missing_ok=True)

    summary = summarise(results, setup)
    print()
    print(table(summary, args.steps, args.repeats, args.batch_size))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "settings": {**asdict(settings), "repeats": args.repeats,
                         "threads": env.get("OMP_NUM_THREADS"), "ours_args": args.ours_arg,
                         "data": str(data), "skipped_pairs": skipped,
                         "random_model": args.random_model},
            "summary": summary,
            "runs": {side: [asdict(r) for r in runs] for side, runs in results.items()},
        }, indent=2) + "\n")
        print(f"results -> {args.json}")


if __name__ == "__main__":
    main()
