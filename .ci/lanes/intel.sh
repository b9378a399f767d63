#!/usr/bin/env bash
# Lane intel: torch 2.8.0 with Intel Extension for PyTorch 2.8.0 (which needs torch 2.8.*) on
# this CPU. With IPEX installed the cpu backend applies ipex.optimize to every run, so the whole
# suite runs through it; then a tiny `dpo run` in float32 and in bfloat16 that must record it.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cd "$CI_ROOT"
# IPEX 2.8.0 imports transformers.modeling_attn_mask_utils, gone from transformers 5.24.
timed install lane_venv intel "torch==2.8.0" "intel-extension-for-pytorch==2.8.0" \
    "transformers==5.23.0" -e ".[test,lora,report]"

# Called through `timed`, where set -e does not apply: every step returns on failure itself.
run_tests() {
    # The 2-process tests run in the distributed lane (torch 2.13). On torch 2.8, FSDP2 over gloo
    # reports a gradient norm twice the single-process one, with or without IPEX (DDP matches):
    # FSDP on torch 2.8 is not supported yet.
    lane_pytest -q -m "not distributed and not architectures" $(orchestration_ignores) tests || return
    # The architecture test on this lane's transformers (5.23), in a process of its own without
    # IPEX: once imported, IPEX replaces layer_norm with a kernel that has no autograd
    # registration, and torch warns that backprop through it may be silently wrong.
    DPO_IPEX=0 lane_pytest -q -m architectures tests/test_architectures.py || return
    local out dtype
    out=$(mktemp -d) || return
    for dtype in float32 bfloat16; do
        "$LANE_PY" -m dpo run --backend cpu --dtype "$dtype" --model tiny \
            --data examples/pairs.jsonl --eval-fraction 0.25 --max-steps 10 --no-progress \
            --output "$out/$dtype" 2>"$out/$dtype.log" || { cat "$out/$dtype.log" >&2; return 1; }
        "$LANE_PY" - "$out/$dtype" <<'PY' || return
import json, pathlib, sys

run = json.loads((pathlib.Path(sys.argv[1]) / "run.json").read_text())
device = run["resolved"]["device"]
assert run["status"] == "completed", run["status"]
assert "intel-extension-for-pytorch 2.8" in device and " applied (training" in device, device
print(f"intel tiny run ({run['resolved']['dtype']}): {device}; final loss "
      f"{run['final']['loss']:.4f}")
PY
    done
    rm -rf "$out"
}
timed tests run_tests
