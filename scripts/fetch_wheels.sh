#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels that the GPU machine lacks into wheels/ (ignored by git), for
# scripts/gpu_check.sh to install there offline: the demo server's FastAPI stack (its GPU test starts the server)
# and torch_memory_saver (a peer in the sleep/wake benchmark). Pinned to versions tested together.
# Usage: bash scripts/fetch_wheels.sh [DIR]   (default wheels/). Environment: PYTHON_VERSION (default 3.12, the GPU
# machine's), PLATFORM (default x86_64).
# What the GPU machine already has (DEVICE_HAS below, from its image's package list) is not fetched, except where a
# carried package needs a newer version than it may have (anyio, typing-extensions). The script checks that every
# requirement of every carried wheel is met by the carried wheels or by DEVICE_HAS, so `pip install --no-index` there
# cannot fail on a missing dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORM=${PLATFORM:-x86_64}
WHEELS=(
  "fastapi==0.165.0" "starlette==1.10.0" "uvicorn==0.54.0" "pydantic==2.14.4" "pydantic-core==2.50.5"
  "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing-extensions==4.16.0" "opentelemetry-api==1.45.2"
  "anyio==4.16.0" "torch-memory-saver==0.0.10"
)
mkdir -p "$DIR"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform "manylinux_2_28_$PLATFORM" --platform "manylinux_2_17_$PLATFORM" --platform "manylinux2014_$PLATFORM" \
  --platform "manylinux1_$PLATFORM" -d "$DIR" "${WHEELS[@]}"
DEVICE_HAS="torch numpy httpx httpcore idna certifi click h11 annotated-doc zipp packaging pytest pytest-timeout
  hypothesis prometheus-client pybind11 scikit-build-core cmake ninja"
# One version of each (a second stops the whole offline install), and every requirement met.
python3 - "$DIR" "$PYTHON_VERSION" $DEVICE_HAS <<'PY'
import collections, email, pathlib, re, sys, zipfile
from pip._vendor.packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

wheel_dir, python_version, device_has = pathlib.Path(sys.argv[1]), sys.argv[2], {norm(n) for n in sys.argv[3:]}
names = collections.defaultdict(list)
requirements = []
for w in sorted(wheel_dir.glob("*.whl")):
    names[norm(w.name.split("-")[0])].append(w.name)
    with zipfile.ZipFile(w) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    requirements += [(w.name, Requirement(r)) for r in meta.get_all("Requires-Dist") or []]
twice = {n: v for n, v in names.items() if len(v) > 1}
if twice:
    sys.exit(f"fetch_wheels: more than one version of {sorted(twice)} in {wheel_dir}: remove the old ones")
env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
unmet = sorted({f"{req} (for {wheel})" for wheel, req in requirements
                if (req.marker is None or req.marker.evaluate(env)) and norm(req.name) not in names
                and norm(req.name) not in device_has})
if unmet:
    sys.exit("fetch_wheels: requirements met neither by the carried wheels nor by the GPU machine: " + "; ".join(unmet))
PY
echo "fetch_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR: carry it to the GPU machine"
