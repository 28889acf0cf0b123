"""scripts/gpu_check.sh, run the way the GPU machine runs it (offline, a scratch output folder).

The end-to-end run builds gpusleep (about a minute on two cores), so it runs when GPUSLEEP_RUN_GPU_CHECK=1 (.ci/run
sets it); the budget check always runs.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = [
    "environment",
    "install_wheels",
    "check_imports",
    "install_gpusleep",
    "import_gpusleep",
    "doctor",
    "pytest_gpu",
    "bench_sleep_wake",
    "bench_alloc",
    "bench_switch",
]
GPU_MARK = re.compile(r"^\s*(@|pytestmark\s*=\s*\[?\s*)?pytest\.mark\.gpu\b", re.M)  # a decorator, or in pytestmark
DEVICE_CALL_LIMIT_S = 540  # 9 minutes: one device call is at most 10
#: The offline run here multiplies the GPU machine's limits: a small, busy CI machine must not fail a step for being
#: slow (the build alone takes about a minute on two idle cores). Its own bound only catches a hang, within
#: pytest-timeout's 900 s.
LIMIT_SCALE = 10
OFFLINE_RUN_BOUND_S = 870


def step_limits() -> dict[str, int]:
    block = re.search(r"declare -A STEP_LIMITS=\((.*?)\)", SCRIPT.read_text(), re.S)
    assert block, "gpu_check.sh declares its step limits in STEP_LIMITS"
    return {name: int(seconds) for name, seconds in re.findall(r"\[(\w+)\]=(\d+)", block.group(1))}


def test_every_step_has_a_limit_and_they_fit_one_device_call():
    limits = step_limits()
    assert sorted(limits) == sorted(STEPS)
    kill_after_s = 5 * len(limits)  # timeout --kill-after per step
    assert sum(limits.values()) + kill_after_s < DEVICE_CALL_LIMIT_S, limits


def test_the_gpu_check_runs_every_test_file_marked_gpu():
    """A GPU test outside the paths gpu_check.sh gives pytest never runs on the GPU machine (two did not)."""
    block = re.search(r"^GPU_TESTS=\((.*?)\)", SCRIPT.read_text(), re.M)
    assert block, "gpu_check.sh lists the GPU test paths in GPU_TESTS=(...)"
    paths = [REPO / p for p in block.group(1).split()]
    assert all(p.exists() for p in paths), paths
    marked = {f for f in (REPO / "tests").rglob("test_*.py") if GPU_MARK.search(f.read_text())}
    marked |= set((REPO / "tests" / "gpu").rglob("test_*.py"))  # marked gpu by tests/gpu/conftest.py
    assert marked, "no GPU test files found"
    left_out = sorted(str(f.relative_to(REPO)) for f in marked if not any(p == f or p in f.parents for p in paths))
    assert not left_out, f"GPU test files gpu_check.sh does not run: {left_out}"


@pytest.mark.skipif(
    os.environ.get("GPUSLEEP_RUN_GPU_CHECK") != "1", reason="set GPUSLEEP_RUN_GPU_CHECK=1 (builds gpusleep)"
)
def test_gpu_check_runs_every_step_offline_and_skips_only_what_needs_a_gpu(tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        GPU_CHECK_WHEELS=str(tmp_path / "no-wheels"),
        GPU_CHECK_LIMIT_SCALE=str(LIMIT_SCALE),
    )
    env.pop("GPUSLEEP_CUDA_DRIVER", None)
    # unshare -n: no network, as on the GPU machine; where namespaces are not allowed, run as is.
    offline = (
        ["unshare", "-n"] if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 else []
    )
    proc = subprocess.run(
        [*offline, "bash", str(SCRIPT), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=OFFLINE_RUN_BOUND_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what one device call brings back
    assert {"env.txt", "junit.xml", "steps.tar.gz"} <= set(files)
    with tarfile.open(out / "steps.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked")
    steps = tmp_path / "unpacked" / "steps"
    for name in STEPS:
        assert (steps / f"{name}.log").is_file(), name
        suite = ET.parse(steps / f"{name}.junit.xml").getroot()
        cases = suite.findall(".//testcase")
        assert cases, name
        failures = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
        assert not failures, f"{name}: {ET.tostring(failures[0], encoding='unicode')[:2000]}"
        skipped = [c for c in cases if c.find("skipped") is not None]
        if name == "install_wheels":
            assert len(skipped) == 1  # no wheels were carried here
        elif name == "pytest_gpu":
            reasons = {c.find("skipped").get("message", "") for c in skipped}
            assert len(skipped) == len(cases), "without a GPU every GPU test skips"
            assert all("CUDA" in r or "cuda" in r for r in reasons), reasons
        else:
            assert not skipped, name
    summary = (out / "env.txt").read_text()
    assert f"times {LIMIT_SCALE} here" in summary and f"limit {80 * LIMIT_SCALE} s" in summary  # install_gpusleep's
    for name in STEPS:
        assert re.search(rf"^{name}\s+(rc=0|skipped)", summary, re.M), summary
    assert "needs CUDA" in (steps / "bench_sleep_wake.log").read_text()
    assert "needs CUDA" in (steps / "bench_switch.log").read_text()


def test_a_bad_limit_scale_is_refused_before_any_step(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, GPU_CHECK_LIMIT_SCALE="fast"),
        timeout=60,
    )
    assert proc.returncode == 2 and "GPU_CHECK_LIMIT_SCALE=fast" in proc.stderr
    assert not (tmp_path / "out" / "steps").exists()
