#!/usr/bin/env bash
# Sets up a fresh machine and runs the CPU test suite: a virtual environment in .venv, the CPU build of
# torch (torch is optional for gpusleep, but the tests of the torch glue and the demo server use it),
# gpusleep with its test extras, then pytest. Extra arguments go to pytest.
# The build takes cuda.h from its build requirement (nvidia-cuda-runtime), never from a CUDA toolkit on the machine
# (GPUSLEEP_CUDA_SYSTEM_SEARCH=OFF), so CI proves that `pip install .` needs no toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0          # the CPU build; a plain `torch` would pull a CUDA build
python -m pip install --quiet -C cmake.define.GPUSLEEP_CUDA_SYSTEM_SEARCH=OFF ".[test]"
python -m pytest "$@"
