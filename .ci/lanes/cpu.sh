#!/usr/bin/env bash
# Lane cpu: the README's test command, `bash scripts/test.sh` (the package's suite and the example
# plugin's), on torch 2.13.0 CPU in its own virtualenv. Tests marked for cuda, rocm and xpu skip
# here with each backend's own reason (pytest -ra lists them).
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cd "$CI_ROOT"
# scripts/ resolves VENV from the repository root (the example plugin's tests need it relative).
export VENV=${CI_VENVS#"$CI_ROOT/"}/cpu
timed install bash scripts/setup.sh
timed tests bash scripts/test.sh
