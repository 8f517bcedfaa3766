#!/usr/bin/env bash
# Create .venv and install lorafuse with its test tools. Idempotent: a finished install is skipped.
# Torch: on a machine without an NVIDIA GPU we pin the CPU wheel torch==2.13.0 (an unpinned torch pulls a
# multi-GB CUDA build); with a GPU, pip resolves torch from the package's lower bound as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.lorafuse-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
touch "$stamp"
