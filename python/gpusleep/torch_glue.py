"""How a :class:`gpusleep.Allocator` plugs into PyTorch: global mode and pool mode.

Note [PyTorch integration]
--------------------------
Rationale. PyTorch accepts one external allocator per process through
``torch.cuda.memory.CUDAPluggableAllocator``: a pair of C function pointers (``gpusleep_torch_malloc`` /
``gpusleep_torch_free`` in ``gpusleep._C``) that never take the GIL. Two ways to use it:

* **Global mode** (:func:`enable_global_mode`, ``Allocator.pluggable()``): the pluggable allocator
  replaces PyTorch's caching allocator for every CUDA tensor of the process. gpusleep caches segments
  itself (per device, tag and stream), and the tag comes from the C++ thread-local that
  ``Allocator.tag()`` sets, so :meth:`GlobalModeGlue.tag_scope` has nothing to do.
* **Pool mode** (:func:`enable_pool_mode`, ``Allocator.use_mem_pools()``): PyTorch keeps its own
  allocator; ``Allocator.tag(name)`` enters a ``torch.cuda.MemPool`` made for (tag, current device)
  whose segments gpusleep maps. Untagged tensors stay on the native allocator at native speed.

Supported versions. PyTorch >= 2.8 (``torch.cuda.MemPool`` with a custom allocator and
``torch.cuda.use_mem_pool``), Linux, CUDA. torch is imported lazily: ``import gpusleep`` never imports it.

Limitations and quirks (see also ``docs/torch.md``):

* ``torch.cuda.memory_stats()`` / ``memory_allocated()`` raise or read zero in global mode (the pluggable
  allocator keeps no torch statistics): use ``alloc.stats()``.
* ``torch.cuda.empty_cache()`` does not reach a pluggable allocator by itself (PyTorch's Python API sets
  no reset hook), so global mode wraps ``torch.cuda.empty_cache`` (and ``torch.cuda.memory.empty_cache``)
  to also call ``alloc.empty_cache()``: cached unused segments go back to the driver as users expect.
* ``Tensor.record_stream`` cannot be hooked from Python without building against libtorch: in global
  mode a block freed on one stream is reused on that stream only, so cross-stream use needs an explicit
  ``stream.wait_stream`` / event before the tensor is freed, as with ``cudaFree``-free designs.
* Global mode: blocks allocated while a CUDA graph is being captured belong to that graph's pool and are
  never reused outside it (the graph may replay into them at any time). Captures that name the same pool
  (``torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle())``, ``pool=other.pool()``) share its blocks,
  as with PyTorch's allocator, and a pool's memory becomes releasable cache when its last graph is reset
  or destroyed: ``CUDAGraph.capture_begin`` / ``capture_end`` / ``reset`` are wrapped to tell the core
  (:func:`_share_graph_pools`, Note [Shared graph pools] in ``csrc/graph_pools.h``).
* Global mode: PyTorch's ``CUDAPluggableAllocator`` does not check the pointer an allocator returns, so
  when gpusleep cannot allocate (out of memory, or the current tag is asleep) the entry point throws a
  C++ exception that PyTorch raises as a ``RuntimeError`` naming the bytes needed and free, instead of
  returning NULL (Note [Global-mode allocation failure] in ``csrc/torch_entry.cpp``). Pool mode returns
  NULL and PyTorch raises ``torch.OutOfMemoryError``.
* ``expandable_segments:True`` in ``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF`` conflicts with
  both modes (PyTorch then maps its own segments and pools with a custom allocator are unsupported):
  both enable functions refuse it.
* Pool mode routes the allocations of the *current* device only, like ``torch.cuda.use_mem_pool``:
  select the device (``torch.cuda.device(d)``) before entering ``alloc.tag()``. Nested tags work: the
  inner tag's pool is active inside, the outer one again after it.
* NCCL registers the buffers of collectives captured in a CUDA graph (``NCCL_GRAPH_REGISTER``, on unless
  set to 0) and keeps the registration as long as the graph lives; a sleep releases that memory under
  it. Graph memory that can sleep (global mode: ``torch.cuda.graph`` captured under a tag whose policy
  is not ``"keep"``; pool mode: ``alloc.mem_pool(tag)`` of such a tag; the torch_memory_saver layer's
  ``cuda_graph()``) therefore warns once per process (:class:`NcclGraphRegisterWarning`) unless
  ``NCCL_GRAPH_REGISTER=0``. ``docs/torch.md`` ("NIC and NCCL registrations") says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import GpusleepError

__all__ = [
    "MIN_TORCH_VERSION",
    "NcclGraphRegisterWarning",
    "TorchIntegrationError",
    "GlobalModeGlue",
    "PoolModeGlue",
    "enable_global_mode",
    "enable_pool_mode",
    "expandable_segments_variable",
    "nccl_graph_register_on",
    "warn_if_nccl_registers_graph_memory",
]

MIN_TORCH_VERSION = (2, 8)
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
MALLOC_SYMBOL = "gpusleep_torch_malloc"
FREE_SYMBOL = "gpusleep_torch_free"


class TorchIntegrationError(RuntimeError, GpusleepError):
    """gpusleep cannot be plugged into PyTorch as asked; the message says why and what to do."""


class NcclGraphRegisterWarning(UserWarning):
    """CUDA-graph memory that can sleep while NCCL may register it for graph-captured collectives."""


NCCL_GRAPH_REGISTER = "NCCL_GRAPH_REGISTER"
_nccl_graph_register_warned = False
_nccl_graph_register_lock = threading.Lock()


def nccl_graph_register_on(environ: Mapping[str, str] | None = None) -> bool:
    """Whether NCCL registers the buffers of graph-captured collectives: ``NCCL_GRAPH_REGISTER`` unset
    (NCCL's default is 1) or set to anything but ``0``."""
    env = os.environ if environ is None else environ
    value = env.get(NCCL_GRAPH_REGISTER)
    return value is None or value.strip() != "0"


def warn_if_nccl_registers_graph_memory(tag: str, where: str, stacklevel: int = 3) -> bool:
    """Warn once per process (:class:`NcclGraphRegisterWarning`) that CUDA-graph memory of the sleepable
    ``tag`` may be registered by NCCL; ``where`` names the call, ``stacklevel`` (as for
    ``warnings.warn``, counted from this function) the user's frame. Returns whether it warned now."""
    global _nccl_graph_register_warned
    if not nccl_graph_register_on():
        return False
    with _nccl_graph_register_lock:
        if _nccl_graph_register_warned:
            return False
        _nccl_graph_register_warned = True
    value = os.environ.get(NCCL_GRAPH_REGISTER)
    setting = "unset (NCCL's default: on)" if value is None else f"{value!r}"
    warnings.warn(
        f"{where}: CUDA-graph memory of tag {tag!r} can sleep, and NCCL_GRAPH_REGISTER is {setting}: NCCL "
        "registers the buffers of collectives captured in a graph and keeps the registration while the graph "
        "lives, but a sleep releases that memory under it (the registration then pins the old physical memory "
        "or goes stale, and collectives replayed after the wake may read or write the wrong pages). If these "
        "graphs capture NCCL collectives, set NCCL_GRAPH_REGISTER=0 before NCCL initializes, or never put "
        "this graph memory to sleep. See docs/torch.md, 'NIC and NCCL registrations'.",
        NcclGraphRegisterWarning,
        stacklevel=stacklevel,
    )
    return True


# ----------------------------------------------------------------------------------------- checks
def expandable_segments_variable(environ: Mapping[str, str] | None = None) -> str | None:
    """The name of the allocator-config variable that turns ``expandable_segments`` on, or None.

    PyTorch reads ``key:value`` pairs separated by commas from ``PYTORCH_CUDA_ALLOC_CONF`` and
    ``PYTORCH_ALLOC_CONF``; ``expandable_segments:True`` (any case) enables the feature."""
    env = os.environ if environ is None else environ
    for variable in ALLOC_CONF_VARIABLES:
        for item in env.get(variable, "").split(","):
            key, _, value = item.partition(":")
            if key.strip() == "expandable_segments" and value.strip().lower() == "true":
                return variable
    return None


def _torch_version(version: str) -> tuple[int, int]:
    """``"2.8.0+cu128"`` -> ``(2, 8)``."""
    parts = version.split("+")[0].split(".")
    digits = ["".join(ch for ch in p if ch.isdigit()) or "0" for p in parts[:2]]
    return int(digits[0]), int(digits[1]) if len(digits) > 1 else 0


def _import_torch_with_cuda(what: str) -> Any:
    """Import torch and check version, CUDA and allocator config; raise TorchIntegrationError if unfit."""
    try:
        import torch
    except ImportError as exc:
        raise TorchIntegrationError(
            f"{what} needs PyTorch, which is not installed: pip install 'torch>=2.8' (or 'gpusleep[torch]')"
        ) from exc
    if _torch_version(torch.__version__) < MIN_TORCH_VERSION:
        raise TorchIntegrationError(
            f"{what} needs PyTorch >= {MIN_TORCH_VERSION[0]}.{MIN_TORCH_VERSION[1]} "
            f"(torch.cuda.MemPool with a custom allocator); this is torch {torch.__version__}: upgrade torch"
        )
    if not torch.cuda.is_available():
        raise TorchIntegrationError(
            f"{what}: torch.cuda.is_available() is False (torch {torch.__version__}). Sleep mode needs a CUDA "
            "device and a CUDA build of PyTorch; on a CPU-only machine gpusleep can only run against the "
            "test driver double."
        )
    variable = expandable_segments_variable()
    if variable is not None:
        raise TorchIntegrationError(
            f"{what}: {variable} contains expandable_segments:True, which conflicts with a gpusleep "
            f"allocator (PyTorch would map its own segments). Remove it from {variable} before starting "
            "the process."
        )
    return torch


def _build_pluggable(torch: Any) -> Any:
    from . import _C

    return torch.cuda.memory.CUDAPluggableAllocator(_C.library_path(), MALLOC_SYMBOL, FREE_SYMBOL)


def _set_core_mode(alloc: Any, mode: str, what: str) -> None:
    try:
        alloc._core.set_mode(mode)
    except RuntimeError as exc:
        raise TorchIntegrationError(
            f"{what}: this allocator cannot become the PyTorch backend in {mode} mode: {exc}. One gpusleep "
            "allocator per process can be plugged into PyTorch, in one mode."
        ) from exc


# ------------------------------------------------------------------------------------ global mode
@dataclass
class GlobalModeGlue:
    """The torch side of global mode: the pluggable allocator. Tags route in C++ (thread-local)."""

    pluggable: Any
    mode: str = "global"

    def tag_scope(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def enable_global_mode(alloc: Any) -> Any:
    """Make ``alloc`` the allocator of every CUDA tensor; returns the ``CUDAPluggableAllocator`` to pass to
    ``torch.cuda.memory.change_current_allocator`` before the first CUDA allocation of the process.

    Calling it again returns the same object."""
    what = "Allocator.pluggable() (global mode)"
    glue = alloc._torch
    if isinstance(glue, GlobalModeGlue):
        return glue.pluggable
    if isinstance(glue, PoolModeGlue):
        raise TorchIntegrationError(
            f"{what}: this allocator is already in pool mode (use_mem_pools()); "
            "a process uses one mode: pick global or pool mode at start-up"
        )
    torch = _import_torch_with_cuda(what)
    backend = torch.cuda.get_allocator_backend()
    if backend != "native":
        raise TorchIntegrationError(
            f"{what}: PyTorch's CUDA allocator was already changed (backend {backend!r}). Install "
            "pluggable() before any CUDA allocation and instead of any other allocator (remove "
            "backend:cudaMallocAsync from the allocator config, do not call change_current_allocator twice)."
        )
    reserved = {d: torch.cuda.memory_reserved(d) for d in range(torch.cuda.device_count())}
    in_use = {d: n for d, n in reserved.items() if n > 0}
    if in_use or torch.cuda.is_initialized():
        detail = (
            "CUDA memory was already allocated through PyTorch's native allocator ("
            + ", ".join(f"cuda:{d} holds {n} bytes" for d, n in in_use.items())
            + ")"
            if in_use
            else "torch.cuda is already initialized in this process"
        )
        raise TorchIntegrationError(
            f"{what}: {detail}, and PyTorch cannot swap an initialized allocator: install pluggable() before "
            "any CUDA allocation, i.e. call torch.cuda.memory.change_current_allocator(alloc.pluggable()) "
            "before the first CUDA tensor, stream or kernel of the process."
        )
    pluggable = _build_pluggable(torch)
    _set_core_mode(alloc, "global", what)
    alloc._torch = GlobalModeGlue(pluggable)
    _route_empty_cache(torch, alloc)
    _watch_graph_captures(torch, alloc)
    _share_graph_pools(torch, alloc)
    return pluggable


def _release_graph_pool(core: Any, handle: tuple[int, int]) -> None:
    """One graph of the pool ``handle`` is gone (a weakref finalizer: never raises)."""
    try:
        core.release_graph_pool(handle)
    except Exception:  # the allocator is closed: its memory is gone already
        pass


def _graph_pool_handle(pool: Any) -> tuple[int, int]:
    """The (int, int) id of what ``capture_begin`` accepts as ``pool``: a handle (``graph_pool_handle()``,
    ``CUDAGraph.pool()``) or, from torch 2.14, a ``torch.cuda.MemPool`` (its ``id``)."""
    pool_id = getattr(pool, "id", pool)
    first, second = pool_id
    return (int(first), int(second))


def _share_graph_pools(torch: Any, alloc: Any) -> None:
    """Make captures that name the same pool share its memory, and free a pool with its last graph (Note [Shared
    graph pools] in ``csrc/graph_pools.h``): ``torch.cuda.CUDAGraph.capture_begin`` tells the core which pool
    the capture now running on the current stream belongs to (a capture without a pool gets a new handle,
    as PyTorch does), ``capture_end`` ends that, and ``reset`` or the graph's destruction releases the graph's
    share of the pool. PyTorch's own hooks for this (``beginAllocateToPool`` / ``releasePool`` of a
    ``CUDAPluggableAllocator``) can only be set from C++ linked against libtorch."""
    found = getattr(torch.cuda, "CUDAGraph", None)
    if not isinstance(found, type) or "__gpusleep_pools__" in found.__dict__:
        return
    cls: Any = found
    core = alloc._core
    original_begin, original_end, original_reset = cls.capture_begin, cls.capture_end, cls.reset

    def capture_begin(self: Any, pool: Any = None, *args: Any, **kwargs: Any) -> None:
        # Everything that may fail runs before the capture begins, or ends it again: a capture_begin that raises
        # never leaves its stream capturing.
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        handle = _graph_pool_handle(pool)
        original_begin(self, pool, *args, **kwargs)
        bound_stream: int | None = None
        try:
            stream = int(torch.cuda.current_stream().cuda_stream)
            try:
                core.begin_graph_pool_capture(stream, handle)
            except GpusleepError:  # a closed allocator: the capture keeps a pool of its own, as any unseen capture
                return
            bound_stream = stream
            self._gpusleep_graph_pool = weakref.finalize(self, _release_graph_pool, core, handle)
            self._gpusleep_capture_stream = stream
        except BaseException:
            release = self.__dict__.pop("_gpusleep_graph_pool", None)
            self.__dict__.pop("_gpusleep_capture_stream", None)
            if bound_stream is not None:  # the pool counted this graph: take it back
                with contextlib.suppress(Exception):
                    core.end_graph_pool_capture(bound_stream)
                if release is not None:
                    release()
                else:
                    _release_graph_pool(core, handle)
            with contextlib.suppress(Exception):
                original_end(self)  # ends the capture; the graph is thrown away
            with contextlib.suppress(Exception):
                original_reset(self)
            raise

    def capture_end(self: Any) -> None:
        try:
            original_end(self)
        finally:
            stream = self.__dict__.pop("_gpusleep_capture_stream", None)
            if stream is not None:
                with contextlib.suppress(Exception):
                    core.end_graph_pool_capture(stream)

    def reset(self: Any) -> None:
        original_reset(self)
        release = self.__dict__.pop("_gpusleep_graph_pool", None)
        if release is not None:
            release()  # a finalizer runs once: the destruction later releases nothing more

    for name, wrapper, original in (
        ("capture_begin", capture_begin, original_begin),
        ("capture_end", capture_end, original_end),
        ("reset", reset, original_reset),
    ):
        functools.update_wrapper(wrapper, original)
        setattr(cls, name, wrapper)
    cls.__gpusleep_pools__ = True


def _watch_graph_captures(torch: Any, alloc: Any) -> None:
    """Make ``torch.cuda.graph`` check, as a capture starts, whether the graph's memory can sleep (global
    mode allocates it under the capturing thread's tag) while NCCL may register it."""
    from . import _C

    original = getattr(torch.cuda.graph, "__gpusleep_original__", torch.cuda.graph)
    if not isinstance(original, type):  # not torch's context-manager class: leave it alone
        return

    class graph(original):  # type: ignore[misc, valid-type]
        __gpusleep_original__ = original
        __doc__ = original.__doc__

        def __enter__(self) -> Any:
            tag = _C.current_tag()
            try:
                sleepable = alloc.policy(tag) != "keep"
            except Exception:  # a closed allocator: nothing of it can sleep
                sleepable = False
            if sleepable:
                warn_if_nccl_registers_graph_memory(tag, "torch.cuda.graph (gpusleep global mode)")
            return super().__enter__()

    graph.__name__, graph.__qualname__, graph.__module__ = original.__name__, original.__qualname__, original.__module__
    torch.cuda.graph = graph


def _route_empty_cache(torch: Any, alloc: Any) -> None:
    """Make ``torch.cuda.empty_cache()`` also return gpusleep's cached unused segments to the driver."""
    from .errors import SleepStateError

    original = torch.cuda.memory.empty_cache
    original = getattr(original, "__gpusleep_original__", original)
    core = alloc._core

    @functools.wraps(original)
    def empty_cache() -> None:
        try:
            core.empty_cache()
        except SleepStateError:  # that allocator was closed; PyTorch's own cache still gets emptied
            pass
        original()

    empty_cache.__gpusleep_original__ = original  # type: ignore[attr-defined]
    torch.cuda.memory.empty_cache = empty_cache
    torch.cuda.empty_cache = empty_cache


# -------------------------------------------------------------------------------------- pool mode
@dataclass
class _PoolScope:
    """One active ``use_mem_pool`` on this thread: the pool of (tag, device) and its context manager."""

    key: tuple[str, int]
    context: Any = None

    def enter(self, glue: PoolModeGlue) -> None:
        import torch

        tag, device = self.key
        self.context = torch.cuda.use_mem_pool(glue.pool_for(tag, device), device)
        self.context.__enter__()

    def exit(self) -> None:
        context, self.context = self.context, None
        if context is not None:
            context.__exit__(None, None, None)


@dataclass
class PoolModeGlue:
    """The torch side of pool mode: one ``torch.cuda.MemPool`` per (tag, device), kept for the life of the
    allocator, and a per-thread stack of the pools entered by nested ``tag()`` blocks.

    PyTorch routes a thread's allocations to the first pool it entered, so a nested ``tag()`` suspends the
    outer pool while it runs and resumes it on exit."""

    pluggable: Any
    pools: dict[tuple[str, int], Any] = field(default_factory=dict)
    mode: str = "pool"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _threads: threading.local = field(default_factory=threading.local, repr=False)

    def pool_for(self, tag: str, device: int) -> Any:
        """The MemPool that holds ``tag`` on ``device``, created on first use (on that device)."""
        import torch

        key = (tag, int(device))
        with self._lock:
            pool = self.pools.get(key)
            if pool is None:
                with torch.cuda.device(key[1]):
                    pool = torch.cuda.MemPool(self.pluggable.allocator())
                self.pools[key] = pool
            return pool

    def current_pool_key(self) -> tuple[str, int] | None:
        """The (tag, device) of the pool the calling thread's innermost ``tag()`` block routes to, or None."""
        stack = self._stack()
        return stack[-1].key if stack else None

    def retire_pool(self, key: tuple[str, int]) -> bool:
        """Forget the MemPool of ``key`` unless the calling thread is still inside a ``tag()`` block that uses
        it; the next ``tag()`` of that tag and device makes a new one. PyTorch destroys the pool when its last
        reference goes (at once here, unless another thread is still inside it): ``~MemPool`` releases the
        pool and empties its cache, which gives every segment without a live tensor back to gpusleep, and so
        to the driver. Live tensors keep their memory, and their tag, until they are freed. Returns whether
        the pool was forgotten."""
        if any(scope.key == key for scope in self._stack()):
            return False
        with self._lock:
            pool = self.pools.pop(key, None)
        del pool  # the last reference, when no thread is inside it: destroyed here
        return True

    def _stack(self) -> list[_PoolScope]:
        stack = getattr(self._threads, "stack", None)
        if stack is None:
            stack = self._threads.stack = []
        return stack

    @contextlib.contextmanager
    def tag_scope(self, name: str) -> Iterator[None]:
        import torch

        stack = self._stack()
        scope = _PoolScope((name, int(torch.cuda.current_device())))
        outer = stack[-1] if stack else None
        if outer is not None:
            outer.exit()
        try:
            scope.enter(self)
        except BaseException:
            if outer is not None:
                outer.enter(self)
            raise
        stack.append(scope)
        try:
            yield
        finally:
            stack.pop()
            try:
                scope.exit()
            finally:
                if outer is not None:
                    outer.enter(self)


def enable_pool_mode(alloc: Any) -> PoolModeGlue:
    """From now on ``alloc.tag(name)`` routes PyTorch allocations of the current device into a MemPool
    backed by ``alloc``; untagged tensors keep PyTorch's native allocator. Idempotent."""
    what = "Allocator.use_mem_pools() (pool mode)"
    glue = alloc._torch
    if isinstance(glue, PoolModeGlue):
        return glue
    if isinstance(glue, GlobalModeGlue):
        raise TorchIntegrationError(
            f"{what}: this allocator is already in global mode (pluggable()); "
            "a process uses one mode: pick global or pool mode at start-up"
        )
    torch = _import_torch_with_cuda(what)
    missing = [n for n in ("MemPool", "use_mem_pool") if not hasattr(torch.cuda, n)]
    if missing:
        raise TorchIntegrationError(
            f"{what}: this torch {torch.__version__} lacks torch.cuda.{', torch.cuda.'.join(missing)}: "
            f"upgrade to torch >= {MIN_TORCH_VERSION[0]}.{MIN_TORCH_VERSION[1]}"
        )
    backend = torch.cuda.get_allocator_backend()
    if backend != "native":
        raise TorchIntegrationError(
            f"{what}: memory pools need PyTorch's native caching allocator, but the backend is {backend!r}. "
            "Remove backend:cudaMallocAsync from the allocator config and do not install another allocator."
        )
    pluggable = _build_pluggable(torch)
    _set_core_mode(alloc, "pool", what)
    glue = PoolModeGlue(pluggable)
    alloc._torch = glue
    return glue
