# Shared by .ci/run and the lane scripts in .ci/lanes/ (sourced, not run).
#
# Each lane gets its own virtualenv under .ci/venvs/ (ignored by git, reused between runs on one
# machine). Heavy lanes are installed with uv, which shares one download cache ($UV_CACHE_DIR,
# by default ~/.cache/uv) between lanes and runs, and hardlinks from it: a warm cache reinstalls
# a 7 GB lane in seconds. uv reads none of pip's configuration (/etc/pip.conf: local wheel
# folders and indexes): the lanes' torch builds are not in those folders, so uv is given only
# PyPI and the pins below, and never downloads a Python of its own.

CI_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CI_VENVS=${CI_VENVS:-$CI_ROOT/.ci/venvs}
UV_VERSION=0.13.9

# One thread per process: with two cores shared with other work, more threads only contend.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export UV_PYTHON_DOWNLOADS=never PIP_DISABLE_PIP_VERSION_CHECK=1

# Seconds spent per phase, appended by `timed` and read back by .ci/run for its summary line.
CI_TIMES=${CI_TIMES:-/dev/null}

# Bash ignores set -e inside a function run as `f || ...`, which is how `timed` runs COMMAND: a
# function given to it must return its own failures (`step || return`).
timed() {  # timed PHASE COMMAND...: run COMMAND, record "PHASE SECONDS" in $CI_TIMES
    local phase=$1 start=$SECONDS status=0
    shift
    "$@" || status=$?
    echo "$phase $((SECONDS - start))" >>"$CI_TIMES"
    return "$status"
}

uv_tool() {  # the uv binary, installed with pip into its own small virtualenv on first use
    local tools=$CI_VENVS/tools
    if [ ! -x "$tools/bin/uv" ]; then
        python3 -m venv "$tools" || return 1
        "$tools/bin/python" -m pip install -q "uv==$UV_VERSION" >&2 || return 1
    fi
    echo "$tools/bin/uv"
}

lane_venv() {  # lane_venv NAME REQUIREMENT...: create or update $CI_VENVS/NAME; sets LANE_PY
    local name=$1 uv
    shift
    uv=$(uv_tool) || return 1
    local venv=$CI_VENVS/$name
    if [ ! -x "$venv/bin/python" ]; then
        "$uv" venv -q --python "$(command -v python3)" "$venv" || return 1
    fi
    (cd "$CI_ROOT" && "$uv" pip install -q --python "$venv/bin/python" "$@") || return 1
    LANE_PY=$venv/bin/python
}

lane_pytest() {  # pytest in the lane's virtualenv, one worker per core (as scripts/test.sh);
    # collecting nothing (exit 5) is a failure
    local status=0
    (cd "$CI_ROOT" && "$LANE_PY" -m pytest -p no:cacheprovider -n auto "$@") || status=$?
    if [ "$status" -eq 5 ]; then
        echo "ci: pytest collected no tests (exit 5): this lane would prove nothing" >&2
    fi
    return "$status"
}

# Test files about dpo's own orchestration (sweeps, studies, reports, loggers, benchmarks'
# wrappers, the README's examples, help text): they drive `dpo` as processes and files, whatever
# torch build or backend is installed, so the cpu lane's run of them is enough; the xla and intel
# lanes, whose point is their torch builds and backends, leave them out.
ORCHESTRATION_TESTS=(test_sweep.py test_study.py test_report.py test_loggers.py test_eval_tasks.py
                     test_benchmarks_sft_vs_dpo.py test_readme_examples.py test_help_defaults.py)
orchestration_ignores() {  # --ignore=tests/FILE for each of ORCHESTRATION_TESTS
    local file
    for file in "${ORCHESTRATION_TESTS[@]}"; do
        printf -- '--ignore=tests/%s\n' "$file"
    done
}
