#!/usr/bin/env bash
# Lane xla: torch 2.9.0 with torch-xla 2.9.0 (which needs exactly that torch) on PJRT's CPU
# client. The whole suite, the xla tests included, then a tiny `dpo run --backend xla` whose
# compile count must stop growing once every batch shape has been seen.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cd "$CI_ROOT"
timed install lane_venv xla "torch==2.9.0" "torch-xla==2.9.0" -e ".[test,lora,report]"

export PJRT_DEVICE=CPU
# Optimisation level 0 compiles a graph in about 2 s instead of 7-12 s on this CPU, with the same
# numbers: the lane proves correctness and bounded compiles, not speed.
export XLA_FLAGS=--xla_backend_optimization_level=0
# Called through `timed`, where set -e does not apply: every step returns on failure itself.
run_tests() {
    # The XLA runtime starts before the session's first backward (tests/conftest.py), so the
    # order of the files does not matter. The architecture test needs no backend: the cpu and
    # intel lanes run it. The 2-process tests run on CPU over gloo whatever the lane: the cpu
    # lane (torch 2.13) runs them.
    lane_pytest -q -m "not architectures and not distributed" $(orchestration_ignores) tests || return
    "$LANE_PY" -m dpo backends || return
    local out
    out=$(mktemp -d) || return
    # 48 training pairs in batches of 5: 9 full batches and one of 3 per epoch; two epochs.
    "$LANE_PY" -m dpo run --backend xla --model tiny --data examples/pairs.jsonl \
        --eval-fraction 0.25 --batch-size 5 --max-steps 20 --eval-steps 10 --no-progress \
        --output "$out/run" || return
    "$LANE_PY" - "$out/run" <<'PY' || return
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
run = json.loads((out / "run.json").read_text())
steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
compiles = [int(r["xla/compiles"]) for r in steps]
assert run["status"] == "completed" and len(steps) == 20, run["status"]
assert compiles[9] == compiles[-1], f"recompiling after the first epoch: {compiles}"
assert compiles[-1] <= 12, f"too many graphs: {compiles}"
assert all(r["xla/cpu_fallbacks"] == 0 for r in steps), "an op fell back to the CPU"
print(f"xla tiny run: {compiles[-1]} graphs compiled in 20 steps (all by step "
      f"{compiles.index(compiles[-1]) + 1}), {int(steps[-1]['xla/host_transfers'])} host reads, "
      f"final loss {steps[-1]['loss']:.4f}")
PY
    rm -rf "$out"
}
timed tests run_tests
