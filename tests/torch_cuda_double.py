"""A CPU-only torch made to look like a fresh process with two GPUs, for the pool-mode and global-mode
tests (tests/torch/test_torch_glue_cpu.py, tests/compat).

:func:`install_torch_cuda_double` replaces the ``torch.cuda`` surface that gpusleep's torch glue and
compat layers call (availability and allocator checks, ``device`` / ``current_device``, ``MemPool`` /
``use_mem_pool``, ``graph``, ``CUDAGraph``, ``graph_pool_handle``, ``current_stream`` / ``stream``,
``mem_get_info``, ``CUDAPluggableAllocator``) with a
:class:`TorchCudaDouble` that answers as that process would and records what the code under test did.
The bytes themselves live in the driver double (``fake``, from tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import sys
import threading

import pytest

#: how many GPUs the doubled torch reports (the driver double is configured with as many)
DEVICE_COUNT = 2


class TorchCudaDouble:
    """Stands in for ``torch.cuda``'s devices, MemPools, graphs and pluggable allocators, and records:

    * ``events``: ``("create", device)`` when a MemPool is made (``device``: the current device then),
      ``("enter", pool.id, device)`` and ``("exit", pool.id, device)`` around each ``use_mem_pool(pool, device)``;
    * ``active_pools()``: the pools the calling thread is inside, innermost last;
    * ``graphs``: the arguments of each ``torch.cuda.graph(...)``;
    * ``pluggables``: each ``CUDAPluggableAllocator`` built.

    ``device_guard(i)`` is ``torch.cuda.device(i)``; the current device is per thread, 0 to start.
    ``mem_get_info`` answers the driver double's free bytes and ``capacity_bytes`` (the ``fake`` fixture's
    1 GiB; a test that changes the double's capacity sets this too)."""

    def __init__(self, fake) -> None:
        self.fake = fake
        self.events: list[tuple] = []
        self.graphs: list[dict] = []
        self.pluggables: list = []
        self.capacity_bytes = 1 << 30
        self.local = threading.local()
        pool_numbers = itertools.count(1)
        double = self

        class MemPool:
            """Caches like PyTorch's: a segment whose tensors were all dropped (``PoolTensor.release()`` in
            tests/compat/conftest.py) stays in ``cached`` until the pool is destroyed, when PyTorch's
            ``~MemPool`` (``releasePool`` + ``emptyCache(id)``) gives it back to the pool's allocator."""

            def __init__(self, allocator=None) -> None:
                self.allocator = allocator
                self.device = double.current_device()
                self.id = (0, next(pool_numbers))  # torch's MemPool ids are pairs of ints
                self.cached: list = []  # segments without a live tensor, still held by PyTorch
                self.destroyed = False
                double.events.append(("create", self.device))

            def __del__(self) -> None:
                self.destroyed = True
                cached, self.cached = self.cached, []
                for segment in cached:
                    segment.free()

        class CUDAPluggableAllocator:
            def __init__(self, path: str, malloc_name: str, free_name: str) -> None:
                self.path, self.malloc_name, self.free_name = path, malloc_name, free_name
                self._allocator = object()
                double.pluggables.append(self)

            def allocator(self):
                return self._allocator

        class Stream:
            """A stream of the driver double (created with device 0's context current); ``cuda_stream`` is its
            handle, 0 for the legacy default stream."""

            def __init__(self, handle: int | None = None) -> None:
                if handle is None:
                    out = ctypes.c_void_p()
                    with fake.context(0), fake._as_harness():
                        assert fake.lib.cuStreamCreate(ctypes.byref(out), 1) == 0  # CU_STREAM_NON_BLOCKING
                    handle = out.value
                    double.streams.append(self)
                self.cuda_stream = int(handle or 0)

        class CUDAGraph:
            """torch.cuda.CUDAGraph over the driver double: capture_begin starts a capture of the current stream
            (cuStreamBeginCapture), capture_end ends it. ``pool()`` is the pool handle the capture named, or a
            new one (torch makes one for a capture without a pool)."""

            def __init__(self, keep_graph: bool = False) -> None:
                self._pool = None
                self._stream = None
                self.captured = False

            def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
                if self.captured:
                    raise RuntimeError("This CUDAGraph instance already owns a captured graph.")
                stream = double.current_stream().cuda_stream
                mode = {"global": 0, "thread_local": 1, "relaxed": 2}[capture_error_mode]
                with fake._as_harness():
                    assert fake.lib.cuStreamBeginCapture_v2(ctypes.c_void_p(stream), mode) == 0
                self._pool = pool if pool is not None else double.graph_pool_handle()
                self._stream = stream

            def capture_end(self) -> None:
                graph = ctypes.c_void_p()
                with fake._as_harness():
                    rc = fake.lib.cuStreamEndCapture(ctypes.c_void_p(self._stream), ctypes.byref(graph))
                    if graph.value:
                        fake.lib.cuGraphDestroy(graph)
                self.captured = True
                if rc != 0:
                    raise RuntimeError(f"capture_end: the capture was invalidated ({rc})")

            def pool(self):
                return self._pool

            def reset(self) -> None:
                self.captured = False

        class GraphContext:
            """torch.cuda.graph as torch writes it: the capture stream current, capture_begin(*pool), capture_end."""

            default_capture_stream = None

            def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global") -> None:
                if stream is None and self.__class__.default_capture_stream is None:
                    self.__class__.default_capture_stream = Stream()
                self.pool = () if pool is None else (pool,)
                self.capture_stream = stream if stream is not None else self.__class__.default_capture_stream
                self.stream_ctx = double.stream(self.capture_stream)
                self.cuda_graph = cuda_graph
                self.capture_error_mode = capture_error_mode

            def __enter__(self) -> None:
                self.stream_ctx.__enter__()
                self.cuda_graph.capture_begin(*self.pool, capture_error_mode=self.capture_error_mode)

            def __exit__(self, *exc_info) -> None:
                self.cuda_graph.capture_end()
                self.stream_ctx.__exit__(*exc_info)

        self.MemPool = MemPool
        self.CUDAPluggableAllocator = CUDAPluggableAllocator
        self.Stream = Stream
        self.CUDAGraph = CUDAGraph
        self.GraphContext = GraphContext
        self.streams: list = []
        self._pool_numbers = pool_numbers

    def graph_pool_handle(self) -> tuple[int, int]:
        return (0, next(self._pool_numbers))

    def current_stream(self, device=None):
        stream = getattr(self.local, "stream", None)
        return stream if stream is not None else self.Stream(0)

    @contextlib.contextmanager
    def stream(self, stream):
        previous = getattr(self.local, "stream", None)
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = previous

    def destroy_streams(self) -> None:
        """Destroy the streams made by ``Stream()`` (the test's teardown)."""
        with self.fake._as_harness():
            for stream in self.streams:
                self.fake.lib.cuStreamDestroy_v2(ctypes.c_void_p(stream.cuda_stream))
        self.streams.clear()

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
        self.events.append(("enter", pool.id, device))
        self.active_pools().append(pool)
        try:
            yield
        finally:
            self.active_pools().remove(pool)
            self.events.append(("exit", pool.id, device))

    @contextlib.contextmanager
    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.graphs.append({"graph": cuda_graph, "pool": pool, "stream": stream, "mode": capture_error_mode})
        yield

    def mem_get_info(self, device=None):
        index = self.current_device() if device is None else int(device)
        return self.fake.free_bytes(index), self.capacity_bytes


