"""Step-time and throughput summary of a finished run directory, from its metrics.jsonl.

    python benchmarks/step_time.py out/tiny

The first step is reported apart: it includes one-off costs (allocator warm-up, lazy init).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summarise(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_time" in r]
    if len(steps) < 2:
        raise SystemExit(f"{run_dir}: fewer than two logged steps")
    times = sorted(r["step_time"] for r in steps[1:])
    return {
        "steps": len(steps),
        "first_step_s": steps[0]["step_time"],
        "median_step_s": statistics.median(times),
        "p90_step_s": times[int(0.9 * (len(times) - 1))],
        "median_tokens_per_s": statistics.median(r["tokens_per_second"] for r in steps[1:]),
        "peak_memory_gb": max(r.get("peak_memory_gb", 0.0) for r in steps),
    }


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["out/tiny"]:
        summary = summarise(Path(arg))
        print(f"{arg}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
