#!/usr/bin/env bash
# Sets up a fresh machine and runs the demo server (an OpenAI-compatible server with sleep mode) on
# 127.0.0.1:8000. Extra arguments go to `gpusleep serve` (see `gpusleep serve --help`).
# Installs only what changed: the virtual environment in .venv, torch when it is missing, and gpusleep[serve] when
# its sources (pyproject.toml, CMakeLists.txt, csrc/, python/) differ from the last install (a stamp in .venv).
# Each step prints one line as it starts and its time when it is done; a first run takes about 2 to 3 minutes on a
# 2-core machine (torch, then the build of the C++ core), a second one starts the server in a few seconds.
# Environment:
#   GPUSLEEP_TORCH            the torch requirement installed when torch is missing (default torch==2.13.0); on a
#                             GPU machine install a CUDA build of torch into .venv first (any torch >= 2.8 is kept)
#   GPUSLEEP_TORCH_INDEX_URL  the pip index to take torch from, e.g. https://download.pytorch.org/whl/cpu: the CPU
#                             build (about 200 MB) instead of the CUDA build (several GB) that PyPI serves on Linux
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "scripts/serve.sh: $*"; }
begin() { step_start=$SECONDS; say "$*"; }
done_() { say "      done in $((SECONDS - step_start)) s"; }

if [ ! -x .venv/bin/python ]; then
  begin "virtual environment in .venv"
  python3 -m venv .venv
  done_
fi
. .venv/bin/activate
stamp=.venv/.gpusleep-serve-sources.sha256
sources=$( { python --version; find pyproject.toml CMakeLists.txt csrc python -type f ! -name '*.pyc' ! -name '*.so' -print0 \
  | sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$sources" ] || ! python -c "import gpusleep._C" 2>/dev/null; then
  begin "pip itself"
  python -m pip install --quiet --upgrade pip
  done_
  if python -c "import torch" 2>/dev/null; then
    say "torch $(python -c 'import torch; print(torch.__version__)') already installed: kept"
  else
    torch_spec=${GPUSLEEP_TORCH:-torch==2.13.0}
    torch_from=()
    [ -n "${GPUSLEEP_TORCH_INDEX_URL:-}" ] && torch_from=(--index-url "$GPUSLEEP_TORCH_INDEX_URL")
    begin "$torch_spec from ${GPUSLEEP_TORCH_INDEX_URL:-the configured index}"
    python -m pip install --quiet ${torch_from[@]+"${torch_from[@]}"} "$torch_spec"
    done_
  fi
  begin "gpusleep[serve]: builds the C++ core (about a minute on 2 cores)"
  python -m pip install --quiet ".[serve]"
  echo "$sources" >"$stamp"
  done_
else
  say "gpusleep[serve] is up to date with the sources: nothing to install"
fi
say "starting gpusleep serve $* (Ctrl-C stops it)"
exec gpusleep serve "$@"
