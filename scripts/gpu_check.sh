#!/usr/bin/env bash
# The whole GPU check in one go: build and install gpusleep, record the machine, run the GPU suite, run the
# benchmarks. Usage: bash scripts/gpu_check.sh OUTDIR
#
# Meant for a GPU machine with no network (Python, torch with CUDA, nvcc, cmake, ninja, pybind11,
# scikit-build-core installed); wheels placed in wheels/ (e.g. torch_memory_saver) are installed first.
# Writes at most 8 files into OUTDIR:
#   env.txt (machine, versions, install log, step summary), pytest.log, junit.xml, probes.json,
#   bench_sleep_wake.txt / .json, bench_alloc.txt / .json.
# Every step runs even when an earlier one failed; each failure is recorded in env.txt. Exit status: that of
# pytest (non-zero if the GPU suite failed). On a machine without a GPU it still runs: the install is
# skipped (nvidia-smi absent, the installed gpusleep is used), the tests skip, the benchmarks say "needs CUDA".
# Environment: PYTHON (default: .venv/bin/python if present, else python3), GPU_CHECK_SIZES_GIB
# (default "1 4 16"). The step limits keep the whole script under about 9 minutes, so that it fits one
# device call (10 minutes at most) of a 15-minute device budget., GPUSLEEP_FORCE_INSTALL=1 to install
# even without nvidia-smi.
set -u
if [ $# -ne 1 ]; then
  echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SIZES=${GPU_CHECK_SIZES_GIB:-1 4 16}
ENV_TXT="$OUT/env.txt"
: >"$ENV_TXT"
declare -a SUMMARY=()

note() { echo "$*" | tee -a "$ENV_TXT"; }
# step NAME TIMEOUT_S LOGFILE CMD...: run, record status, never stop the script.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS rc
  echo "== $name: $*" >>"$ENV_TXT"
  timeout --kill-after=30 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  SUMMARY+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  echo "== $name: rc=$rc after $((SECONDS - start)) s" | tee -a "$ENV_TXT"
  return $rc
}

note "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), repo $ROOT"
note "git: $(git rev-parse --short HEAD 2>/dev/null || echo none) $(git status --short 2>/dev/null | wc -l) changed files"
{
  echo "--- uname"; uname -a
  echo "--- nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "--- nvcc"; nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not available"
  echo "--- python"; "$PYTHON" -c 'import sys; print(sys.version)'
  echo "--- torch"; "$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())' 2>&1
  echo "--- packages"; "$PYTHON" -m pip list 2>/dev/null | grep -i -E '^(torch|numpy|pybind11|scikit-build-core|cmake|ninja|pytest|gpusleep|torch[-_]memory[-_]saver|vllm) ' || true
  echo "--- memory"; free -g 2>/dev/null || true
} >>"$ENV_TXT" 2>&1

# 1. Carried wheels, then gpusleep itself (offline).
shopt -s nullglob
wheels=(wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  step "install wheels" 60 "$ENV_TXT" "$PYTHON" -m pip install --no-index --no-deps "${wheels[@]}"
fi
if command -v nvidia-smi >/dev/null 2>&1 || [ "${GPUSLEEP_FORCE_INSTALL:-0}" = 1 ]; then
  step "install gpusleep" 120 "$ENV_TXT" "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -v .
else
  note "== install gpusleep: skipped (no nvidia-smi here); using the installed gpusleep"
fi
step "import gpusleep" 60 "$ENV_TXT" "$PYTHON" -c 'import gpusleep, gpusleep._C as c; print("gpusleep", gpusleep.__version__, c.__file__)'

# 2. The GPU suite (the probe table lands in OUTDIR/probes.json).
step "pytest -m gpu" 240 "$OUT/pytest.log" \
  env -u GPUSLEEP_CUDA_DRIVER GPUSLEEP_PROBES_JSON="$OUT/probes.json" \
  "$PYTHON" -m pytest -m gpu tests/gpu -v -rs --junitxml="$OUT/junit.xml"
PYTEST_RC=$?

# 3. Benchmarks.
# shellcheck disable=SC2086
step "bench_sleep_wake" 150 "$OUT/bench_sleep_wake.txt" env -u GPUSLEEP_CUDA_DRIVER \
  "$PYTHON" benchmarks/bench_sleep_wake.py --sizes-gib $SIZES --timeout-s 130 --json "$OUT/bench_sleep_wake.json"
step "bench_alloc" 60 "$OUT/bench_alloc.txt" env -u GPUSLEEP_CUDA_DRIVER \
  "$PYTHON" benchmarks/bench_alloc.py --json "$OUT/bench_alloc.json"

note "--- summary"
for line in "${SUMMARY[@]}"; do note "$line"; done
note "files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $PYTEST_RC
