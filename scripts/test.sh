#!/usr/bin/env bash
# Sets up a fresh machine and runs the CPU test suite: a virtual environment in .venv, torch (the tests of the torch
# glue and the demo server use it; gpusleep itself does not need it), gpusleep with its test extras, the style
# checks (scripts/check.sh), then pytest.
# Extra arguments go to pytest. Each step prints one line as it starts and its time when it is done; on a 2-core
# machine a first run takes about 8 minutes (torch about 1, the build about 1, the suite about 5), a second one
# skips nothing but downloads nothing.
# The build takes cuda.h from its build requirement (nvidia-cuda-runtime), never from a CUDA toolkit on the machine
# (GPUSLEEP_CUDA_SYSTEM_SEARCH=OFF), so CI proves that `pip install .` needs no toolkit.
# Environment:
#   GPUSLEEP_TORCH            the torch requirement (default torch==2.13.0)
#   GPUSLEEP_TORCH_INDEX_URL  the pip index to take torch from, e.g. https://download.pytorch.org/whl/cpu: the CPU
#                             build (about 200 MB) instead of the CUDA build (several GB) that PyPI serves on Linux
set -euo pipefail
cd "$(dirname "$0")/.."
steps=6
n=0
started=$SECONDS
say() { echo "scripts/test.sh: $*"; }
begin() { n=$((n + 1)); step_start=$SECONDS; say "[$n/$steps] $*"; }
done_() { say "      done in $((SECONDS - step_start)) s"; }

begin "virtual environment in .venv"
python3 -m venv .venv
. .venv/bin/activate
done_
begin "pip itself"
python -m pip install --quiet --upgrade pip
done_
torch_spec=${GPUSLEEP_TORCH:-torch==2.13.0}
torch_from=()
[ -n "${GPUSLEEP_TORCH_INDEX_URL:-}" ] && torch_from=(--index-url "$GPUSLEEP_TORCH_INDEX_URL")
begin "$torch_spec from ${GPUSLEEP_TORCH_INDEX_URL:-the configured index} (kept if already installed)"
python -m pip install --quiet ${torch_from[@]+"${torch_from[@]}"} "$torch_spec"
done_
begin "gpusleep and its test extras: builds the C++ core (about a minute on 2 cores)"
python -m pip install --quiet -C cmake.define.GPUSLEEP_CUDA_SYSTEM_SEARCH=OFF ".[test]"
done_
begin "scripts/check.sh: ruff, mypy, clang-format, the stub (about half a minute)"
PYTHON=python bash scripts/check.sh
done_
begin "pytest $* (about 5 minutes on 2 cores; set-up took $((SECONDS - started)) s)"
exec python -m pytest "$@"
