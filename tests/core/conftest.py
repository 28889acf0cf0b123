"""The C++ core (gpusleep._C and gpusleep.Allocator) against the driver double: sleep and wake transactions,
state, failures of every driver call, threads, captures, peer devices, host tiers, verified wakes. Fixtures
``fake``, ``alloc``, ``unverified_alloc`` and ``global_mode`` come from tests/conftest.py.

Every test here is marked ``core`` by tests/conftest.py: ``pytest -m core`` runs this layer. ``host_limits`` (below)
points the host-memory checks at a /proc/meminfo and a cgroup the test writes."""

from __future__ import annotations

import pytest


@pytest.fixture
def host_limits(tmp_path, monkeypatch):
    """Points the host-memory check at files the test writes: /proc/meminfo and a cgroup v2 directory."""

    def set_limits(mem_available_bytes: int, cgroup_max_bytes: int | None = None, cgroup_current_bytes: int = 0):
        (tmp_path / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {mem_available_bytes // 1024} kB\n")
        cgroup = tmp_path / "cgroup"
        cgroup.mkdir(exist_ok=True)
        (cgroup / "memory.max").write_text("max\n" if cgroup_max_bytes is None else f"{cgroup_max_bytes}\n")
        (cgroup / "memory.current").write_text(f"{cgroup_current_bytes}\n")
        (tmp_path / "self_cgroup").write_text("0::/\n")

    monkeypatch.setenv("GPUSLEEP_PROC_MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setenv("GPUSLEEP_CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setenv("GPUSLEEP_PROC_SELF_CGROUP", str(tmp_path / "self_cgroup"))
    return set_limits
