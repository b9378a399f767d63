#!/usr/bin/env bash
# Lane distributed: torch 2.13.0 CPU, several processes under torchrun over gloo. The tests marked
# `distributed` (DDP and FSDP2 runs of the tiny model against one process, resume, launch errors;
# only when the cpu lane, which runs them, is not in this CI run), then `dpo run --nproc 2` with
# each strategy, whose run.json must record both processes.
# Shares the cpu lane's virtualenv (same pins), installing it if that lane has not run.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cd "$CI_ROOT"
export VENV=${CI_VENVS#"$CI_ROOT/"}/cpu
timed install bash scripts/setup.sh
LANE_PY=$CI_ROOT/$VENV/bin/python

# Called through `timed`, where set -e does not apply: every step returns on failure itself.
run_tests() {
    # The cpu lane's README test command runs the tests marked distributed in this very
    # environment: run them here only when that lane is not part of this CI run.
    if [[ " ${CI_RUNNING_LANES:-} " != *" cpu "* ]]; then
        lane_pytest -q -m distributed tests || return
    fi
    local out strategy
    out=$(mktemp -d) || return
    for strategy in ddp fsdp; do
        timeout 300 "$LANE_PY" -m dpo run --nproc 2 --strategy "$strategy" --model tiny \
            --data examples/pairs.jsonl --eval-fraction 0.25 --batch-size 2 --max-steps 6 \
            --no-progress --output "$out/$strategy" 2>"$out/$strategy.log" \
            || { cat "$out/$strategy.log" >&2; return 1; }
        "$LANE_PY" - "$out/$strategy" <<'PY' || return
import json, pathlib, sys

run = json.loads((pathlib.Path(sys.argv[1]) / "run.json").read_text())
resolved = run["resolved"]
assert run["status"] == "completed", run["status"]
assert resolved["world_size"] == 2, resolved
print(f"distributed tiny run ({resolved['strategy']}, 2 processes): final loss "
      f"{run['final']['loss']:.4f}")
PY
    done
    rm -rf "$out"
}
timed tests run_tests
