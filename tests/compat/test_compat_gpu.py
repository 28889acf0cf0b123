"""The peers' own GPU tests against gpusleep's compat modules, each in a fresh process as upstream runs
them (a process has one pool-mode allocator). Marked ``gpu``; skipped without a CUDA device, and never
on the driver double (``GPUSLEEP_CUDA_DRIVER`` is removed from the worker's environment). Sources and
commits: the docstring of _gpu_scenarios.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "_gpu_scenarios.py"


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


DEVICES = _cuda_devices()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICES == 0, reason="compat GPU suite: no CUDA device (torch.cuda.is_available() is False)"),
]


def run_scenario(name: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    return subprocess.run([sys.executable, str(SCRIPT), name], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "name",
    [
        "vllm_python_error",
        "vllm_basic_cumem",
        "vllm_cumem_with_cudagraph",
        "vllm_freed_inside_use_memory_pool",
        "tms_simple",
        "tms_cpu_backup",
        "tms_cuda_graph",
        "tms_cuda_graph_region",
        pytest.param("tms_multi_device", marks=pytest.mark.skipif(DEVICES < 2, reason="needs two CUDA devices")),
    ],
)
def test_peer_scenario(name):
    result = run_scenario(name)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_tms_get_cpu_backup_while_paused():
    result = run_scenario("tms_cpu_backup_get_cpu_backup")
    assert result.returncode == 0, result.stderr[-4000:]
