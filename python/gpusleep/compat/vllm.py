"""vLLM's ``CuMemAllocator`` on gpusleep: switch with one import line.

Before::

    from vllm.device_allocator.cumem import CuMemAllocator

After::

    from gpusleep.compat.vllm import CuMemAllocator

The class keeps vLLM's names, arguments, defaults and return values (``get_instance()``,
``use_memory_pool(tag=None)``, ``reuse_memory_pool(tag)``, ``sleep(offload_tags=None)``,
``discard(tags)``, ``wake_up(tags=None)``, ``get_current_usage()``, ``release_pools()``, ``close()``, the
``"default"`` tag) and runs on one :class:`gpusleep.Allocator` in pool mode:
tensors created inside ``use_memory_pool(tag)`` live in a ``torch.cuda.MemPool`` whose segments gpusleep
maps; every other tensor keeps PyTorch's allocator.

Contract (vLLM's, kept here):

* ``use_memory_pool()`` without a tag uses the tag ``"default"``.
* ``sleep()`` releases the GPU memory of *every* tag; tags in ``offload_tags`` (default: ``("default",)``)
  are copied to pinned host memory first and restored on wake, the rest is discarded.
  ``sleep(offload_tags=())`` discards everything (what vLLM does for its level 2).
* ``discard(tags)`` releases the named tags without a copy and leaves the others mapped.
* ``wake_up(tags)`` maps memory again for ``tags`` (all tags when None): a staged wake. Only the tags
  vLLM stages (``"weights"``, ``"kv_cache"``: :data:`DEFERRED_TAGS`) wait for their own call; every other
  sleeping tag (``"workspace"``, ``"default"``, CUDA-graph pools) wakes with any wake, as in vLLM.
* ``get_current_usage()`` counts the bytes of every allocation, asleep or not, as vLLM does.
* Running out of GPU memory on wake raises an error that is a ``RuntimeError``
  (:class:`gpusleep.OutOfMemoryError`, also a ``MemoryError``), as vLLM's code expects.

Where gpusleep differs on purpose (see ``docs/migrating.md``): a wake that runs out of memory changes
nothing and can be retried; discarded memory comes back zero-filled; the backup lives in one reusable
exact-size pinned arena instead of fresh pinned tensors per sleep; sleeping twice is a no-op.

Memory freed inside ``use_memory_pool`` (or ``reuse_memory_pool``) goes back to the driver when the block
exits, as in vLLM, but not by unmapping under PyTorch's cache: each block's ``torch.cuda.MemPool`` is
retired at its end (:meth:`gpusleep.torch_glue.PoolModeGlue.retire_pool`), and PyTorch's ``~MemPool``
returns the segments without a live tensor. The next block of the tag runs in a new pool.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Union

from ..allocator import Allocator

__all__ = ["CuMemAllocator", "DEFERRED_TAGS"]

log = logging.getLogger("gpusleep.compat.vllm")

TagsArgument = Union[str, Iterable[str], None]  # noqa: UP007 - a runtime alias, kept a typing.Union

#: The tags a staged ``wake_up(tags=[...])`` leaves asleep unless named: vLLM wakes weights and KV cache in
#: separate calls (to update weights in place first); any other tag wakes with the first wake.
DEFERRED_TAGS = ("weights", "kv_cache")


def _tag_tuple(tags: str | Iterable[str], what: str) -> tuple[str, ...]:
    """A string or an iterable of strings as a tuple of tag names; anything else is a TypeError."""
    if isinstance(tags, str):
        return (tags,)
    try:
        out = tuple(tags)
    except TypeError:
        raise TypeError(f"{what} must be a tag name or a tuple of tag names, got {tags!r}") from None
    for tag in out:
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"{what}: every tag must be a non-empty string, got {tag!r} in {tags!r}")
    return out


class CuMemAllocator:
    """vLLM's sleep-mode allocator, backed by a :class:`gpusleep.Allocator` in pool mode.

    One instance per process (``get_instance()``), as in vLLM. ``allocator`` is the gpusleep allocator
    underneath: use it for what vLLM's class does not offer (``stats()``, ``reserve_host_memory()``,
    ``wake_up(zero_fill=False)``).

    Thread safety: ``sleep``, ``wake_up`` and ``get_current_usage`` may be called from any thread; the
    tag of ``use_memory_pool`` applies to the calling thread only."""

    instance: CuMemAllocator | None = None
    default_tag: str = "default"

    @staticmethod
    def get_instance() -> CuMemAllocator:
        """The process-wide instance, created (and plugged into PyTorch in pool mode) on first call."""
        if CuMemAllocator.instance is None:
            CuMemAllocator.instance = CuMemAllocator()
            atexit.register(CuMemAllocator._shutdown_singleton)
        return CuMemAllocator.instance

    @staticmethod
    def _shutdown_singleton() -> None:
        """At interpreter exit, drop the pools before PyTorch's allocator internals go (as vLLM does)."""
        instance = CuMemAllocator.instance
        if instance is not None:
            try:
                instance.release_pools()
            except Exception:  # never fail the exit
                log.exception("CuMemAllocator: release_pools() at exit failed")

    def __init__(self, allocator: Allocator | None = None) -> None:
        """``allocator``: the gpusleep allocator to use (a new one when None). It is switched to pool mode
        here, so PyTorch must have CUDA and ``expandable_segments`` must be off; otherwise
        :class:`gpusleep.torch_glue.TorchIntegrationError` (a ``RuntimeError``) says why."""
        owned = allocator is None
        self.allocator = Allocator() if allocator is None else allocator
        try:
            self.allocator.use_mem_pools()
        except BaseException:
            if owned:
                self.allocator.close()
            raise
        self.current_tag: str = CuMemAllocator.default_tag
        self._lock = threading.Lock()
        self._pool_tags: set[str] = set()  # tags whose pool use_memory_pool made (reuse_memory_pool re-enters)

    # ----------------------------------------------------------------------------------- allocation
    @contextlib.contextmanager
    def use_memory_pool(self, tag: str | None = None) -> Iterator[None]:
        """Tensors created in this block (on the current device, by this thread) belong to ``tag``
        (``"default"`` when None) and are released by :meth:`sleep`. Memory freed inside the block goes
        back to the driver when it exits (unless this thread is still inside another block of the tag)."""
        if tag is None:
            tag = CuMemAllocator.default_tag
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"use_memory_pool: tag must be a non-empty string, got {tag!r}")
        with self._lock:
            # vLLM releases every tag on sleep: none may keep gpusleep's "keep" policy (the default of
            # the tag "default").
            if self.allocator.policy(tag) == "keep":
                self.allocator.set_policy(tag, "discard")
            self._pool_tags.add(tag)
        with self._enter(tag):
            yield

    @contextlib.contextmanager
    def reuse_memory_pool(self, tag: str) -> Iterator[None]:
        """Enter ``tag``'s existing pool again: tensors created in the block belong to ``tag``.
        ``ValueError`` when :meth:`use_memory_pool` never made that pool (or :meth:`release_pools`
        dropped it), as in vLLM."""
        with self._lock:
            if tag not in self._pool_tags:
                raise ValueError(f"Memory pool for tag {tag!r} does not exist: enter use_memory_pool({tag!r}) first")
        with self._enter(tag):
            yield

    @contextlib.contextmanager
    def _enter(self, tag: str) -> Iterator[None]:
        previous = self.current_tag
        self.current_tag = tag
        key = None
        try:
            with self.allocator.tag(tag):
                key = self._pool_key()
                yield
        finally:
            self.current_tag = previous
            if key is not None:
                self._give_back_freed_memory(key)

    def _pool_key(self) -> tuple[str, int] | None:
        glue = self.allocator._torch
        current = getattr(glue, "current_pool_key", None)
        return current() if current is not None else None

    def _give_back_freed_memory(self, key: tuple[str, int]) -> None:
        """vLLM's use_memory_pool releases the pool's unused segments when the block exits. gpusleep retires
        the block's MemPool instead (PyTorch gives its segments without a live tensor back: no unmapping
        under PyTorch's cache), unless this thread is still inside another block of the same tag. The next
        block of the tag runs in a new pool."""
        glue = self.allocator._torch
        retire = getattr(glue, "retire_pool", None)
        if retire is not None:
            retire(key)

    def release_pools(self) -> None:
        """Drop this layer's ``torch.cuda.MemPool`` objects now rather than at interpreter exit (vLLM's
        guard against PyTorch finalizing its allocator before the pools). PyTorch then returns each
        pool's unused segments to gpusleep; tensors still alive keep their memory until freed, and a
        later :meth:`use_memory_pool` of a tag makes a new pool. Safe to call more than once."""
        with self._lock:
            tags, self._pool_tags = self._pool_tags, set()
        glue = self.allocator._torch
        pools = getattr(glue, "pools", None)
        if not tags or pools is None:
            return
        dropped = [pools.pop(key) for key in list(pools) if key[0] in tags]
        dropped.clear()  # the last references: each MemPool is destroyed here, its free segments released
        gc.collect()
        _empty_torch_cache()

    def close(self) -> None:
        """vLLM's alias of :meth:`release_pools` (the gpusleep allocator stays open)."""
        self.release_pools()

    # ----------------------------------------------------------------------------------- sleep/wake
    def sleep(self, offload_tags: TagsArgument = None) -> None:
        """Release the GPU memory of every tag. Tags in ``offload_tags`` (default ``("default",)``; a
        single string is one tag) are copied to pinned host memory first; the others are discarded.
        Then PyTorch's own cached memory is returned too (``torch.cuda.empty_cache()``), as in vLLM.

        Sleeping while asleep changes nothing. If a copy fails nothing is released and the error is
        raised (:class:`gpusleep.HostOutOfMemoryError` when pinned host memory runs short)."""
        tags = (CuMemAllocator.default_tag,) if offload_tags is None else _tag_tuple(offload_tags, "offload_tags")
        with self._lock:
            known = self.allocator.known_tags
            for tag in known:
                if self.allocator.policy(tag) == "keep":
                    self.allocator.set_policy(tag, "discard")
            # Listing only known tags keeps names that never held memory (vLLM's "weights" before any
            # weights were loaded) from becoming tags.
            self.allocator.sleep(level=1, offload_tags=[t for t in tags if t in known])
        gc.collect()
        _empty_torch_cache()

    def discard(self, tags: str | Iterable[str]) -> None:
        """Release the GPU memory of ``tags`` (a tag name or several) without a copy; the other tags stay
        mapped and usable. :meth:`wake_up` maps it again, zero-filled. A tag already asleep keeps its
        state (an offloaded tag stays offloaded), as in vLLM. Tags that hold no memory are ignored."""
        names = _tag_tuple(tags, "discard: tags")
        with self._lock:
            known = self.allocator.known_tags
            targets = [t for t in names if t in known]
            if not targets:
                return
            for tag in targets:
                if self.allocator.policy(tag) == "keep":
                    self.allocator.set_policy(tag, "discard")
            self.allocator.sleep(level=1, offload_tags=[], tags=targets)

    def wake_up(self, tags: TagsArgument = None) -> None:
        """Map GPU memory again, at the same addresses, for ``tags`` (every sleeping tag when None) and
        restore the offloaded bytes; discarded memory comes back zero-filled. Tags that hold no memory
        are ignored, as in vLLM. A staged wake leaves asleep only the :data:`DEFERRED_TAGS` it does
        not name: every other sleeping tag (``"workspace"``, ``"default"``) wakes with it, as in vLLM.

        A wake of named tags is vLLM's staged wake, made to write new weights in place before the KV cache
        comes back (``wake_up(tags=["weights"])``, then a weight update): it stops trusting the named
        tags' kept host copies (``keep_host_copy``, :meth:`gpusleep.Allocator.mark_changed`), awake or
        not, so the next sleep copies the new bytes. ``wake_up()`` restores and keeps trusting them: an
        engine that updates weights in place after it must call ``allocator.mark_changed(tag)`` itself.

        Out of GPU memory: :class:`gpusleep.OutOfMemoryError` (a ``RuntimeError``) says how many bytes
        were needed and free; nothing was changed, the tags stay asleep and a later call can succeed."""
        with self._lock:
            if tags is None:
                self.allocator.wake_up()
                return
            known = self.allocator.known_tags
            names = [t for t in _tag_tuple(tags, "tags") if t in known]
            others = [t for t in self.allocator.sleeping_tags if t not in DEFERRED_TAGS and t not in names]
            if names or others:
                self.allocator.wake_up(names + sorted(others))
            if names:
                self.allocator._mark_kept_copies_changed(names)

    def get_current_usage(self) -> int:
        """The bytes of every allocation in the pools, mapped or asleep, as vLLM counts them (its worker
        sizes the KV cache from it); what is mapped now is ``allocator.stats()``'s ``bytes_mapped``."""
        return sum(t.bytes_mapped + t.bytes_asleep for t in self.allocator.stats().tags.values())


def _empty_torch_cache() -> None:
    """``torch.cuda.empty_cache()`` when torch is imported and CUDA is initialized, as vLLM's sleep does."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
