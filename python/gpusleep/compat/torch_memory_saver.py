"""The ``torch_memory_saver`` module surface on gpusleep: switch with one import line, no LD_PRELOAD.

Before::

    from torch_memory_saver import torch_memory_saver

After::

    from gpusleep.compat.torch_memory_saver import torch_memory_saver

(``import gpusleep.compat.torch_memory_saver as torch_memory_saver`` covers code that uses the module:
``torch_memory_saver.torch_memory_saver``, ``torch_memory_saver.TorchMemorySaver``,
``torch_memory_saver.configure_subprocess()``.)

What SGLang, verl and slime call is here with the same names and defaults: ``region(tag="default",
enable_cpu_backup=False, enable_disk_backup=False, cpu_backup_backend=None)``, ``pause(tag=None)``,
``resume(tag=None)``, ``cuda_graph(...)``, ``disable()``, ``get_cpu_backup(x)``, ``retain_cpu_backup``
(and ``TMS_RETAIN_CPU_BACKUP``), ``set_disk_backup_dir()``, ``memory_margin_bytes``, ``enabled``,
``hook_mode``.

How it maps onto gpusleep. The backup is chosen per region, as in torch_memory_saver, while a gpusleep
policy is per tag, so each (tag, enable_cpu_backup) pair gets its own gpusleep tag (and MemPool):
``tag`` for regions without backup and ``tag + "+cpu_backup"`` for regions with one (names ending in
``"+cpu_backup"`` are therefore refused as user tags). Every such tag stays resident through other tags'
pauses (policy ``"keep"``); ``pause(tag)`` releases exactly the tags of ``tag`` (all of them when None),
copying the backup ones to pinned host memory.

Differences from torch_memory_saver (details in ``docs/migrating.md``):

* No LD_PRELOAD and no ``hook_mode="preload"``: allocations are routed by ``torch.cuda.MemPool`` (like
  its ``hook_mode="torch"``). Memory PyTorch allocates outside a region is never affected, so
  ``disable()`` only suspends the regions of the calling thread. ``hook_mode`` accepts both values and
  always works the pool way; ``configure_subprocess()`` has nothing to configure.
* ``disable()`` suspends the calling thread's regions and routes its allocations to a throw-away native
  ``MemPool``, dropped at the end of the block so that PyTorch gives its unused memory back, as
  torch_memory_saver does; it also works inside a paused region.
* Backups map onto gpusleep's host tiers (``docs/host-tiers.md``): ``cpu_backup_backend="pinned"`` (and
  None) is the pinned tier, ``"mmap"`` the pageable tier (ordinary memory, counted by no pinned budget), and
  ``enable_disk_backup=True`` the file tier, in ``set_disk_backup_dir()``'s directory (default: a private
  ``gpusleep-tms-<uid>`` directory under the system's temporary directory). Each backup kind of a tag is
  its own gpusleep tag: ``tag + "+cpu_backup"``, ``tag + "+mmap+cpu_backup"``, ``tag + "+disk+cpu_backup"``.
* ``retain_cpu_backup``: a resume keeps the backed-up regions' host copies (gpusleep's kept host copies,
  ``keep_host_copy``), refreshed by every later pause as torch_memory_saver refreshes them. Reading a
  retained copy while the tensor is on the GPU (``get_cpu_backup``) is not possible yet: None.
* Pausing a paused tag or resuming an active one is a no-op (torch_memory_saver stops the process).
* Memory without a backup comes back zero-filled; a resume short of GPU memory raises
  :class:`gpusleep.OutOfMemoryError` and leaves the tags paused, ready for a retry.
* ``get_cpu_backup(x)`` returns None while ``x``'s memory is on the GPU, as torch_memory_saver does, and a
  CPU copy of the paused tensor's host backup (read through ``Allocator.read_host_backup``) while it is
  paused with one; the result is always a copy, never zero-copy.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import _C
from ..allocator import Allocator
from ..errors import OutOfMemoryError, SleepStateError

__all__ = [
    "BACKUP_TAG_SUFFIX",
    "CPU_BACKUP_BACKENDS",
    "RETAIN_CPU_BACKUP_ENV",
    "TorchMemorySaver",
    "configure_subprocess",
    "torch_memory_saver",
]

log = logging.getLogger("gpusleep.compat.torch_memory_saver")

DEFAULT_TAG = "default"
BACKUP_TAG_SUFFIX = "+cpu_backup"
HOOK_MODES = ("preload", "torch")
#: torch_memory_saver's host-shadow kinds; both are gpusleep's pinned arena here.
CPU_BACKUP_BACKENDS = ("mmap", "pinned")
#: The environment variable torch_memory_saver reads for ``retain_cpu_backup``'s initial value.
RETAIN_CPU_BACKUP_ENV = "TMS_RETAIN_CPU_BACKUP"
_TRUE_VALUES = ("1", "true", "TRUE", "yes", "YES")
#: The gpusleep host tier (docs/host-tiers.md) of each backup kind, and the infix of its gpusleep tag.
BACKUP_TIERS = {"pinned": ("pinned", ""), "mmap": ("pageable", "+mmap"), "disk": ("file", "+disk")}


def _backup_kind(
    enable_cpu_backup: bool, enable_disk_backup: bool = False, cpu_backup_backend: str | None = None
) -> str:
    """'' (no backup), 'pinned', 'mmap' or 'disk'."""
    if enable_disk_backup:
        return "disk"
    if enable_cpu_backup:
        return cpu_backup_backend or "pinned"
    return ""


def core_tag(tag: str, enable_cpu_backup: bool, kind: str | None = None) -> str:
    """The gpusleep tag that holds the regions of ``tag`` with this backup choice (``kind``: ``"pinned"``,
    ``"mmap"`` or ``"disk"``; None: pinned when ``enable_cpu_backup``)."""
    kind = kind if kind is not None else ("pinned" if enable_cpu_backup else "")
    if not kind:
        return tag
    return tag + BACKUP_TIERS[kind][1] + BACKUP_TAG_SUFFIX


def _tier_of(name: str) -> str:
    """The host tier of a backup tag's copies."""
    for tier, infix in BACKUP_TIERS.values():
        if infix and name.endswith(infix + BACKUP_TAG_SUFFIX):
            return tier
    return "pinned"


