"""SFT against DPO on HH-RLHF: the comparison of ``dpo demo``, small, with full fine-tuning and
LoRA, for one or more models.

For each model (``--models``, a comma list; default: SmolLM2-135M-Instruct and
EleutherAI/pythia-160m, a GPT-NeoX model from the hub), one ``dpo`` process per stage:

    sft-full         dpo sft  --model MODEL                  (every weight)
    sft-lora         dpo sft  --model MODEL --lora -o lora.r=16
    dpo-full-b0.05   dpo run  --model sft-full/final  -o beta=0.05
    dpo-full-b0.5    dpo run  --model sft-full/final  -o beta=0.5
    dpo-lora-b0.05   dpo run  --model sft-lora/final  --lora -o lora.r=16 -o beta=0.05
    dpo-lora-b0.5    dpo run  --model sft-lora/final  --lora -o lora.r=16 -o beta=0.5

SFT trains on the chosen sides of the training pairs; DPO on the same pairs, from the SFT model
(an adapter directory as ``--model`` loads its base with the SFT adapter merged, and the LoRA
DPO run trains a new adapter on that). Then every model state, the base included, is scored on
the held-out pairs, which no stage trains on:

* ``rank acc``: the share of held-out pairs whose chosen completion has a higher summed
  log-probability than the rejected one under the model itself, no reference (``dpo demo``'s
  ranking accuracy; a tie counts as wrong). The one column comparable across all rows.
* ``rewards/accuracies``, ``rewards/margins``: DPO's implicit reward
  ``beta * (log pi(y|x) - log pi_ref(y|x))``, computed by the ``dpo`` loss plugin as a run's
  ``eval/`` metrics are. **The reference is the model the row's stage started from**: for a
  DPO row the SFT model it trained from (full SFT for full rows, LoRA SFT for LoRA rows), which
  is also that run's own DPO reference, with the row's beta; for an SFT row the base model, with
  beta 0.1 (``REPORT_BETA``; an SFT row has no beta of its own); the base row is scored against
  itself, so its rewards are 0 and its accuracy 0 by definition (ties do not count).
* ``DPO loss``: the mean ``-log sigmoid(margin)`` against that reference: ln 2 = 0.6931 where the
  policy is its reference, lower where it prefers the chosen completions more than its reference
  does, on the whole.
* ``logps/chosen``, ``logps/rejected``: the mean summed completion log-probs under the model.
* ``SFT loss``: the token-mean negative log-likelihood of the held-out chosen completions,
  ``dpo eval --objective sft``'s number: its tokenisation, objective and averaging, on the model
  loaded once for both scores (``tests/test_benchmarks_sft_vs_dpo.py`` checks that the two
  agree, and that the rewards agree with ``dpo eval``'s).
* ``wall s``, ``peak GiB``: the stage's ``dpo`` process: its wall time (model loading, the speed
  paths' check, reference log-probs for DPO, training, saving) and its peak resident memory
  (``ru_maxrss`` of that process, the figure a CPU run logs as ``peak_memory_gb``, here over the
  whole process). The base row has no stage. Scoring runs in this process and is timed apart.

The data: the HH-RLHF harmless-base file beside the repository (``--data``); records the ``hh``
format cannot use are left out, the rest shuffled with ``--seed``; the first ``--held-out``
pairs are held out, the next ``--train-pairs`` are the training pairs. Where the file is absent
the benchmark says so and exits 0.

Settings (``FULL``), sized by timing steps on a 2-core CPU shared with other jobs first: about
3 s an SFT step and 5 s a DPO step of 4 pairs at ``--max-length 256``, with one torch thread per
process (``OMP_NUM_THREADS=1``; two threads per process ran several times slower there, each
process fighting the other jobs for both cores). 160 training pairs, 64 held out,
``--max-length 256 --max-prompt-length 192``, batch 4, SFT 40 steps and each DPO run 40 steps,
so every stage sees each training pair once. Learning rates: SFT full 3e-5 (the upper half of
the usual 1e-5..5e-5, for few steps), SFT LoRA 3e-4 (ten times that: the adapter starts at
zero, rank 16); DPO full 5e-6 and DPO LoRA 1e-4, the top of the usual ranges: with them every
DPO row ends with its held-out DPO loss below ln 2 and its margin above 0. Four times higher
(2e-5 full, 4e-4 LoRA, beta 0.5, from the same SFT models) gave larger held-out margins
(+0.22, +0.24) but a held-out DPO loss of 0.79 and 0.83 and accuracies of 0.47 and 0.48: 40
steps on 160 pairs then fit those pairs at the held-out ones' expense. Linear decay after 10%
warm-up, the ``dpo`` defaults.

A model that cannot be loaded (a hub id where the hub is unreachable) has its rows reported as
skipped with the one-line reason, and the other models go on; a stage that fails skips its row
and the rows that start from it, likewise.

    OMP_NUM_THREADS=1 python benchmarks/sft_vs_dpo.py        # the default run (~40 min here)
    python benchmarks/sft_vs_dpo.py --models SmolLM2-135M-Instruct,./pythia-160m   # a local copy
    python benchmarks/sft_vs_dpo.py --quick                  # the tiny model, about 25 s
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's dpo, here and in the stages

import torch  # noqa: E402

from dpo.core.interfaces.loss import PairLogps  # noqa: E402
from dpo.core.interfaces.plugins import collect, get_plugin_manager  # noqa: E402
from dpo.core.model.dropout import disable_dropout  # noqa: E402
from dpo.core.model.loading import load_model, transformers_bars_off  # noqa: E402
from dpo.core.model.paths import resolve  # noqa: E402
from dpo.core.training.evaluation import EvalRequest, held_out  # noqa: E402
from dpo.core.training.loop import objective_metrics  # noqa: E402
from dpo.core.training.objectives import (SftObjective, metric_sums, pair_length,  # noqa: E402
                                          sft_paths)
from dpo.core.training.setup import resolve_backend, resolve_dtype  # noqa: E402
from dpo.core.training.study import pair_logps, ranking_accuracy  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test-2000.jsonl.gz"
DEFAULT_MODELS = "SmolLM2-135M-Instruct,EleutherAI/pythia-160m"
SEED = 42  # the runs' seed (RunConfig's default): `tiny` is built from it
REPORT_BETA = 0.1  # the beta of the base and SFT rows' rewards (dpo's default beta)
SCORE_BATCH = 8  # pairs (or examples) per forward pass when scoring
METRICS = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class Settings:
    held_out: int
    train_pairs: int
    sft_steps: int
    dpo_steps: int
    batch_size: int
    max_length: int
    max_prompt_length: int
    sft_lr: float
    sft_lora_lr: float
    dpo_lr: float
    dpo_lora_lr: float
    lora_r: int
    betas: tuple[float, ...]


FULL = Settings(held_out=64, train_pairs=160, sft_steps=40, dpo_steps=40, batch_size=4,
                max_length=256, max_prompt_length=192, sft_lr=3e-5, sft_lora_lr=3e-4,
                dpo_lr=5e-6, dpo_lora_lr=1e-4, lora_r=16, betas=(0.05, 0.5))
# The tiny model on arithmetic dialogues: every path of the real run, in seconds.
QUICK = Settings(held_out=8, train_pairs=16, sft_steps=3, dpo_steps=3, batch_size=4,
                 max_length=64, max_prompt_length=48, sft_lr=1e-3, sft_lora_lr=5e-3,
                 dpo_lr=1e-3, dpo_lora_lr=5e-3, lora_r=4, betas=(0.05, 0.5))


@dataclass(frozen=True)
class State:
    """One row: a model state, the stage that makes it and the state that stage starts from."""

    name: str
    command: str | None = None  # sft or run; None: the model as given
    parent: str | None = None
    lora: bool = False
    beta: float | None = None  # DPO's

    @property
    def kind(self) -> str:
        return "base" if self.command is None else ("SFT" if self.command == "sft" else "DPO")

    def label(self) -> str:
        if self.command is None:
            return "base"
        how = "LoRA" if self.lora else "full"
        return f"{self.kind} {how}" + (f", beta {self.beta:g}" if self.beta is not None else "")


def states(betas: tuple[float, ...]) -> list[State]:
    """The rows in table order (each state after the one it starts from)."""
    rows = [State("base"), State("sft-full", "sft", "base"),
            State("sft-lora", "sft", "base", lora=True)]
    for lora in (False, True):
        how = "lora" if lora else "full"
        rows += [State(f"dpo-{how}-b{beta:g}", "run", f"sft-{how}", lora, beta) for beta in betas]
    return rows


@dataclass
class Row:
    model: str
    state: str
    label: str
    reference: str | None = None  # the state the rewards are measured against
    beta: float | None = None  # the beta of the rewards
    held_out: int = 0  # pairs scored
    rank_accuracy: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # DPO's, against the reference
    sft_loss: float | None = None
    wall_s: float | None = None  # the stage's process
    peak_gib: float | None = None
    score_s: float | None = None  # scoring, in this process
    skipped: str | None = None


# -- data ------------------------------------------------------------------------------------

def usable_records(data: Path, catalog: Any) -> list[str]:
    """The lines of ``data`` that the ``hh`` format parses, in file order."""
    cls = catalog.formats.get("hh")
    fmt = cls(cls.parse_options({}))
    lines = []
    with gzip.open(data, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                fmt.parse(json.loads(line))
            except Exception:  # noqa: BLE001 - an unusable record is left out, whatever the reason
                continue
            lines.append(line if line.endswith("\n") else line + "\n")
    return lines


def split(lines: list[str], settings: Settings, seed: int, workdir: Path) -> tuple[Path, Path]:
    """Shuffled with ``seed``: the first ``held_out`` records held out, the next
    ``train_pairs`` for training; disjoint by construction."""
    need = settings.held_out + settings.train_pairs
    if len(lines) < need:
        raise SystemExit(f"{len(lines)} usable pairs; --held-out + --train-pairs need {need}")
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    held, train = workdir / "held-out.jsonl", workdir / "train.jsonl"
    held.write_text("".join(lines[i] for i in order[:settings.held_out]))
    train.write_text("".join(lines[i] for i in order[settings.held_out:need]))
    return train, held


def write_quick_data(path: Path, n: int) -> Path:
    """``n`` arithmetic questions as HH-RLHF dialogues (the right sum chosen, the sum plus one
    rejected), gzipped like the real file: the quick mode's data."""
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(n):
            a, b = i % 9 + 1, i % 7 + 2
            turn = f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:"
            fh.write(json.dumps({"chosen": f"{turn} {a + b}.",
                                 "rejected": f"{turn} {a + b + 1}."}) + "\n")
    return path


