"""scripts/check.sh passes on a clean copy of a small file set and fails, naming the tool, on a violation planted
for each of its tools (ruff's lint, ruff's format, mypy, clang-format, the generated stub).

The copy keeps the repository's layout and settings (pyproject.toml, .clang-format), so each tool runs exactly as
check.sh runs it on the repository; GPUSLEEP_CHECK_ROOT points check.sh at the copy. The stub is generated from
the gpusleep._C this interpreter imports.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check.sh"
TOOLS = ["ruff-check", "ruff-format", "mypy", "clang-format", "stubs"]
FILES = [
    "pyproject.toml",
    ".clang-format",
    "python/gpusleep/__init__.py",
    "python/gpusleep/errors.py",
    "python/gpusleep/stats.py",
    "python/gpusleep/py.typed",
    "python/gpusleep/_C.pyi",
    "csrc/size_math.h",
]
# One violation per tool, each invisible to the other tools: (tool, file, text appended).
PLANTED = [
    ("ruff-check", "python/gpusleep/stats.py", "\n\nl = 1  # E741, and nothing for the formatter or mypy\n"),
    ("ruff-format", "python/gpusleep/stats.py", "\n\n_planted = [1,2]\n"),
    ("mypy", "python/gpusleep/stats.py", '\n\n_planted: int = "not an int"\n'),
    ("clang-format", "csrc/size_math.h", "\ninline int planted_violation() {return 1;}\n"),
    ("stubs", "python/gpusleep/_C.pyi", "\ndef planted_function() -> None: ...\n"),
]


def _tools_missing() -> list[str]:
    bin_dir = pathlib.Path(sys.executable).parent
    missing = [t for t in ("ruff", "mypy", "clang-format") if not (bin_dir / t).exists() and not shutil.which(t)]
    try:
        import pybind11_stubgen  # noqa: F401
    except ImportError:
        missing.append("pybind11-stubgen")
    return missing


pytestmark = pytest.mark.skipif(bool(_tools_missing()), reason=f"tools of the test extra missing: {_tools_missing()}")


def _copy(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "tree"
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        # __init__.py imports the whole package (and _C); an empty one keeps the copy to the files named here
        text = "" if name.endswith("__init__.py") else (REPO / name).read_text()
        (root / name).write_text(text)
    return root


def _check(root: pathlib.Path) -> tuple[int, dict[str, str], str]:
    env = dict(os.environ, PYTHON=sys.executable, GPUSLEEP_CHECK_ROOT=str(root))
    env.pop("GPUSLEEP_CHECK_SKIP", None)
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    verdicts = dict(re.findall(r"^check\.sh: (\S+) (ok|FAILED)", run.stdout, re.M))
    return run.returncode, verdicts, run.stdout + run.stderr


def test_check_passes_on_the_clean_copy(tmp_path):
    rc, verdicts, output = _check(_copy(tmp_path))
    assert verdicts == dict.fromkeys(TOOLS, "ok"), output
    assert rc == 0, output


@pytest.mark.parametrize("tool, name, planted", PLANTED, ids=[p[0] for p in PLANTED])
def test_check_fails_on_a_planted_violation_and_names_its_tool(tmp_path, tool, name, planted):
    root = _copy(tmp_path)
    with open(root / name, "a") as f:
        f.write(planted)
    rc, verdicts, output = _check(root)
    assert rc != 0, output
    assert verdicts == {t: "FAILED" if t == tool else "ok" for t in TOOLS}, output


def test_the_generated_chunk_hash_ptx_is_not_checked():
    listed = subprocess.run(
        ["bash", "-c", f"source <(sed -n '/^cxx_sources()/p' {SCRIPT}); cd {REPO} && cxx_sources"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "csrc/allocator.cpp" in listed and "csrc/chunk_hash_ptx.h" not in listed