#: the double installed for the running test (None outside one): tests/compat/conftest.py's tensors find the
#: MemPool they are allocated in through it
ACTIVE: TorchCudaDouble | None = None


def install_torch_cuda_double(monkeypatch, fake) -> TorchCudaDouble:
    """Make torch answer as a fresh GPU process (CUDA available, not initialized, nothing reserved, the
    native allocator, no ``expandable_segments`` in the environment) through a new :class:`TorchCudaDouble`
    over ``fake``; ``monkeypatch`` puts everything back after the test. Skips the test without torch."""
    torch = pytest.importorskip("torch")
    from gpusleep import torch_glue

    double = TorchCudaDouble(fake)
    monkeypatch.setattr(sys.modules[__name__], "ACTIVE", double)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: DEVICE_COUNT)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    monkeypatch.setattr(torch.cuda, "current_device", double.current_device)
    monkeypatch.setattr(torch.cuda, "device", double.device_guard)
    monkeypatch.setattr(torch.cuda, "MemPool", double.MemPool)
    monkeypatch.setattr(torch.cuda, "use_mem_pool", double.use_mem_pool)
    monkeypatch.setattr(torch.cuda, "graph", double.graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", double.CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", double.graph_pool_handle)
    monkeypatch.setattr(torch.cuda, "current_stream", double.current_stream)
    monkeypatch.setattr(torch.cuda, "stream", double.stream)
    monkeypatch.setattr(torch.cuda, "mem_get_info", double.mem_get_info)
    monkeypatch.setattr(torch.cuda.memory, "CUDAPluggableAllocator", double.CUDAPluggableAllocator)
    # Global mode wraps empty_cache; let monkeypatch put the originals back after the test.
    monkeypatch.setattr(torch.cuda, "empty_cache", torch.cuda.empty_cache)
    monkeypatch.setattr(torch.cuda.memory, "empty_cache", torch.cuda.memory.empty_cache)
    for variable in torch_glue.ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return double