# -- stages ----------------------------------------------------------------------------------

def stage_command(state: State, model: str, base: str, train: Path, settings: Settings,
                  backend: str, workdir: Path) -> list[str]:
    """The ``dpo`` command that makes ``state`` from ``model`` (the parent's final/)."""
    lr = {("sft", False): settings.sft_lr, ("sft", True): settings.sft_lora_lr,
          ("run", False): settings.dpo_lr, ("run", True): settings.dpo_lora_lr}
    steps = settings.sft_steps if state.command == "sft" else settings.dpo_steps
    command = [sys.executable, "-m", "dpo", state.command, "--model", model,
               "--data", str(train), "--format", "hh", "--backend", backend,
               "--batch-size", str(settings.batch_size), "--max-steps", str(steps),
               "--max-length", str(settings.max_length),
               "--max-prompt-length", str(settings.max_prompt_length),
               "--lr", f"{lr[state.command, state.lora]:g}", "--seed", str(SEED),
               "--save-steps", "0", "--no-keep-checkpoints", "--no-progress",
               "--output", str(workdir / state.name)]
    if state.lora:
        command += ["--lora", "-o", f"lora.r={settings.lora_r}"]
    if state.command == "run":
        # Both betas start from the same SFT model: its log-probs are scored once.
        command += ["-o", f"beta={state.beta:g}", "--no-eval-at-start",
                    "--ref-logps", str(workdir / f"ref-{state.parent}.safetensors")]
    return command


