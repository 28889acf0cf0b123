"""The package imports and explains itself on a machine with no GPU and no driver."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_import_needs_no_gpu_and_no_torch():
    result = run_python(
        "import sys, gpusleep; print('torch' in sys.modules); a = gpusleep.Allocator(); print(a.is_sleeping)",
        GPUSLEEP_CUDA_DRIVER="/nonexistent/libcuda.so.1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_first_driver_call_without_a_driver_raises_a_clear_error():
    result = run_python(
        "import gpusleep\n"
        "try:\n"
        "    gpusleep.Allocator().allocate(1)\n"
        "except gpusleep.DriverUnavailableError as e:\n"
        "    print('OK', e)\n",
        GPUSLEEP_CUDA_DRIVER="/nonexistent/libcuda.so.1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK")
    assert "/nonexistent/libcuda.so.1" in result.stdout and "GPUSLEEP_CUDA_DRIVER" in result.stdout


def test_public_names():
    import gpusleep

    for name in ["Allocator", "CudaError", "OutOfMemoryError", "SleepStateError", "SleepReport", "WakeReport",
                 "TagStats", "AllocatorStats"]:
        assert hasattr(gpusleep, name), name
    assert issubclass(gpusleep.OutOfMemoryError, MemoryError)
