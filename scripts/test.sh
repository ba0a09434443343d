#!/usr/bin/env bash
# Set up (venv, install, services) and run the whole test suite, lint first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
. scripts/services.sh
ruff check .
python -m pytest "$@"