def child_env() -> dict[str, str]:
    path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_stage(command: list[str], log: Path) -> tuple[float, float, str | None]:
    """Run one stage: (wall seconds, peak resident GiB of its process, why it failed or None)."""
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   env=child_env(), cwd=log.parent)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    peak = usage.ru_maxrss / 2**20  # KiB on Linux
    if process.returncode != 0:
        return wall, peak, f"exit code {process.returncode}: {last_line(log)}"
    return wall, peak, None


def last_line(log: Path) -> str:
    """The error line a failed ``dpo`` command ends with, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or ["no output"])[-1][:300]


# -- scoring ---------------------------------------------------------------------------------

@dataclass
class Scored:
    chosen: torch.Tensor  # summed completion log-probs per held-out pair
    rejected: torch.Tensor
    sft_loss: float
    seconds: float


def score(spec: str, held: Path, settings: Settings, catalog: Any, backend: Any) -> Scored:
    """One model state on the held-out pairs, loaded once: its summed completion log-probs of
    each pair's two sides, and its SFT loss on the chosen sides as ``dpo eval --objective sft``
    computes it (the same tokenisation, objective and averaging; the model's verified speed
    paths, as ``dpo demo`` scores, without the run-time check)."""
    started = time.perf_counter()
    request = EvalRequest(model=spec, data=str(held), format="hh", backend=backend.name,
                          max_length=settings.max_length,
                          max_prompt_length=settings.max_prompt_length, seed=SEED)
    device = backend.device(0)
    with transformers_bars_off():
        model, tokenizer = load_model(spec, SEED)
    try:
        disable_dropout(model)
        model.requires_grad_(False).eval().to(device)
        pairs, _ = held_out(request, {}, catalog, tokenizer, "dpo")
        # Similar lengths together (less padding), then back to the file's order.
        order = sorted(range(len(pairs)), key=lambda i: pair_length(pairs[i]))
        by_length = pair_logps(model, [pairs[i] for i in order], tokenizer.pad_token_id, device,
                               batch_size=SCORE_BATCH)
        chosen, rejected = (torch.empty_like(t) for t in by_length)
        chosen[order], rejected[order] = by_length
        examples, _ = held_out(request, {}, catalog, tokenizer, "sft")
        paths = sft_paths(resolve(model, static_shapes=backend.static_shapes,
                                  backend_name=backend.name))
        objective = SftObjective(backend, resolve_dtype("auto", backend),
                                 tokenizer.pad_token_id, paths)
        sft = objective_metrics(objective, model, examples, SCORE_BATCH, device)
    finally:
        del model
        gc.collect()
    return Scored(chosen, rejected, sft["eval/loss"], time.perf_counter() - started)


def dpo_metrics(policy: Scored, reference: Scored, beta: float, catalog: Any
                ) -> dict[str, float]:
    """The ``dpo`` loss plugin's metrics of ``policy`` against ``reference``, averaged over
    the pairs as a run's evaluation averages them."""
    loss_cls = catalog.losses.get("dpo")
    loss = loss_cls(loss_cls.parse_options({"beta": beta}))
    counts = torch.zeros_like(policy.chosen)  # the dpo loss does not use them
    logps = PairLogps(policy.chosen, policy.rejected, counts, counts,
                      reference.chosen, reference.rejected)
    sums = metric_sums(loss(logps), logps)
    return {key: float(value) / len(policy.chosen) for key, value in sums.items()}


