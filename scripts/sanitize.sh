#!/usr/bin/env bash
# Runs the C++ core's CPU suite with AddressSanitizer and UndefinedBehaviorSanitizer: builds gpusleep._C
# with -fsanitize=address,undefined into build/asan (editable install into the active environment), runs
# the core tests against the driver double, then reinstalls the normal build. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.13"  # the build runs without isolation
"$PYTHON" -m pip install --quiet --no-build-isolation -e . -C build-dir=build/asan \
  -C cmake.define.CMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer"
rc=0
# Python does not link libstdc++, so it must be preloaded with libasan for C++ exceptions to be intercepted.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/core/test_core_*.py tests/core/test_global_mode_sleep.py \
  tests/torch/test_torch_glue_cpu.py tests/campaigns/test_campaign_low_level.py tests/campaigns/test_campaign_global_mode.py \
  tests/campaigns/test_campaign_threads.py "$@" || rc=$?
"$PYTHON" -m pip install --quiet --no-build-isolation -e .
exit $rc
