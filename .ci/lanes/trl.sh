#!/usr/bin/env bash
# Lane trl: every loss against TRL 1.16's own loss code on random inputs
# (benchmarks/trl_losses.py, tests/test_trl_agreement.py). TRL lives in a throwaway virtualenv
# of its own (.ci/venvs/trl: torch's CPU wheel and trl, made by the benchmark's --make-venv),
# never a dependency of the project; our side runs in the cpu lane's virtualenv.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cd "$CI_ROOT"
export VENV=${CI_VENVS#"$CI_ROOT/"}/cpu
timed install bash scripts/setup.sh
LANE_PY=$CI_ROOT/$VENV/bin/python
TRL_PY=$CI_VENVS/trl/bin/python

trl_venv() {
    if [ -x "$TRL_PY" ] && "$TRL_PY" -c "import trl" 2>/dev/null; then
        return 0
    fi
    "$LANE_PY" benchmarks/trl_losses.py --make-venv "$CI_VENVS/trl"
}
timed trl-venv trl_venv

run_tests() {
    local out
    out=$(DPO_TRL_PYTHON=$TRL_PY lane_pytest -q -rs tests/test_trl_agreement.py 2>&1) \
        || { echo "$out"; return 1; }
    echo "$out"
    # The test skips without DPO_TRL_PYTHON; here it is set, so a skip is a failure.
    if grep -q skipped <<<"$out"; then
        echo "ci: the TRL agreement test skipped" >&2
        return 1
    fi
    "$LANE_PY" benchmarks/trl_losses.py --trl-python "$TRL_PY" || return  # the table, in the log
}
timed tests run_tests
