"""The GPU suite: runs only where PyTorch sees a CUDA device, against the real driver.

Every test here is marked ``gpu`` and skipped (with the reason) when torch is missing or has no CUDA.
The driver double must not leak in: ``GPUSLEEP_CUDA_DRIVER`` is removed from this process's environment
and from every worker's. PyTorch integration tests run each scenario in a fresh subprocess (global mode is
installed once per process, before any CUDA allocation); ``run_worker`` starts one and returns its facts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from gpu_workers import run_script  # noqa: E402  (pytest puts this folder on sys.path for its conftest)

HERE = Path(__file__).resolve().parent

os.environ.pop("GPUSLEEP_CUDA_DRIVER", None)


def _cuda_unavailable_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "GPU suite: torch is not installed"
    if not torch.cuda.is_available():
        return f"GPU suite: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _cuda_unavailable_reason()
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def run_worker() -> Callable[[str, str], dict]:
    def run(mode: str, scenario: str) -> dict:
        return run_script(["_worker.py", mode, scenario])

    return run
