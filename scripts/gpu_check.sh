#!/usr/bin/env bash
# The whole GPU check in one go, offline: install the carried wheels and gpusleep, check the imports, run the GPU
# suite and the benchmarks. Usage: bash scripts/gpu_check.sh OUTDIR
#
# Meant for a GPU machine with no network (Python, torch with CUDA, nvcc, cmake, ninja, pybind11, scikit-build-core,
# pytest, pytest-timeout, httpx, hypothesis, prometheus-client). What it lacks comes as wheels in wheels/, fetched
# beforehand on a machine with network by scripts/fetch_wheels.sh and carried along; they install with
# `pip install --no-index`. On a machine without a GPU every step still runs; only what needs the GPU skips (the
# GPU suite's tests, the benchmarks' measurements).
#
# Every step has a time limit (STEP_LIMITS below; they add up to under 9 minutes, so the script fits one device call
# of at most 10 minutes), runs even when an earlier one failed, and writes its own log and JUnit file
# (steps/NAME.log, steps/NAME.junit.xml; pytest's tests have their own per-test timeout). OUTDIR gets at most 8 files,
# what a device call brings back:
#   env.txt       machine, versions, missing imports, step summary
#   junit.xml     the GPU suite's JUnit report        probes.json   the real driver's answers (from the GPU suite)
#   bench_sleep_wake.json, bench_alloc.json, bench_switch.json   the benchmarks' results
#   steps.tar.gz  steps/ (every step's log and JUnit file); GPU_CHECK_KEEP_STEPS=1 leaves steps/ unpacked instead
# Exit status: that of the GPU suite (non-zero if it failed or did not run).
# Environment: PYTHON (default: python3, or .venv/bin/python if present), GPU_CHECK_SIZES_GIB (default "1 4 16"),
# GPU_CHECK_WHEELS (default wheels), GPU_CHECK_LIMIT_SCALE (default 1): a whole number that multiplies every time limit
# (steps, per test, per benchmark). The limits are sized for the GPU machine (16 cores, one device call); CI runs this
# script offline on a small, busy machine with GPU_CHECK_LIMIT_SCALE=10, so that slowness there fails nothing.
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
SCALE=${GPU_CHECK_LIMIT_SCALE:-1}
case "$SCALE" in
  ''|*[!0-9]*|0) echo "GPU_CHECK_LIMIT_SCALE=$SCALE: give a whole number of 1 or more" >&2; exit 2 ;;
esac
WHEELS=${GPU_CHECK_WHEELS:-wheels}
STEPS="$OUT/steps"
rm -rf "$STEPS" "$OUT/steps.tar.gz" && mkdir -p "$STEPS"
ENV_TXT="$OUT/env.txt"
: >"$ENV_TXT"
export PYTHONUNBUFFERED=1

# Seconds per step. Their sum stays under 540 (9 minutes); tests/project/test_build_gpu_check.py checks it.
# install_gpusleep: about 30 s with 16 cores, 60 to 90 s on 2 busy ones. bench_switch prints and writes its JSON
# after each system, so a run cut short still leaves what it measured.
declare -A STEP_LIMITS=(
  [environment]=10 [install_wheels]=20 [check_imports]=15 [install_gpusleep]=65 [import_gpusleep]=10
  [doctor]=30 [pytest_gpu]=165 [bench_sleep_wake]=80 [bench_alloc]=25 [bench_switch]=65
)
# Every test file with GPU tests (marked gpu): tests/gpu holds the core's; the others sit next to the CPU tests of
# what they cover. tests/project/test_build_gpu_check.py checks that no file marked gpu is left out. Core first: a step
# cut short by its limit loses the last ones.
GPU_TESTS=(tests/gpu tests/switch/test_switch_gpu.py tests/compat/test_compat_gpu.py)
PER_TEST_TIMEOUT_S=$((90 * SCALE))
BENCH_SLEEP_WAKE_TIMEOUT_S=$((30 * SCALE))  # the benchmark's own limit per system (gpusleep, torch_memory_saver), inside its step's
declare -a SUMMARY=()

note() { echo "$*" | tee -a "$ENV_TXT"; }

xml_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g' | tr -cd '\11\12\15\40-\176'; }

