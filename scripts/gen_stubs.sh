#!/usr/bin/env bash
# Regenerates python/gpusleep/_C.pyi from the built extension (needs `pip install pybind11-stubgen`, in the `test`
# extra). Run after changing csrc/bindings.cpp; tests/project/test_stubs.py and scripts/check.sh fail while the stub and the
# module disagree. With an argument, writes the stub there instead (scripts/check.sh diffs it with the committed one).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-python/gpusleep/_C.pyi}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python -m pybind11_stubgen gpusleep._C -o "$out" >/dev/null
cp "$out/gpusleep/_C.pyi" "$dest"
echo "wrote $dest"