def default_disk_backup_dir() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"gpusleep-tms-{os.getuid()}")


@dataclass
class _OpenRegion:
    """One ``region()`` block open on this thread: its gpusleep tag and the ``Allocator.tag`` context
    that routes PyTorch into its pool (None while ``disable()`` suspends it)."""

    core_tag: str
    context: contextlib.AbstractContextManager[Any] | None = None

    def enter(self, allocator: Allocator, resuming: bool = False) -> None:
        """Route this thread into the region. ``resuming``: back after ``disable()``, even if the region
        was paused meanwhile (allocating from a paused region still fails, as it did before)."""
        context = _route(allocator, self.core_tag) if resuming else allocator.tag(self.core_tag)
        context.__enter__()
        self.context = context

    def exit(self) -> None:
        context, self.context = self.context, None
        if context is not None:
            context.__exit__(None, None, None)


@contextlib.contextmanager
def _route(allocator: Allocator, name: str) -> Iterator[None]:
    """``allocator.tag(name)`` without its refusal of a sleeping tag: re-enters a region that
    ``disable()`` suspended and a ``pause()`` put to sleep meanwhile."""
    previous = _C.set_current_tag(name)
    try:
        with allocator._torch.tag_scope(name):
            yield
    finally:
        _C.set_current_tag(previous)


@dataclass
class _ThreadRegions:
    stack: list[_OpenRegion] = field(default_factory=list)


