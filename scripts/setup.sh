#!/usr/bin/env bash
# Create .venv and install logprobe with the worker and dev extras.
# torch is installed first, pinned, so that pip takes the CPU wheel on this machine
# instead of a multi-GB CUDA build (set LOGPROBE_TORCH to change the requirement).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.logprobe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "${LOGPROBE_TORCH:-torch==2.13.0}"
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
