"""Fixtures for the compat tests on the CPU.

PyTorch's CUDA objects are replaced by recorders (tests/torch_cuda_double.py, shared with
tests/torch/test_torch_glue_cpu.py) so that pool mode can be switched on without a GPU, and the C++ core runs
on the driver double (``fake`` and ``alloc`` come from tests/conftest.py). ``pool_tensor`` stands in
for the calls PyTorch's MemPool makes into gpusleep when a tensor is created or its segment is released:
the core's pool-mode entry points, with the tag the code under test routed to. Bytes are written and
read through the double.

Tests that need real CUDA tensors are in the ``test_*_gpu.py`` files, marked ``gpu``, and skip without a
CUDA device.
"""

from __future__ import annotations

import weakref

import pytest
import torch_cuda_double
from torch_cuda_double import install_torch_cuda_double

from gpusleep import _C

MiB = 1 << 20
STREAM = 0  # the legacy default stream


@pytest.fixture
def torch_cuda(monkeypatch, fake):
    """torch whose CUDA queries answer as in a fresh GPU process, with recorders for the CUDA objects."""
    return install_torch_cuda_double(monkeypatch, fake)


class PoolTensor:
    """A 'tensor' of ``size`` bytes allocated the way PyTorch's MemPool does in pool mode: one call to
    gpusleep's malloc entry point under the calling thread's current tag, in a segment of its own.

    ``release()`` drops the tensor as PyTorch would: its segment stays cached in the MemPool the thread was
    in (the torch double's), and goes back to gpusleep when that pool is destroyed (at once when the pool is
    gone already or there was none). ``free()`` gives the segment back to gpusleep now."""

    def __init__(self, fake, size: int, device: int = 0) -> None:
        self.fake, self.size, self.device = fake, size, device
        self.address = _C.torch_malloc(size, device, STREAM)
        assert self.address, f"pool malloc of {size} bytes failed: {_C.last_torch_error()}"
        active = torch_cuda_double.ACTIVE.active_pools() if torch_cuda_double.ACTIVE is not None else []
        self.pool = weakref.ref(active[-1]) if active else None
        self.freed = False

    def release(self) -> None:
        pool = self.pool() if self.pool is not None else None
        if pool is None or pool.destroyed:
            self.free()
        else:
            pool.cached.append(self)

    def fill(self, byte: int) -> None:
        self.fake.write(self.address, bytes([byte]) * self.size, self.device)

    def read(self) -> bytes:
        return self.fake.read(self.address, self.size, self.device)

    def free(self) -> None:
        if not self.freed:
            self.freed = True
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
