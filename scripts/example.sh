#!/usr/bin/env bash
# Set up (venv, install) and run the running example end to end on the embedded default.
# Arguments go to examples/running_example.py (e.g. --model DIR, --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python examples/running_example.py "$@"
