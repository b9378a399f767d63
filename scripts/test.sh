#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test: the package's suite, then the example plugin's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# One pytest worker per core (pytest-xdist; PYTEST_WORKERS=N for another number, 0 for none).
"$VENV/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-auto}" "$@"
(cd examples/dpo-example-plugin && "../../$VENV/bin/python" -m pytest -q)
