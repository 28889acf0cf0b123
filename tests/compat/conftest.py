"""Fixtures for the compat tests on the CPU.

PyTorch's CUDA objects are replaced by recorders (as in tests/test_torch_glue_cpu.py) so that pool mode
can be switched on without a GPU, and the C++ core runs on the driver double (``fake`` and ``alloc``
come from tests/conftest.py). ``pool_malloc`` / ``pool_free`` stand in for the calls PyTorch's MemPool
makes into gpusleep when a tensor is created or its segment is released: the core's pool-mode entry
points, with the tag the code under test routed to. Bytes are written and read through the double.

Tests that need real CUDA tensors are in the ``test_*_gpu.py`` files, marked ``gpu``, and skip without a
CUDA device.
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import pytest

from gpusleep import _C

MiB = 1 << 20
STREAM = 0  # the legacy default stream


class FakePluggable:
    """Stands in for torch.cuda.memory.CUDAPluggableAllocator."""

    def __init__(self, path: str, malloc_name: str, free_name: str) -> None:
        self.path, self.malloc_name, self.free_name = path, malloc_name, free_name
        self._allocator = object()

    def allocator(self):
        return self._allocator


class CudaRecorder:
    """Stands in for torch.cuda.MemPool / use_mem_pool / graph / device / current_device / mem_get_info
    and records which pool is active on each thread."""

    def __init__(self, fake) -> None:
        self.fake = fake
        self.events: list[tuple] = []
        self.local = threading.local()
        self.graphs: list[dict] = []
        self.capacity_bytes = 1 << 30  # what the fake fixture configures; tests that change it set this too
        ids = itertools.count(1)
        recorder = self

        class MemPool:
            def __init__(self, allocator=None) -> None:
                self.allocator = allocator
                self.device = recorder.current_device()
                self.id = (0, next(ids))

        self.MemPool = MemPool

    def current_device(self) -> int:
        return getattr(self.local, "device", 0)

    @contextlib.contextmanager
    def device_guard(self, index):
        previous = self.current_device()
        self.local.device = int(index)
        try:
            yield
        finally:
            self.local.device = previous

    def active_pools(self) -> list:
        if not hasattr(self.local, "pools"):
            self.local.pools = []
        return self.local.pools

    @contextlib.contextmanager
    def use_mem_pool(self, pool, device=None):
        self.events.append(("enter", pool.id))
        self.active_pools().append(pool)
        try:
            yield
        finally:
            self.active_pools().remove(pool)
            self.events.append(("exit", pool.id))

    @contextlib.contextmanager
    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.graphs.append({"graph": cuda_graph, "pool": pool, "stream": stream, "mode": capture_error_mode})
        yield

    def mem_get_info(self, device=None):
        index = self.current_device() if device is None else int(device)
        return self.fake.free_bytes(index), self.capacity_bytes


@pytest.fixture
def torch_cuda(monkeypatch, fake):
    """torch whose CUDA queries answer as in a fresh GPU process, with recorders for the CUDA objects."""
    torch = pytest.importorskip("torch")
    from gpusleep import torch_glue

    recorder = CudaRecorder(fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    monkeypatch.setattr(torch.cuda, "current_device", recorder.current_device)
    monkeypatch.setattr(torch.cuda, "device", recorder.device_guard)
    monkeypatch.setattr(torch.cuda, "MemPool", recorder.MemPool)
    monkeypatch.setattr(torch.cuda, "use_mem_pool", recorder.use_mem_pool)
    monkeypatch.setattr(torch.cuda, "graph", recorder.graph)
    monkeypatch.setattr(torch.cuda, "mem_get_info", recorder.mem_get_info)
    monkeypatch.setattr(torch.cuda.memory, "CUDAPluggableAllocator", FakePluggable)
    for variable in torch_glue.ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return recorder


class PoolTensor:
    """A 'tensor' of ``size`` bytes allocated the way PyTorch's MemPool does in pool mode: one call to
    gpusleep's malloc entry point under the calling thread's current tag."""

    def __init__(self, fake, size: int, device: int = 0) -> None:
        self.fake, self.size, self.device = fake, size, device
        self.address = _C.torch_malloc(size, device, STREAM)
        assert self.address, f"pool malloc of {size} bytes failed: {_C.last_torch_error()}"

    def fill(self, byte: int) -> None:
        self.fake.write(self.address, bytes([byte]) * self.size, self.device)

    def read(self) -> bytes:
        return self.fake.read(self.address, self.size, self.device)

    def free(self) -> None:
        _C.torch_free(self.address, self.size, self.device, STREAM)


@pytest.fixture
def pool_tensor(fake):
    """``pool_tensor(size)``: allocate like PyTorch's MemPool would; freed at teardown."""
    made: list[PoolTensor] = []

    def make(size: int, device: int = 0) -> PoolTensor:
        tensor = PoolTensor(fake, size, device)
        made.append(tensor)
        return tensor

    yield make
    for tensor in made:
        tensor.free()