# junit NAME RC SECONDS [SKIP_REASON]: a one-test JUnit file for a step that is not pytest.
junit() {
  local name=$1 rc=$2 seconds=$3 skip=${4:-} body=""
  if [ -n "$skip" ]; then
    body="<skipped message=\"$(printf '%s' "$skip" | xml_escape)\"/>"
  elif [ "$rc" != 0 ]; then
    body="<failure message=\"exit status $rc$([ "$rc" = 124 ] && echo ' (time limit)')\">$(tail -n 40 "$STEPS/$name.log" | xml_escape)</failure>"
  fi
  cat >"$STEPS/$name.junit.xml" <<XML
<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="gpu_check" tests="1" failures="$([ -z "$skip" ] && [ "$rc" != 0 ] && echo 1 || echo 0)" skipped="$([ -n "$skip" ] && echo 1 || echo 0)" time="$seconds"><testcase classname="gpu_check" name="$name" time="$seconds">$body</testcase></testsuite></testsuites>
XML
}

# step NAME CMD...: run under its limit, log to steps/NAME.log, record status; never stops the script.
step() {
  local name=$1 limit=$((STEP_LIMITS[$1] * SCALE))
  shift
  local start=$SECONDS rc
  echo "== $name (limit ${limit} s): $*" | tee -a "$ENV_TXT" >"$STEPS/$name.log"
  # SIGINT first: pytest still writes its JUnit file and the benchmarks their JSON; SIGKILL 5 s later.
  timeout -s INT --kill-after=5 "$limit" "$@" >>"$STEPS/$name.log" 2>&1
  rc=$?
  [ -f "$STEPS/$name.junit.xml" ] || junit "$name" "$rc" "$((SECONDS - start))"
  SUMMARY+=("$(printf '%-18s rc=%-3s %4ss (limit %ss)' "$name" "$rc" "$((SECONDS - start))" "$limit")")
  echo "== $name: rc=$rc after $((SECONDS - start)) s" | tee -a "$ENV_TXT"
  return $rc
}

# skip NAME REASON: a step that cannot run here.
skip() {
  echo "== $1: skipped: $2" | tee -a "$ENV_TXT" >"$STEPS/$1.log"
  junit "$1" 0 0 "$2"
  SUMMARY+=("$(printf '%-18s skipped: %s' "$1" "$2")")
}

total_limit=0
for name in "${!STEP_LIMITS[@]}"; do total_limit=$((total_limit + STEP_LIMITS[$name])); done
note "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), repo $ROOT, python $PYTHON; step limits add up to ${total_limit} s$([ "$SCALE" != 1 ] && echo ", times $SCALE here (GPU_CHECK_LIMIT_SCALE)")"
note "git: $(git rev-parse --short HEAD 2>/dev/null || echo none) $(git status --short 2>/dev/null | wc -l) changed files"

machine_report() {
  echo "--- uname"; uname -a
  echo "--- nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "--- nvcc"; nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not available"
  echo "--- python"; "$PYTHON" -c 'import sys; print(sys.version)'
  echo "--- torch"; "$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())' 2>&1
  echo "--- memory"; free -g 2>/dev/null || true
}
export PYTHON
export -f machine_report
step environment bash -c machine_report
cat "$STEPS/environment.log" >>"$ENV_TXT"

# 1. The carried wheels (offline), then every import the check needs.
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  step install_wheels "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-compile "${wheels[@]}"
else
  skip install_wheels "no wheels in $WHEELS/ (run scripts/fetch_wheels.sh where there is network, and carry $WHEELS)"
fi
check_imports() {
  "$PYTHON" - <<'PY'
import importlib, sys
# module: (what needs it, required for the check to mean anything)
needed = {
    "torch": ("the GPU suite and the benchmarks", True),
    "numpy": ("torch (warns without it)", False),
    "pybind11": ("building gpusleep", True),
    "scikit_build_core": ("building gpusleep", True),
    "pytest": ("the GPU suite", True),
    "pytest_timeout": ("per-test timeouts", True),
    "httpx": ("the demo server's GPU test", False),
    "hypothesis": ("the test helpers", False),
    "prometheus_client": ("the demo server's /metrics", False),
    "fastapi": ("the demo server's GPU test", False),
    "starlette": ("the demo server's GPU test", False),
    "pydantic": ("the demo server's GPU test", False),
    "uvicorn": ("the demo server's GPU test", False),
    "torch_memory_saver": ("a peer row in bench_sleep_wake", False),
}
missing_required = []
for module, (used_by, required) in needed.items():
    try:
        importlib.import_module(module)
        print(f"ok       {module}")
    except Exception as exc:  # ImportError, or a broken install
        print(f"MISSING  {module}: needed by {used_by} ({type(exc).__name__}: {exc})")
        if required:
            missing_required.append(module)
sys.exit(1 if missing_required else 0)
PY
}
export -f check_imports
step check_imports bash -c check_imports
missing=$(grep '^MISSING' "$STEPS/check_imports.log" || true)
note "--- imports: $([ -z "$missing" ] && echo "all present" || echo "missing (the tests that need them skip):")"
[ -n "$missing" ] && note "$missing"
for tool in cmake ninja nvcc; do command -v "$tool" >/dev/null 2>&1 || note "MISSING  $tool (on PATH)"; done

