#!/usr/bin/env bash
# Sets up a fresh machine and runs the demo server (an OpenAI-compatible server with sleep mode) on
# 127.0.0.1:8000. Extra arguments go to `gpusleep serve` (see `gpusleep serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0          # CPU build here; on a GPU machine install a CUDA torch instead
python -m pip install --quiet ".[server]"
exec gpusleep serve "$@"