class TorchMemorySaver:
    """torch_memory_saver's ``TorchMemorySaver`` on a :class:`gpusleep.Allocator` in pool mode.

    The allocator is created and plugged into PyTorch at the first call that needs it, as
    torch_memory_saver initializes itself lazily. ``allocator`` (property) gives access to gpusleep's own
    API (``stats()``, ``reserve_host_memory()``)."""

    def __init__(self, allocator: Allocator | None = None) -> None:
        self._allocator = allocator
        self._owns_allocator = allocator is None
        self._lock = threading.RLock()
        self._threads = threading.local()
        self._user_tags: dict[str, set[str]] = {}  # user tag -> the backup kinds of its regions ('' for none)
        self._disk_backup_dir: str | None = None
        self._memory_margin_bytes = 0
        self._hook_mode = "torch"
        self._retain_cpu_backup = os.environ.get(RETAIN_CPU_BACKUP_ENV, "") in _TRUE_VALUES
        self._retained: set[str] = set()  # backup tags whose host copies a retaining resume kept

    # ------------------------------------------------------------------------------------- set-up
    @property
    def allocator(self) -> Allocator:
        """The gpusleep allocator underneath (created and switched to pool mode on first use)."""
        with self._lock:
            if self._allocator is None:
                allocator = Allocator()
                try:
                    allocator.use_mem_pools()
                except BaseException:
                    allocator.close()
                    raise
                self._allocator = allocator
            elif self._allocator.mode != "pool":
                self._allocator.use_mem_pools()
            return self._allocator

    @property
    def enabled(self) -> bool:
        """True: memory inside regions can be paused (kept for code that checks it)."""
        return True

    @property
    def hook_mode(self) -> str:
        return self._hook_mode

    @hook_mode.setter
    def hook_mode(self, hook_mode: str) -> None:
        """Accepted for compatibility: both ``"preload"`` and ``"torch"`` route through MemPools here."""
        if hook_mode not in HOOK_MODES:
            raise ValueError(f"hook_mode must be one of {HOOK_MODES}, got {hook_mode!r}")
        if hook_mode == "preload":
            log.info("hook_mode='preload': gpusleep needs no LD_PRELOAD; regions are routed by torch.cuda.MemPool")
        self._hook_mode = hook_mode

    @property
    def retain_cpu_backup(self) -> bool:
        """Whether a resume keeps the host copies of the backed-up regions it resumes (torch_memory_saver's
        retained CPU backup, here gpusleep's kept host copy). Its initial value comes from
        ``TMS_RETAIN_CPU_BACKUP`` (``1``/``true``/``yes``). Each pause copies the bytes again, into the
        kept memory; a resume with it off frees them."""
        return self._retain_cpu_backup

    @retain_cpu_backup.setter
    def retain_cpu_backup(self, value: bool) -> None:
        self._retain_cpu_backup = bool(value)

    def set_disk_backup_dir(self, path: str) -> None:
        """torch_memory_saver's directory for disk backups (``enable_disk_backup=True``): gpusleep's file tier
        writes one file per segment there, private to the user and unlinked as soon as it is open; files a
        killed process left there are deleted now. Copies already on disk stay where they are."""
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"set_disk_backup_dir: path must name a directory, got {path!r}")
        with self._lock:
            self._disk_backup_dir = os.fspath(path)
            if self._allocator is not None:
                self._allocator.set_file_dir(self._disk_backup_dir)

    @property
    def memory_margin_bytes(self) -> int:
        """GPU memory, in bytes, that ``resume()`` must leave free on the current device; it refuses
        (:class:`gpusleep.OutOfMemoryError`, nothing changed) rather than eat into it."""
        return self._memory_margin_bytes

    @memory_margin_bytes.setter
    def memory_margin_bytes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"memory_margin_bytes must be an int >= 0, got {value!r}")
        self._memory_margin_bytes = value

    # -------------------------------------------------------------------------------------- regions
    def _regions(self) -> _ThreadRegions:
        regions = getattr(self._threads, "regions", None)
        if regions is None:
            regions = self._threads.regions = _ThreadRegions()
        return regions

    def _adopt(self, tag: str, kind: str) -> str:
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"region: tag must be a non-empty string, got {tag!r}")
        if tag.endswith(BACKUP_TAG_SUFFIX):
            raise ValueError(
                f"region: tag {tag!r} ends with {BACKUP_TAG_SUFFIX!r}, which gpusleep's torch_memory_saver "
                "layer reserves for the regions with enable_cpu_backup=True: pick another tag name"
            )
        name = core_tag(tag, bool(kind), kind)
        allocator = self.allocator
        with self._lock:
            choices = self._user_tags.setdefault(tag, set())
            if kind not in choices:
                if kind == "disk":
                    if self._disk_backup_dir is None:
                        self._disk_backup_dir = default_disk_backup_dir()
                    if allocator.stats().host.file_dir != self._disk_backup_dir:
                        allocator.set_file_dir(self._disk_backup_dir)
                # released only by pause() of its own tag; its copies go to its backup kind's host tier
                allocator.set_policy(name, "keep", host_tier=_tier_of(name))
                choices.add(kind)
        return name

    @contextlib.contextmanager
    def region(
        self,
        tag: str = DEFAULT_TAG,
        enable_cpu_backup: bool = False,
        enable_disk_backup: bool = False,
        cpu_backup_backend: str | None = None,
    ) -> Iterator[None]:
        """Tensors created in this block (on the current device, by this thread) can be paused under
        ``tag``; with ``enable_cpu_backup=True`` their bytes survive a pause, otherwise they come back
        zero-filled. Regions nest: the innermost one applies. ``cpu_backup_backend`` (with
        ``enable_cpu_backup=True`` only): ``"pinned"`` (the default) keeps the copy in pinned memory, ``"mmap"``
        in pageable memory; ``enable_disk_backup=True`` keeps it in a file (:meth:`set_disk_backup_dir`)."""
        _check_backup_options(enable_cpu_backup, enable_disk_backup, cpu_backup_backend, "region")
        name = self._adopt(tag, _backup_kind(enable_cpu_backup, enable_disk_backup, cpu_backup_backend))
        stack = self._regions().stack
        entry = _OpenRegion(name)
        entry.enter(self.allocator)
        stack.append(entry)
        try:
            yield
        finally:
            stack.pop()
            entry.exit()

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Tensors created in this block by this thread use PyTorch's own allocator even inside a region,
        paused or not, from a throw-away ``torch.cuda.MemPool`` that is dropped at the end of the block:
        PyTorch then gives back the memory freed inside it (what is still alive stays until freed), as
        torch_memory_saver does. The regions resume at the end of the block."""
        import torch

        stack = self._regions().stack
        suspended: list[_OpenRegion] = []
        try:
            for entry in reversed(stack):
                entry.exit()
                suspended.append(entry)
            pool = torch.cuda.MemPool()  # PyTorch's own allocator, a pool of its own
            try:
                with torch.cuda.use_mem_pool(pool):
                    yield
            finally:
                del pool  # the last reference: the MemPool's destructor releases its unused memory
                gc.collect()
        finally:
            for entry in reversed(suspended):
                entry.enter(self.allocator, resuming=True)

    @contextlib.contextmanager
    def cuda_graph(
        self,
        cuda_graph: Any,
        pool: Any = None,
        stream: Any = None,
        capture_error_mode: str = "global",
        tag: str = DEFAULT_TAG,
        enable_cpu_backup: bool = False,
        cpu_backup_backend: str | None = None,
    ) -> Iterator[None]:
        """``torch.cuda.graph(cuda_graph, pool, stream, capture_error_mode)`` whose memory can be paused
        under ``tag``: without an explicit ``pool`` the graph allocates from the region's gpusleep pool.
        ``cpu_backup_backend`` as for :meth:`region`.
        Pass the same ``pool`` to later captures that should share it (``graph.pool()``).

        ``pause(tag)`` releases this memory, so unless ``NCCL_GRAPH_REGISTER=0`` this warns once per
        process: NCCL registers the buffers of graph-captured collectives (``docs/torch.md``)."""
        import torch

        from ..torch_glue import warn_if_nccl_registers_graph_memory

        _check_backup_options(enable_cpu_backup, False, cpu_backup_backend, "cuda_graph")
        name = core_tag(tag, bool(enable_cpu_backup), _backup_kind(enable_cpu_backup, False, cpu_backup_backend))
        with self.region(tag=tag, enable_cpu_backup=enable_cpu_backup, cpu_backup_backend=cpu_backup_backend):
            warn_if_nccl_registers_graph_memory(name, "torch_memory_saver.cuda_graph", stacklevel=4)
            if pool is None:
                pool = self._pool_id(name, torch.cuda.current_device())
            with torch.cuda.graph(cuda_graph, pool=pool, stream=stream, capture_error_mode=capture_error_mode):
                yield

    def _pool_id(self, name: str, device: int) -> Any:
        return self.allocator.mem_pool(name, device).id

    # ------------------------------------------------------------------------------- pause/resume
    def _core_tags(self, tag: str | None) -> list[str]:
        with self._lock:
            users = list(self._user_tags) if tag is None else ([tag] if tag in self._user_tags else [])
            return [core_tag(user, bool(kind), kind) for user in users for kind in sorted(self._user_tags[user])]

    def pause(self, tag: str | None = None) -> None:
        """Release the GPU memory of the regions of ``tag`` (of every region when None). Regions made with
        ``enable_cpu_backup=True`` are copied to pinned host memory first. Virtual addresses stay, so
        tensors and CUDA graphs stay valid. Pausing what is paused changes nothing."""
        allocator = self.allocator
        with self._lock:
            sleeping = allocator.sleeping_tags
            targets = [t for t in self._core_tags(tag) if t not in sleeping]
            if not targets:
                return
            offload = [t for t in targets if t.endswith(BACKUP_TAG_SUFFIX)]
            for name in offload:
                if name in self._retained:  # a retained copy is storage, refreshed at every pause
                    allocator.mark_changed(name)
            # Only these tags sleep; the named ones without a backup are discarded although their
            # policy is "keep" (which holds them through any other sleep).
            allocator.sleep(level=1, offload_tags=offload, tags=targets)

    def resume(self, tag: str | None = None) -> None:
        """Map GPU memory again for the regions of ``tag`` (every region when None), at the same
        addresses, and restore the backed-up bytes; the rest is zero-filled. Resuming what is active
        changes nothing. Short of GPU memory (or of ``memory_margin_bytes`` above what is needed), it
        raises :class:`gpusleep.OutOfMemoryError` and changes nothing.

        ``resume(tag)`` is how SGLang and verl bring weights back to update them in place: it stops
        trusting the kept host copies (``keep_host_copy``, :meth:`gpusleep.Allocator.mark_changed`) of
        ``tag``'s regions, paused or not, so the next pause copies the new bytes. ``resume()`` restores
        everything and keeps trusting them."""
        allocator = self.allocator
        with self._lock:
            named = self._core_tags(tag)
            sleeping = allocator.sleeping_tags
            targets = [t for t in named if t in sleeping]
            backed_up = [t for t in targets if t.endswith(BACKUP_TAG_SUFFIX)]
            if targets:
                if self._memory_margin_bytes:
                    self._check_margin(targets)
                if self._retain_cpu_backup:
                    for name in backed_up:  # Note [Kept host copies]: the wake keeps the copy
                        if name not in self._retained:
                            allocator.set_policy(name, "offload", keep_host_copy=True, host_tier=_tier_of(name))
                            self._retained.add(name)
                allocator.wake_up(targets)
                if not self._retain_cpu_backup:
                    for name in backed_up:
                        if name in self._retained:  # back to the layer's own policy; drops the copy
                            allocator.set_policy(name, "keep", host_tier=_tier_of(name))
                            self._retained.discard(name)
            if tag is not None:
                allocator._mark_kept_copies_changed(named)

    def _check_margin(self, targets: list[str]) -> None:
        import torch

        tags = self.allocator.stats().tags
        needed_bytes = sum(tags[t].bytes_asleep for t in targets if t in tags)
        device = torch.cuda.current_device()
        free_bytes, _total_bytes = torch.cuda.mem_get_info(device)
        if free_bytes < needed_bytes + self._memory_margin_bytes:
            raise OutOfMemoryError(
                f"resume(tags={targets}): needs {needed_bytes} bytes of GPU memory and must leave "
                f"memory_margin_bytes={self._memory_margin_bytes} free, but cuda:{device} has {free_bytes} "
                "bytes free. Nothing was changed: the regions stay paused; free GPU memory (or lower "
                "memory_margin_bytes) and call resume() again.",
                needed_bytes + self._memory_margin_bytes,
                free_bytes,
                device,
            )

    # ------------------------------------------------------------------------------------- backups
    def get_cpu_backup(self, x: Any, zero_copy: bool = False) -> Any:
        """The host copy of a paused tensor made with ``enable_cpu_backup=True``, as a CPU tensor of the
        same dtype and shape (a copy: ``zero_copy`` is accepted and ignored); None while the tensor's
        memory is on the GPU or was paused without a backup. ``x`` may also be any object with
        ``data_ptr()`` and ``nbytes``, which gets the bytes."""
        if not getattr(x, "is_cuda", False):
            raise ValueError(
                f"get_cpu_backup: expected a CUDA tensor, got {type(x).__name__} on {getattr(x, 'device', '?')}"
            )
        try:
            data = self.allocator.read_host_backup(x.data_ptr(), x.nbytes)
        except SleepStateError:
            return None  # awake, or paused without a backup
        try:
            import torch
        except ImportError:
            return data
        if not isinstance(x, torch.Tensor):
            return data
        return torch.frombuffer(bytearray(data), dtype=x.dtype).reshape(x.shape)


def _check_backup_options(
    enable_cpu_backup: bool, enable_disk_backup: bool, cpu_backup_backend: str | None, call: str
) -> None:
    """torch_memory_saver's checks of the backup arguments, then gpusleep's refusal of disk backups."""
    if cpu_backup_backend is not None:
        if cpu_backup_backend not in CPU_BACKUP_BACKENDS:
            raise ValueError(
                f"{call}: cpu_backup_backend must be one of {CPU_BACKUP_BACKENDS} or None, got {cpu_backup_backend!r}"
            )
        if not enable_cpu_backup:
            raise ValueError(f"{call}: cpu_backup_backend requires enable_cpu_backup=True")
    if enable_disk_backup and enable_cpu_backup:
        raise ValueError(f"{call}: enable_cpu_backup and enable_disk_backup are mutually exclusive")


@contextlib.contextmanager
def configure_subprocess() -> Iterator[None]:
    """torch_memory_saver sets LD_PRELOAD for child processes here; gpusleep needs no preload, so
    child processes start as they are."""
    yield


torch_memory_saver = TorchMemorySaver()
