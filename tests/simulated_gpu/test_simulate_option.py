"""The simulated GPU for library users: ``Allocator(simulate=True)`` and ``GPUSLEEP_SIMULATE_GPU=1``, each in a
fresh process (the simulated GPU is process-wide and must come before the CUDA driver is opened)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gpusleep.simulated_gpu as simulated_gpu

SNIPPET = """
import gpusleep, gpusleep.simulated_gpu
alloc = gpusleep.Allocator({args})
weights = alloc.allocate(3 << 20, tag="weights")
alloc.write_device(weights, b"abc" * 1000)
alloc.sleep(level=1)
assert gpusleep.simulated_gpu.current().used_bytes() == 0
alloc.wake_up()
assert alloc.read_device(weights, 3000) == b"abc" * 1000
print("simulated", gpusleep.simulated_gpu.is_enabled())
"""


def run(args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("GPUSLEEP_CUDA_DRIVER", "GPUSLEEP_SIMULATE_GPU")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", SNIPPET.format(args=args)], capture_output=True, text=True, env=environment, timeout=120
    )


@pytest.fixture(autouse=True)
def needs_the_simulated_gpu():
    try:
        simulated_gpu.library_path()
    except simulated_gpu.SimulatedGpuUnavailableError as exc:
        pytest.skip(str(exc))


def test_allocator_simulate_true_runs_on_the_simulated_gpu():
    proc = run("simulate=True")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "simulated True"


def test_the_environment_variable_turns_it_on_for_library_users():
    proc = run("", GPUSLEEP_SIMULATE_GPU="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "simulated True"


def test_without_either_the_simulated_gpu_is_never_used():
    proc = run("")
    assert "simulated True" not in proc.stdout


def test_the_processes_a_simulated_process_starts_see_the_same_devices():
    code = """
import subprocess, sys
import gpusleep.simulated_gpu as sim
sim.enable(devices=3, memory_bytes=3 << 30)
child = "from gpusleep import _C; print(_C.device_count(), _C.device_info(2).total_bytes)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout.strip())
"""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSLEEP_", "FAKECUDA_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"3 {3 << 30}"
