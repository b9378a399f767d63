"""Our DPO training step against Hugging Face TRL's ``DPOTrainer``, on the same batches.

Both trainers fine-tune SmolLM2-135M-Instruct (float32, CPU) with the sigmoid DPO loss on the same
Anthropic HH-RLHF pairs, in file order, ``--batch-size`` pairs a step, no shuffling and no length
grouping. Each run is a child process of its own (for a clean peak-memory figure), and the two
alternate: ours, TRL, ours, TRL, ... for ``--repeats`` rounds. One table compares throughput,
step time, peak resident memory, end-to-end wall time and the first step's loss and metrics.

TRL lives in a separate virtualenv (never this project's), made once:

    python -m venv .bench/trl && .bench/trl/bin/pip install -r benchmarks/requirements-trl.txt

then, from the repository root, with this project's environment:

    python benchmarks/vs_trl.py                           # 6 steps x 2 rounds
    python benchmarks/vs_trl.py --steps 2 --repeats 1     # a quick check
    python benchmarks/vs_trl.py --json out/vs_trl.json    # also write the results

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
  checkpointing, no bf16, constant learning rate, reference = a second copy of the model), and
  TRL's own optimizer default (``adamw_torch_fused``).
- Step time: from fetching the step's batch to the end of its optimizer step (ours: as logged in
  its metrics.jsonl; TRL: measured around ``get_batch_samples`` and ``on_step_end``). The first
  step of each child is left out of step-time and throughput statistics (warm-up) when there is
  more than one step. Tokens/s = tokens of the counted steps / their summed step time; "real"
  counts the non-pad prompt + completion tokens of the chosen and rejected rows, "padded" the
  rows x width of the tensors run.
- Peak memory: the child's maximum resident set size (``os.wait4``).

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
from dpo.core.models import converted_gguf, resolve_source
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
    done = subprocess.run([python, "-c", _RESOLVE_DEFAULT], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"could not resolve the default model {DEFAULT_MODEL_NAME} through "
                         f"the dpo package ({tail}); pass --model DIR")
    return done.stdout.strip().splitlines()[-1]


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
        "--no-eval-at-start", "--backend", "cpu", "--dtype", "float32",
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
               "data": (record.get("data") or {}).get("train")},
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
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    with open(settings.pairs, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    dataset = datasets.Dataset.from_list(records)  # plain text: TRL appends the EOS itself

    class Clock(TrainerCallback):
        """Step times (batch fetch to end of optimizer step), tokens and the logged metrics."""

        def __init__(self) -> None:
            self.batch_started = 0.0
            self.step_times: list[float] = []
            self.real: list[int] = []
            self.padded: list[int] = []
            self.logs: list[dict[str, float]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_times.append(time.perf_counter() - self.batch_started)

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
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if batches:
                # Rows 0..B-1 chosen, B..2B-1 rejected: prompt + completion, right-padded.
                clock.real.append(sum(int(b["attention_mask"].sum()) for b in batches))
                clock.padded.append(sum(b["input_ids"].numel() for b in batches))
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
        bf16=False,  # DPOConfig's default is True unless fp16
        fp16=False,
        use_cpu=True,
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
               "optimizer": str(getattr(config.optim, "value", config.optim))},
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


def spread(times: list[float]) -> tuple[str, float, float]:
    """("min-max", lo, hi) for fewer than 10 values, else ("p10-p90", ...)."""
    ordered = sorted(times)
    if len(ordered) < 10:
        return "min-max", ordered[0], ordered[-1]
    q = statistics.quantiles(ordered, n=10, method="inclusive")
    return "p10-p90", q[0], q[-1]


def summarise(results: dict[str, list[ChildResult]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, runs in results.items():
        times, real, padded = counted(runs)
        label, lo, hi = spread(times)
        one_off = [r.one_off_s for r in runs if r.one_off_s is not None]
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
        }
    ours, trl = out["ours"], out["trl"]
    out["ratios"] = {
        "real_tokens_per_s": ours["real_tokens_per_s"] / trl["real_tokens_per_s"],
        "padded_tokens_per_s": ours["padded_tokens_per_s"] / trl["padded_tokens_per_s"],
        "step_time_median": ours["step_time_median_s"] / trl["step_time_median_s"],
        "peak_rss": ours["peak_rss_gib"] / trl["peak_rss_gib"],
        "wall": ours["wall_s"] / trl["wall_s"],
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
    label = ours["step_time_spread"][0]

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def compared(name: str, key: str, fmt: str, ratio_key: str | None = None) -> Row:
        return (name, num(ours[key], fmt), num(trl[key], fmt),
                num(ratio[ratio_key], ".3f") if ratio_key else "")

    def span(side: dict[str, Any]) -> str:
        return "{:.3f}-{:.3f}".format(*side["step_time_spread"][1:])

    performance: list[Row] = [
        ("", "ours", "TRL", "ours/TRL"),
        compared("real tokens/s", "real_tokens_per_s", ".1f", "real_tokens_per_s"),
        compared("padded tokens/s", "padded_tokens_per_s", ".1f", "padded_tokens_per_s"),
        compared("step time median (s)", "step_time_median_s", ".3f", "step_time_median"),
        (f"step time {ours['step_time_spread'][0]} (s)", span(ours), span(trl), ""),
        compared("peak RSS (GiB)", "peak_rss_gib", ".3f", "peak_rss"),
        compared("one-off before training (s)", "one_off_s", ".2f"),
        compared("end-to-end wall (s)", "wall_s", ".2f", "wall"),
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
    model = str(Path(args.model).resolve()) if args.model else default_model(args.python)
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a Hugging Face model directory (no config.json)")

    workdir = (args.workdir if args.workdir.is_absolute() else REPO / args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
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
                        seed=args.seed)
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("TQDM_DISABLE", "1")

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
            results[side].append(result)
            print(f"round {round_} {side}: wall {result.wall_s:.1f} s, peak RSS "
                  f"{result.peak_rss_bytes / 2**30:.2f} GiB, steps "
                  + " ".join(f"{t:.2f}" for t in result.step_times) + " s", flush=True)
            if not args.keep:
                shutil.rmtree(child_dir / "run", ignore_errors=True)
                (child_dir / "ref-logps.safetensors").unlink(missing_ok=True)

    summary = summarise(results)
    print()
    print(table(summary, args.steps, args.repeats, args.batch_size))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "settings": {**asdict(settings), "repeats": args.repeats,
                         "threads": env.get("OMP_NUM_THREADS"), "ours_args": args.ours_arg,
                         "data": str(data), "skipped_pairs": skipped},
            "summary": summary,
            "runs": {side: [asdict(r) for r in runs] for side, runs in results.items()},
        }, indent=2) + "\n")
        print(f"results -> {args.json}")


if __name__ == "__main__":
    main()
