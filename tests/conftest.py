"""Fixtures for the CPU suite: the host-memory driver double (tests/fakecuda) and a fresh Allocator.

The double is built once per session and loaded by gpusleep through GPUSLEEP_CUDA_DRIVER, set only when a
test first asks for it, so that `pytest -m gpu` on a GPU machine never loads it. Every test that uses
`fake` runs twice: with a 2 MiB and with a 4 MiB granularity, so nothing may hard-code 2 MiB.
"""

from __future__ import annotations

import os
import pathlib
import zlib

import pytest
from helpers import GRANULARITIES  # noqa: E402  (one list for the fixture and the campaigns)

TESTS_ROOT = pathlib.Path(__file__).resolve().parent
# One folder per layer of the code; each test is marked with its folder's name (``pytest -m server``).
LAYERS = ("simulated_gpu", "core", "campaigns", "torch", "server", "switch", "cli", "demo", "distributed", "compat")


def pytest_configure(config):
    for layer in LAYERS + ("project",):
        config.addinivalue_line("markers", f"{layer}: tests of tests/{layer}/ (marked by folder)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = pathlib.Path(str(item.fspath)).resolve().relative_to(TESTS_ROOT).parts
        folder = parts[0] if len(parts) > 1 else ""
        if folder == "gpu":
            # GPU tests skip cleanly without a GPU; they are selected with -m gpu.
            item.add_marker(pytest.mark.gpu)
        elif folder:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def fakecuda_driver():
    from fakecuda import harness

    path = harness.build()
    os.environ["GPUSLEEP_CUDA_DRIVER"] = str(path)
    return harness.FakeCuda(path)


@pytest.fixture(params=GRANULARITIES, ids=["gran2MiB", "gran4MiB"])
def fake(request, fakecuda_driver):
    """The driver double, freshly configured: 2 devices of 1 GiB, the parametrized granularity, and a seed
    taken from the test's name so the random cross-stream order differs per test yet replays exactly.
    An active primary context costs 32 MiB of its device (tests/fakecuda/README.md): measure free memory
    with fake.free_bytes(), never as capacity minus used_bytes()."""
    seed = zlib.crc32(request.node.nodeid.encode())
    fakecuda_driver.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=request.param, seed=seed)
    fakecuda_driver.clear_violations()
    yield fakecuda_driver
    fakecuda_driver.clear_faults()
    violations = fakecuda_driver.violations()
    assert not violations, f"the driver double saw rule violations: {violations}"


@pytest.fixture
def alloc(fake):
    """A fresh gpusleep.Allocator on the double; closed at teardown, which must leave nothing behind."""
    import gpusleep

    allocator = gpusleep.Allocator()
    yield allocator
    allocator.close()
    for device in (0, 1):
        assert fake.used_bytes(device) == 0, f"device {device} still holds memory after close(): {fake.live_objects()}"


@pytest.fixture
def unverified_alloc(fake):
    """``alloc`` with wake verification off: for tests that count or fault the driver calls of the segments
    themselves, which verification's own transient buffers would take part in (Note [Verified wakes])."""
    import gpusleep

    allocator = gpusleep.Allocator(verify="off")
    yield allocator
    allocator.close()
    for device in (0, 1):
        assert fake.used_bytes(device) == 0, f"device {device} still holds memory after close(): {fake.live_objects()}"


@pytest.fixture
def global_mode(alloc):
    """``alloc`` as the global-mode torch backend (the entry points route to it), untagged to start."""
    from gpusleep import _C, DEFAULT_TAG

    alloc._core.set_mode("global")
    previous = _C.set_current_tag(DEFAULT_TAG)
    yield alloc
    _C.set_current_tag(previous)
