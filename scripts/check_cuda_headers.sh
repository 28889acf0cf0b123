#!/usr/bin/env bash
# Compiles the C++ core (every csrc/*.cpp, -fsyntax-only, errors only) against the cuda.h of several CUDA releases,
# taken from PyPI's nvidia-cuda-runtime wheels (no toolkit): the oldest and newest 12.x and the newest 13.x. One build
# must work with all of them (docs/invariants.md, invariant 8); a header change that breaks it fails here, not on a user's machine.
# Usage: bash scripts/check_cuda_headers.sh [SPEC...]   (default: the three below; wheels are cached in
# build/cuda-headers). Environment: PYTHON (default: .venv/bin/python if present, else python3), CXX (default c++).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CXX=${CXX:-c++}
SPECS=("$@")
if [ ${#SPECS[@]} -eq 0 ]; then
  SPECS=("nvidia-cuda-runtime-cu12==12.0.*" "nvidia-cuda-runtime-cu12==12.9.*" "nvidia-cuda-runtime>=13,<14")
fi
CACHE=build/cuda-headers
mkdir -p "$CACHE"
"$PYTHON" -m pybind11 --includes >/dev/null 2>&1 || "$PYTHON" -m pip install --quiet "pybind11>=2.13"
PYBIND_INCLUDES=$("$PYTHON" -m pybind11 --includes)
fail=0
for spec in "${SPECS[@]}"; do
  dir="$CACHE/$(echo "$spec" | tr -c 'A-Za-z0-9.\n' '_')"
  if [ ! -f "$dir/include/cuda.h" ]; then
    rm -rf "$dir" && mkdir -p "$dir/wheel"
    # The wheel holds only headers and libraries (py3-none): any platform tag of this machine will do.
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d "$dir/wheel" "$spec"
    "$PYTHON" - "$dir" <<'PY'
import pathlib, sys, zipfile
out = pathlib.Path(sys.argv[1])
wheel = next((out / "wheel").glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("nvidia/") and "/include/" in n]
    (out / "include").mkdir()
    for n in names:
        target = out / "include" / n.split("/include/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(n))
print(f"{wheel.name}: {len(names)} headers")
PY
  fi
  version=$(grep -m1 -E '^#define CUDA_VERSION [0-9]+' "$dir/include/cuda.h" | awk '{print $3}')
  for src in csrc/*.cpp; do
    # shellcheck disable=SC2086
    if ! "$CXX" -std=c++17 -fsyntax-only -w \
      -Icsrc -I"$dir/include" $PYBIND_INCLUDES "$src"; then
      echo "FAILED: $src with cuda.h $version ($spec)"
      fail=1
    fi
  done
  echo "cuda.h $version ($spec): csrc/*.cpp checked"
done
[ $fail -eq 0 ] && echo "check_cuda_headers: the core compiles with every cuda.h tried"
exit $fail
