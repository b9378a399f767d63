"""Each speed and memory technique of ``dpo run``, measured side by side on real data.

Runs ``dpo run`` once per variant, one after another, each in its own process (for its own peak
memory), on the same HH-RLHF pairs taken in file order (no shuffle, no length grouping: every
variant sees the same batches), and prints one table: median step time (the first step left
out: warm-up), real tokens/s, peak resident memory, the one-off reference pass, and each
figure as a ratio to the first variant.

    python benchmarks/techniques.py                        # all variants, 5 steps each
    python benchmarks/techniques.py --steps 3 --only base precomputed

Variants (each adds to ``dpo run --backend cpu --dtype float32 --batch-size 4``):
    reference-in-memory   --no-precompute-ref --no-share-prompt: a frozen copy scores every
                          batch, padded rows
    precomputed           --no-share-prompt: reference log-probs scored once before training
    shared-prompt         the CPU default: precomputed, and each pair's prompt run once
    bf16                  the default + --dtype bfloat16 (autocast)
    checkpointing         the default + --gradient-checkpointing: each decoder layer recomputed in
                          backward, the shared prompt kept
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test-2000.jsonl.gz"
MARKER = "\n\nAssistant:"

VARIANTS: dict[str, list[str]] = {
    "reference-in-memory": ["--no-precompute-ref", "--no-share-prompt"],
    "precomputed": ["--no-share-prompt"],
    "shared-prompt": [],
    "bf16": ["--dtype", "bfloat16"],
    "checkpointing": ["--gradient-checkpointing"],
}


def write_pairs(data: Path, count: int, out: Path) -> int:
    """The first ``count`` usable HH-RLHF pairs as explicit prompt/chosen/rejected records."""
    written = 0
    with gzip.open(data, "rt", encoding="utf-8") as fh, out.open("w") as sink:
        for line in fh:
            record = json.loads(line)
            cut = record["chosen"].rfind(MARKER) + len(MARKER)
            prompt = record["chosen"][:cut]
            if cut < len(MARKER) or not record["rejected"].startswith(prompt):
                continue
            chosen, rejected = record["chosen"][cut:], record["rejected"][cut:]
            if not chosen.strip() or not rejected.strip() or chosen == rejected:
                continue
            sink.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            written += 1
            if written == count:
                break
    return written


def run_variant(name: str, extra: list[str], pairs: Path, args: argparse.Namespace,
                workdir: Path) -> dict:
    out = workdir / name
    command = [sys.executable, "-m", "dpo", "run", "--model", args.model, "--data", str(pairs),
               "--format", "preference", "--backend", "cpu", "--dtype", "float32",
               "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
               "--max-length", str(args.max_length), "--max-prompt-length",
               str(args.max_prompt_length), "--lr", "1e-6", "--scheduler", "constant",
               "--warmup-steps", "0", "--no-shuffle", "--no-group-by-length",
               "--no-eval-at-start", "--save-steps", "0", "--no-progress",
               "--ref-logps", str(workdir / f"ref-{name}.safetensors"),
               "--output", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r]
    timed = rows[1:] if len(rows) > 1 else rows
    record = json.loads((out / "run.json").read_text())
    reference = record["resolved"].get("reference_logps") or {}
    return {
        "variant": name,
        "step_s": statistics.median(r["step_time"] for r in timed),
        "step_min": min(r["step_time"] for r in timed),
        "step_max": max(r["step_time"] for r in timed),
        "tokens_s": statistics.median(r["tokens_per_second"] for r in timed),
        "peak_gb": max(r.get("peak_memory_gb", 0.0) for r in rows),
        "reference_s": reference.get("seconds", 0.0),
        "first_loss": rows[0]["loss"],
        "wall_s": wall,
    }


def parse_args(description: str, variants: dict[str, list[str]]) -> argparse.Namespace:
    """The options every side-by-side benchmark of ``dpo run`` variants takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--only", nargs="*", choices=list(variants), help="these variants")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: not found; pass --data with the HH-RLHF .jsonl.gz file")
    return args


def run_variants(args: argparse.Namespace, variants: dict[str, list[str]], prefix: str,
                 figures: Callable[[Path], dict] | None = None) -> list[dict]:
    """Each chosen variant, one after another on the same pairs, as ``run_variant``'s rows;
    ``figures(run_dir)`` adds what a benchmark reads from the run directory itself."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        pairs = workdir / "pairs.jsonl"
        write_pairs(args.data, args.steps * args.batch_size, pairs)
        rows = []
        for name in args.only or list(variants):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            row = run_variant(name, variants[name], pairs, args, workdir)
            rows.append({**row, **(figures(workdir / name) if figures else {})})
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], VARIANTS)
    rows = run_variants(args, VARIANTS, "dpo-techniques-")
    base = rows[0]
    print(f"\n{args.model}, HH-RLHF, batch {args.batch_size} pairs, max length {args.max_length}, "
          f"{args.steps} steps (median of steps 2..{args.steps}), {os.cpu_count()} CPUs")
    header = (f"{'variant':<22}{'step s':>9}{'(min-max)':>16}{'tokens/s':>10}{'x':>7}"
              f"{'peak GB':>9}{'x':>7}{'ref pass s':>11}{'loss 1':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        spread = f"({r['step_min']:.1f}-{r['step_max']:.1f})"
        print(f"{r['variant']:<22}{r['step_s']:>9.2f}{spread:>16}"
              f"{r['tokens_s']:>10.1f}{r['tokens_s'] / base['tokens_s']:>7.2f}"
              f"{r['peak_gb']:>9.2f}{r['peak_gb'] / base['peak_gb']:>7.2f}"
              f"{r['reference_s']:>11.1f}{r['first_loss']:>9.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