# -- one model -------------------------------------------------------------------------------

def study_model(model: str, index: int, train: Path, held: Path, settings: Settings,
                catalog: Any, backend: Any, workdir: Path) -> list[Row]:
    rows = {s.name: Row(model, s.name, s.label()) for s in states(settings.betas)}
    scored: dict[str, Scored] = {}
    root = workdir / f"model-{index}"
    root.mkdir(parents=True, exist_ok=True)
    for state in states(settings.betas):
        row = rows[state.name]
        parent = rows.get(state.parent) if state.parent else None
        if parent is not None and parent.skipped:
            row.skipped = f"starts from {parent.state}, which was skipped"
            continue
        spec = model
        if state.command is not None:
            start = model if state.parent == "base" else str(root / state.parent / "final")
            print(f"[{model}] {state.name}: dpo {state.command} from {start}",
                  file=sys.stderr, flush=True)
            command = stage_command(state, start, model, train, settings, backend.name, root)
            row.wall_s, row.peak_gib, failed = run_stage(command, root / f"{state.name}.log")
            spec = str(root / state.name / "final")
            if failed is None and not Path(spec).is_dir():
                failed = f"no final/ written: {last_line(root / f'{state.name}.log')}"
            if failed:
                row.skipped = failed
                continue
        print(f"[{model}] {state.name}: scoring", file=sys.stderr, flush=True)
        try:
            scored[state.name] = score(spec, held, settings, catalog, backend)
        except Exception as exc:  # noqa: BLE001 - one model's failure skips its rows, no more
            row.skipped = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            if state.name == "base":  # nothing else can start
                for other in rows.values():
                    other.skipped = other.skipped or row.skipped
                break
            continue
        this = scored[state.name]
        reference = state.parent or "base"
        row.reference = reference
        row.beta = state.beta if state.beta is not None else REPORT_BETA
        row.held_out = len(this.chosen)
        row.rank_accuracy = ranking_accuracy(this.chosen, this.rejected)
        row.metrics = dpo_metrics(this, scored[reference], row.beta, catalog)
        row.sft_loss = this.sft_loss
        row.score_s = this.seconds
    return list(rows.values())


