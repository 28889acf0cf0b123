#!/usr/bin/env bash
# The style checks (docs/developing.md, "Style checks"): ruff's lint and format, mypy over python/gpusleep, clang-format
# over csrc/ (generated files excluded), and the generated stub python/gpusleep/_C.pyi against the built module.
# Prints one line per tool and exits non-zero if any of them fails; a failing tool's output follows its line.
# The tools come from the `test` extra (pinned there); scripts/test.sh, and so .ci/run, runs this before pytest.
# Environment:
#   PYTHON               the interpreter whose tools and built gpusleep._C to use (default: python on PATH)
#   GPUSLEEP_CHECK_ROOT  the tree to check (default: this checkout; tests/project/test_check_script.py points it at a copy)
#   GPUSLEEP_CHECK_SKIP  tools to skip, space separated (ruff-check ruff-format mypy clang-format stubs)
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${GPUSLEEP_CHECK_ROOT:-$here}
cd "$root" || exit 2
py=${PYTHON:-python}
bin=$(dirname "$(command -v "$py")")
tool() { if [ -x "$bin/$1" ]; then echo "$bin/$1"; else command -v "$1" || echo "$1"; fi; }
ruff=$(tool ruff) mypy=$(tool mypy) clang_format=$(tool clang-format)
failed=0
log=$(mktemp)
trap 'rm -f "$log" "${stub:-}"' EXIT
run() {  # run NAME COMMAND...: one line, then the output of a failure
  local name=$1 start=$SECONDS
  shift
  case " ${GPUSLEEP_CHECK_SKIP:-} " in *" $name "*) echo "check.sh: $name skipped"; return;; esac
  if "$@" >"$log" 2>&1; then
    echo "check.sh: $name ok ($((SECONDS - start)) s)"
  else
    echo "check.sh: $name FAILED ($((SECONDS - start)) s)"
    sed 's/^/    /' "$log"
    failed=1
  fi
}
# The C++ sources, except generated files (csrc/chunk_hash_ptx.h, from scripts/gen_chunk_hash_ptx.sh).
cxx_sources() { find csrc -name '*.h' -o -name '*.cpp' | grep -v '^csrc/chunk_hash_ptx\.h$' | sort; }
stub_check() {
  stub=$(mktemp --suffix=.pyi)
  PATH="$bin:$PATH" bash "$here/scripts/gen_stubs.sh" "$stub" >/dev/null &&
    diff -u python/gpusleep/_C.pyi "$stub" ||
    { echo "python/gpusleep/_C.pyi is stale: run scripts/gen_stubs.sh"; return 1; }
}
run ruff-check "$ruff" check .
run ruff-format "$ruff" format --check .
run mypy "$mypy"
run clang-format bash -c '"$0" --dry-run --Werror "$@"' "$clang_format" $(cxx_sources)
run stubs stub_check
exit $failed
