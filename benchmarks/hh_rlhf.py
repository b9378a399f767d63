"""DPO on real preference data: SmolLM2-135M-Instruct on Anthropic HH-RLHF (harmless-base).

Runs a fixed budget of DPO steps with ``dpo run`` in a child process and reports held-out
``rewards/accuracies`` and ``rewards/margins`` before (step 0) and after training, the wall time
and the child's peak resident memory:

    python benchmarks/hh_rlhf.py                      # defaults below
    python benchmarks/hh_rlhf.py --steps 20 --eval 50 # quicker

The data file is read from ``../shared/data`` beside the repository (or ``--data``); the last
``--eval`` pairs are held out, training uses the pairs before them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test-2000.jsonl.gz"


def split(data: Path, eval_count: int, workdir: Path) -> tuple[Path, Path, int]:
    with gzip.open(data, "rt", encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    if eval_count >= len(lines):
        raise SystemExit(f"--eval {eval_count} leaves nothing to train on ({len(lines)} pairs)")
    train, held = workdir / "train.jsonl", workdir / "eval.jsonl"
    train.write_text("".join(lines[:-eval_count]))
    held.write_text("".join(lines[-eval_count:]))
    return train, held, len(lines) - eval_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--eval", type=int, default=100, help="pairs held out (the file's last)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--output", type=Path, default=None, help="run directory (default: temp)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: not found; pass --data with the HH-RLHF .jsonl.gz file")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        train, held, n_train = split(args.data, args.eval, workdir)
        output = args.output or workdir / "run"
        command = [
            sys.executable, "-m", "dpo", "run", "--model", args.model, "--data", str(train),
            "--eval-data", str(held), "--format", "hh", "--backend", args.backend,
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--grad-accum", str(args.grad_accum), "--lr", str(args.lr), "-o", f"beta={args.beta}",
            "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
            "--save-steps", "0", "--no-progress", "--output", str(output), "--overwrite",
        ]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=os.environ.copy())
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"dpo run failed with exit code {done.returncode}")
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
        run = json.loads((output / "run.json").read_text())
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    steps = [r for r in rows if "step_time" in r]
    before, after = run["initial_eval"], run["final_eval"]
    result = {
        "model": args.model, "train_pairs": n_train, "eval_pairs": args.eval,
        "steps": run["steps"], "batch_pairs": args.batch_size * args.grad_accum,
        "lr": args.lr, "beta": args.beta, "max_length": args.max_length,
        "backend": run["resolved"]["backend"], "device": run["resolved"]["device"],
        "eval_before": {k: before[f"eval/{k}"] for k in ("rewards/accuracies", "rewards/margins", "loss")},
        "eval_after": {k: after[f"eval/{k}"] for k in ("rewards/accuracies", "rewards/margins", "loss")},
        "wall_s": round(wall, 1),
        "median_step_s": sorted(r["step_time"] for r in steps)[len(steps) // 2],
        "tokens_per_s": sum(r["tokens_per_second"] * r["step_time"] for r in steps)
                        / sum(r["step_time"] for r in steps),
        "peak_rss_gb": round(peak_gb, 2),
    }
    print(f"HH-RLHF harmless-base, {args.model}, {result['steps']} steps x {result['batch_pairs']} pairs "
          f"(lr {args.lr}, beta {args.beta}, max length {args.max_length}) on {result['device']}")
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        print(f"  held-out {key:<20} before {result['eval_before'][key]:.4f}   "
              f"after {result['eval_after'][key]:.4f}")
    print(f"  wall {result['wall_s']} s, median step {result['median_step_s']:.2f} s, "
          f"{result['tokens_per_s']:.0f} real tokens/s, peak RSS {result['peak_rss_gb']} GiB")
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