# -- the table -------------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    header = ("| model | state | reference, beta | rank acc | rewards/accuracies | "
              "rewards/margins | DPO loss | logps/chosen | logps/rejected | SFT loss | wall s | "
              "peak GiB |")
    lines = [header, "|" + "---|" * header.count(" |")]
    for r in rows:
        name = r.model.rsplit("/", 1)[-1]
        if r.skipped:
            lines.append(f"| {name} | {r.label} | skipped |" + " |" * (header.count(" |") - 3))
            continue
        wall = "" if r.wall_s is None else f"{r.wall_s:.0f}"
        peak = "" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        m = r.metrics
        lines.append(
            f"| {name} | {r.label} | {r.reference}, {r.beta:g} | {r.rank_accuracy:.3f} | "
            f"{m['rewards/accuracies']:.3f} | {m['rewards/margins']:+.4f} | {m['loss']:.4f} | "
            f"{m['logps/chosen']:.2f} | {m['logps/rejected']:.2f} | {r.sft_loss:.4f} | "
            f"{wall} | {peak} |")
    return "\n".join(lines)


def skip_notes(rows: list[Row]) -> list[str]:
    """One line per skipped model (all its rows) or row."""
    notes, seen = [], set()
    for r in rows:
        if not r.skipped:
            continue
        whole = all(o.skipped == r.skipped for o in rows if o.model == r.model)
        key = (r.model, None if whole else r.state)
        if key in seen:
            continue
        seen.add(key)
        what = r.model if whole else f"{r.model} {r.label}"
        notes.append(f"skipped {what}: {r.skipped}")
    return notes


def finite(rows: list[Row]) -> bool:
    values = [v for r in rows if not r.skipped
              for v in (r.rank_accuracy, r.sft_loss, *r.metrics.values())]
    return all(v is not None and math.isfinite(v) for v in values)


# -- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", default=None,
                        help=f"comma list (default: {DEFAULT_MODELS}; with --quick: tiny)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny model on a few arithmetic dialogues: seconds")
    parser.add_argument("--held-out", type=int)
    parser.add_argument("--train-pairs", type=int)
    parser.add_argument("--sft-steps", type=int)
    parser.add_argument("--dpo-steps", type=int)
    parser.add_argument("--betas", help="comma list (default: 0.05,0.5)")
    parser.add_argument("--seed", type=int, default=0, help="the held-out/training split's")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--workdir", type=Path,
                        help="keep the runs and logs here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else FULL
    given = {k: getattr(args, k) for k in ("held_out", "train_pairs", "sft_steps", "dpo_steps")
             if getattr(args, k) is not None}
    if args.betas:
        given["betas"] = tuple(float(b) for b in args.betas.split(","))
    return replace(settings, **given)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    settings = settings_of(args)
    models = [m.strip() for m in (args.models or ("tiny" if args.quick else DEFAULT_MODELS))
              .split(",") if m.strip()]
    if not args.quick and not args.data.is_file():
        print(f"{args.data}: not found; pass --data with the HH-RLHF .jsonl.gz file "
              "(nothing run)")
        return []
    catalog = collect(get_plugin_manager())
    backend = resolve_backend(args.backend, catalog)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpo-sft-vs-dpo-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data = (write_quick_data(workdir / "quick.jsonl.gz",
                                 settings.held_out + settings.train_pairs)
                if args.quick else args.data)
        train, held = split(usable_records(data, catalog), settings, args.seed, workdir)
        rows: list[Row] = []
        for index, model in enumerate(models):
            rows += study_model(model, index, train, held, settings, catalog, backend, workdir)
    wall = time.perf_counter() - started
    print(f"\nHH-RLHF harmless-base{' (quick: arithmetic dialogues)' if args.quick else ''}: "
          f"{settings.train_pairs} training pairs, {settings.held_out} held out (seed "
          f"{args.seed}); batch {settings.batch_size}, --max-length {settings.max_length} "
          f"--max-prompt-length {settings.max_prompt_length}; SFT {settings.sft_steps} steps "
          f"(lr {settings.sft_lr:g}, LoRA {settings.sft_lora_lr:g}), DPO {settings.dpo_steps} "
          f"steps (lr {settings.dpo_lr:g}, LoRA {settings.dpo_lora_lr:g}); LoRA r "
          f"{settings.lora_r}; {os.cpu_count()} CPUs, torch threads per process: "
          f"{torch.get_num_threads()}; backend {backend.name}")
    print(table(rows))
    for note in skip_notes(rows):
        print(note)
    scoring = sum(r.score_s or 0 for r in rows)
    print(f"total wall {wall:.0f} s, of which scoring {scoring:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"settings": asdict(settings), "models": models,
                                         "wall_s": wall, "rows": [asdict(r) for r in rows]},
                                        indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
