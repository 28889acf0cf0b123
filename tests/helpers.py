"""Small helpers shared by the CPU tests."""

from __future__ import annotations

import importlib.util
import pathlib
import random
import sys
from types import ModuleType

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MiB = 1 << 20
LEGACY_STREAM = 0  #: CUstream 0, the legacy default stream
GRANULARITIES = [2 << 20, 4 << 20]  #: every core test runs at both (tests/conftest.py's `fake` fixture)


def pattern(num_bytes: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (never all-zero, never the double's 0xA5 poison)."""
    return random.Random(seed).randbytes(num_bytes)


def write_blobs(allocator, fake, sizes, seed: int, tag: str = "weights") -> dict[int, bytes]:
    """Allocates one buffer per size under ``tag`` and fills it with a pattern; returns address -> bytes."""
    blobs = {}
    for i, size in enumerate(sizes):
        address = allocator.allocate(size, tag=tag)
        blobs[address] = pattern(size, seed + i)
        fake.write(address, blobs[address])
    return blobs


def assert_blobs_intact(fake, blobs: dict[int, bytes]) -> None:
    for address, data in blobs.items():
        assert fake.read(address, len(data)) == data, f"bytes at {address:#x} changed"


PIN_CALLS = ("cuMemHostAlloc", "cuMemHostRegister_v2")  # plain pinning, and NUMA-placed pinning


def pin_calls(fake) -> int:
    """Calls that pin host memory, whichever way (the NUMA-placed way registers an mbind-ed mapping)."""
    return sum(fake.call_count(name) for name in PIN_CALLS)


def verification_pins(alloc) -> int:
    """Pinned buffers (cuMemHostAlloc, 64 KiB, one per device) that verified sleeps and wakes read their chunk
    hashes back through (Note [Verified wakes]): not backups, so tests of backup pinning leave them out."""
    return alloc.stats().counters.get("verify_host_buffers_pinned", 0)


def load_benchmark(name: str) -> ModuleType:
    """The module benchmarks/<name>.py, loaded from its file (once per process), for tests of a benchmark's own
    code: the benchmarks are scripts, not a package on the path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"no benchmarks/{name}.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def torch_malloc(tag: str, size: int, stream: int = LEGACY_STREAM, device: int = 0) -> int:
    """What PyTorch asks of gpusleep for a new block under ``tag`` (global mode, or a MemPool segment in pool
    mode): the core's torch_malloc entry point with the thread's tag set. Asserts that it answered."""
    from gpusleep import _C

    previous = _C.set_current_tag(tag)
    try:
        address = _C.torch_malloc(size, device, stream)
    finally:
        _C.set_current_tag(previous)
    assert address, _C.last_torch_error()
    return address
