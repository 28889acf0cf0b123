#!/usr/bin/env bash
# Regenerates python/gpusleep/_C.pyi from the built extension (needs `pip install pybind11-stubgen`).
# Run after changing csrc/bindings.cpp; tests/test_stubs.py fails while the stub and the module disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
python -m pybind11_stubgen gpusleep._C -o "$out"
cp "$out/gpusleep/_C.pyi" python/gpusleep/_C.pyi
rm -rf "$out"
echo "wrote python/gpusleep/_C.pyi"