# 2. gpusleep itself, built here (offline: no build isolation; cuda.h from a toolkit or the nvidia wheels).
step install_gpusleep "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -v .
step import_gpusleep "$PYTHON" -c 'import gpusleep, gpusleep._C as c; print("gpusleep", gpusleep.__version__, c.__file__)'

# 2b. gpusleep doctor first: its table is the first thing a GPU run brings back (exit 3, no GPU, is not a failure
# here: the script also runs offline in CI).
doctor_step() {
  "$PYTHON" -m gpusleep.cli doctor --size-gib 1 --json-out "$OUT/doctor.json"
  local rc=$?
  if [ "$rc" = 3 ]; then echo "doctor: no GPU here (needs CUDA)"; return 0; fi
  return $rc
}
export OUT
export -f doctor_step
step doctor env -u GPUSLEEP_CUDA_DRIVER bash -c doctor_step
sed -n '/^gpusleep doctor/,/^verdict/p' "$STEPS/doctor.log" | tee -a "$ENV_TXT"

# 3. The GPU suite (its tests skip without a GPU; the probe table lands in OUTDIR/probes.json).
step pytest_gpu env -u GPUSLEEP_CUDA_DRIVER GPUSLEEP_PROBES_JSON="$OUT/probes.json" \
  "$PYTHON" -m pytest -m gpu "${GPU_TESTS[@]}" -v -rs -p no:cacheprovider --timeout="$PER_TEST_TIMEOUT_S" \
  --junitxml="$STEPS/pytest_gpu.junit.xml"
PYTEST_RC=$?
[ -f "$STEPS/pytest_gpu.junit.xml" ] && cp "$STEPS/pytest_gpu.junit.xml" "$OUT/junit.xml"

# 4. Benchmarks (without CUDA they say so and exit 0).
# shellcheck disable=SC2086
# gpusleep verified and unverified in the same run (the cost of verified wakes), a changed-piece re-sleep, and the peer.
step bench_sleep_wake env -u GPUSLEEP_CUDA_DRIVER "$PYTHON" benchmarks/bench_sleep_wake.py --sizes-gib $SIZES \
  --systems gpusleep "gpusleep verify=off" "gpusleep changed pieces" torch_memory_saver \
  --timeout-s "$BENCH_SLEEP_WAKE_TIMEOUT_S" --json "$OUT/bench_sleep_wake.json"
step bench_alloc env -u GPUSLEEP_CUDA_DRIVER "$PYTHON" benchmarks/bench_alloc.py --json "$OUT/bench_alloc.json"
step bench_switch env -u GPUSLEEP_CUDA_DRIVER "$PYTHON" benchmarks/bench_switch.py --weights-gib 8 --switches 6 \
  --json "$OUT/bench_switch.json" --logs "$STEPS/bench_switch_logs"

note "--- summary"
for line in "${SUMMARY[@]}"; do note "$line"; done
# The headlines, also in the device call's output tail: the GPU suite's last line and bench_switch's last table.
note "--- pytest_gpu: $(grep -E '(passed|failed|error|skipped)' "$STEPS/pytest_gpu.log" 2>/dev/null | tail -n 1)"
if grep -q "^bench_switch on " "$STEPS/bench_switch.log" 2>/dev/null; then
  note "--- bench_switch (last table)"
  awk '/^bench_switch on /{n=NR} {line[NR]=$0} END{if (n) for (i=n; i<=NR; i++) print line[i]}' \
    "$STEPS/bench_switch.log" | head -n 14 | tee -a "$ENV_TXT"
fi
if [ "${GPU_CHECK_KEEP_STEPS:-0}" != 1 ]; then
  tar -czf "$OUT/steps.tar.gz" -C "$OUT" steps && rm -rf "$STEPS"
fi
note "files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $PYTEST_RC
