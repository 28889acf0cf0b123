#!/usr/bin/env bash
# Sets up a fresh machine and runs the demo server (an OpenAI-compatible server with sleep mode) on
# 127.0.0.1:8000. Extra arguments go to `gpusleep serve` (see `gpusleep serve --help`).
# Installs only what changed: the virtual environment in .venv, torch when it is missing, and gpusleep[serve] when
# its sources (pyproject.toml, CMakeLists.txt, csrc/, python/) differ from the last install (a stamp in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
stamp=.venv/.gpusleep-serve-sources.sha256
sources=$( { python --version; find pyproject.toml CMakeLists.txt csrc python -type f ! -name '*.pyc' -print0 \
  | sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$sources" ] || ! python -c "import gpusleep._C" 2>/dev/null; then
  python -m pip install --quiet --upgrade pip
  # The CPU build here; on a GPU machine install a CUDA build of torch first (any torch >= 2.8 is kept).
  python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
  python -m pip install --quiet ".[serve]"
  echo "$sources" >"$stamp"
fi
exec gpusleep serve "$@"
