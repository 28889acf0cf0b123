"""The public :class:`Allocator`: a thin layer over the C++ core in ``gpusleep._C``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from . import _C
from .stats import AllocatorStats, HostMemoryReport, SleepReport, TagStats, WakePlan, WakeReport, format_bytes

__all__ = ["Allocator", "DEFAULT_TAG", "HOST_TIERS", "POLICIES"]

log = logging.getLogger("gpusleep")

DEFAULT_TAG = "default"
POLICIES = ("offload", "discard", "keep")
#: Where a level-1 sleep keeps a tag's host copy (docs/host-tiers.md), fastest first.
HOST_TIERS = ("pinned", "pageable", "file")


def _check_size(num_bytes: int, what: str, limit: int) -> int:
    """A byte count the core can take (a non-negative integer below ``limit``, the C++ type's range), as an
    int; ValueError otherwise, rather than pybind11's "incompatible function arguments" TypeError."""
    try:
        if isinstance(num_bytes, bool):
            raise TypeError
        value = operator.index(num_bytes)
    except TypeError:
        raise ValueError(f"{what} must be an integer number of bytes, got {num_bytes!r}") from None
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    if value >= limit:
        raise ValueError(f"{what}: {value} bytes is too large (no machine has that much; at most {limit - 1})")
    return value


def _tag_list(tags: Iterable[str] | None, what: str) -> list[str] | None:
    if tags is None:
        return None
    if isinstance(tags, str):
        return [tags]
    out = list(tags)
    for t in out:
        if not isinstance(t, str) or not t:
            raise ValueError(f"{what}: every tag must be a non-empty string, got {t!r}")
    return out


class Allocator:
    """GPU memory that can sleep: tagged allocations whose physical memory can be released and restored
    at the same virtual addresses.

    One allocator per process is the normal use (PyTorch accepts one pluggable allocator per process).
    Tag policies decide what ``sleep(level=1)`` does with each tag:

    * ``"offload"``: copy to pinned host memory, release the GPU memory, restore bit-exact on wake.
      The default for the tag ``"weights"``.
    * ``"discard"``: release the GPU memory without a copy; wake brings back zero-filled memory
      (or undefined contents with ``wake_up(zero_fill=False)``). The default for every other tag.
    * ``"keep"``: stay resident through any sleep. The default for the untagged ``"default"`` tag.

    ``sleep(level=2)`` discards every tag that is not ``"keep"``.

    Thread safety: every method may be called from any thread; calls are serialized by one lock in the
    core. ``sleep`` and ``wake_up`` release the GIL while they run.
    """

    def __init__(
        self,
        *,
        chunk_bytes: int = 0,
        copy_streams: int = 0,
        log_transitions: bool = True,
        verify: str | None = None,
        wait_timeout_seconds: float = 0.0,
        pinned_budget_bytes: int | None = None,
        pageable_budget_bytes: int | None = None,
        file_dir: str | None = None,
        staging_bytes: int = 0,
        simulate: bool = False,
    ) -> None:
        """``chunk_bytes``: largest physical chunk (0: the core's default, 1 GiB, or env
        ``GPUSLEEP_CHUNK_BYTES``). ``copy_streams``: streams per device for host copies (0: default 4).
        ``log_transitions``: log one INFO line per sleep and wake on the ``gpusleep`` logger.
        ``verify``: ``"full"`` (the default, or env ``GPUSLEEP_VERIFY``) proves every restored byte before a
        wake completes and lets a re-sleep of kept host copies copy only what changed; ``"off"`` trusts the
        copies (docs/verified-wakes.md). ``wait_timeout_seconds``: the deadline of every wait for
        the work queued on a device (sleep, free, ``empty_cache``); past it the call raises
        :class:`gpusleep.CudaError` ``CUDA_ERROR_TIMEOUT`` naming the device and changes nothing (0: env
        ``GPUSLEEP_WAIT_TIMEOUT_S`` or 60 s).

        Host tiers (docs/host-tiers.md): ``pinned_budget_bytes`` caps the pinned memory level-1 host copies hold;
        a sleep that would exceed it puts the rest in the next tier (pageable, then file), least recently woken
        tags first, and its report says where everything went. ``pageable_budget_bytes`` caps pageable copies
        the same way. ``file_dir``: a directory on a local disk for the ``"file"`` tier (created 0700 if missing;
        files a killed process left there are deleted now). ``staging_bytes``: one slot of the pinned staging
        ring that pageable and file copies move through (0: 16 MiB).

        ``simulate=True`` (or env ``GPUSLEEP_SIMULATE_GPU=1``) runs this process's gpusleep on the simulated GPU
        (:func:`gpusleep.simulated_gpu.enable`, host memory through the driver double, for trying it without a
        GPU); it must come before anything opens the CUDA driver."""
        if verify is not None and verify not in ("full", "off"):
            raise ValueError(f"verify must be 'full' or 'off', got {verify!r}")
        if wait_timeout_seconds < 0:
            raise ValueError(f"wait_timeout_seconds must be positive, got {wait_timeout_seconds!r}")
        limit = 1 << 63
        pinned_budget = (
            None if pinned_budget_bytes is None else _check_size(pinned_budget_bytes, "pinned_budget_bytes", limit)
        )
        pageable_budget = (
            None
            if pageable_budget_bytes is None
            else _check_size(pageable_budget_bytes, "pageable_budget_bytes", limit)
        )
        staging = _check_size(staging_bytes, "staging_bytes", limit)
        if file_dir is not None and not str(file_dir):
            raise ValueError("file_dir must name a directory (None: no file tier)")
        # The simulated GPU (docs: README, "Five minutes on any machine"): asked for here or by
        # GPUSLEEP_SIMULATE_GPU, it must be in place before the core opens the CUDA driver.
        from . import simulated_gpu

        if simulate or simulated_gpu.requested_by_environment():
            simulated_gpu.enable()
        self._core = _C.Allocator(
            int(chunk_bytes),
            int(copy_streams),
            verify or "",
            float(wait_timeout_seconds),
            pinned_budget,
            pageable_budget,
            "" if file_dir is None else str(file_dir),
            staging,
        )
        self._warned_verify_fallback = False
        self._log_transitions = log_transitions
        self._torch = None  # set by the torch glue (gpusleep.torch_glue.TorchIntegration)
        # The tags set to keep host copies: tag() in pool mode and the compat layers' weight-update paths
        # invalidate their copies (Note [Kept host copies] in csrc/allocator.h) without asking the core first.
        self._kept_copy_tags: set[str] = set()

    # ------------------------------------------------------------------ tags
    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[str]:
        """Tag every allocation made by this thread inside the block with ``name``.

        Nests; the previous tag is restored on exit, exceptions included. In pool mode the block also
        routes PyTorch allocations into the tag's ``torch.cuda.MemPool``; as PyTorch then reuses freed blocks
        of the tag's segments without telling gpusleep, entering a tag that keeps host copies
        (``keep_host_copy``) in pool mode stops trusting them (:meth:`mark_changed`). Entering the tag of a
        sleeping tag raises :class:`gpusleep.SleepStateError`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"tag name must be a non-empty string, got {name!r}")
        if name in self.sleeping_tags:
            from .errors import SleepStateError

            raise SleepStateError(f"tag {name!r} is asleep: call wake_up(tags=[{name!r}]) before allocating from it")
        if name in self._kept_copy_tags and self.mode == "pool":
            self._core.mark_changed(name)
        previous = _C.set_current_tag(name)
        try:
            if self._torch is not None:
                with self._torch.tag_scope(name):
                    yield name
            else:
                yield name
        finally:
            _C.set_current_tag(previous)

    @staticmethod
    def current_tag() -> str:
        """The tag this thread allocates with now (``"default"`` outside any ``tag()`` block)."""
        return _C.current_tag()

    def set_policy(
        self,
        tag: str,
        policy: str,
        *,
        keep_host_copy: bool = False,
        verify_kept_copy: bool = False,
        host_tier: str = "pinned",
    ) -> None:
        """Set what ``sleep(level=1)`` does with ``tag``: ``"offload"``, ``"discard"`` or ``"keep"``.

        ``keep_host_copy`` (offload only): keep the pinned host copy after a wake, so that the next level-1
        sleep of unchanged weights skips the device-to-host copy and only unmaps (a model switch then sleeps
        in milliseconds). Call :meth:`mark_changed` whenever code updates the tag's tensors in place (an RL
        step, ``load_state_dict``, an NCCL broadcast into the parameters); new allocations invalidate the
        copy by themselves (global mode: a new block; pool mode: entering :meth:`tag`).
        ``verify_kept_copy`` also compares four 64 KiB pieces of each segment with the copy before trusting
        it, and copies everything if one differs: a write outside those pieces is not seen. The kept copy
        holds its host memory (``stats().host.bytes_in_use``); :meth:`release_host_memory` drops it.
        ``host_tier`` (offload only): where the level-1 copies go first: ``"pinned"`` (fastest), ``"pageable"``
        (ordinary memory the kernel may swap) or ``"file"`` (needs ``Allocator(file_dir=...)``); a pinned or
        pageable budget moves them further down (docs/host-tiers.md). A kept copy stays in its tier."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if host_tier not in HOST_TIERS:
            raise ValueError(f"host_tier must be one of {HOST_TIERS}, got {host_tier!r}")
        self._core.set_policy(tag, policy, bool(keep_host_copy), bool(verify_kept_copy), host_tier)
        if keep_host_copy:
            self._kept_copy_tags.add(tag)
        else:
            self._kept_copy_tags.discard(tag)

    def read_host_backup(self, address: int, num_bytes: int) -> bytes:
        """The host copy of ``num_bytes`` at device ``address`` while its tag sleeps offloaded (level 1), or
        while it is awake with a kept host copy (``keep_host_copy``; the bytes as the last level-1 sleep
        copied them): read the weights without waking them. ``SleepStateError`` if that memory has no host
        copy now."""
        return self._core.read_host_backup(int(address), int(num_bytes))

    def _flip_host_backup_byte(self, address: int) -> None:
        """Damage the host copy of the byte at ``address`` (asleep, level 1) by flipping its bits; flipping it
        again repairs it. For ``gpusleep doctor`` and tests, to prove on a real GPU that a verified wake
        refuses what it did not restore exactly."""
        self._core.flip_host_backup_byte(int(address))

    def device_chunk_hashes(self, address: int) -> list[int]:
        """The chunk hashes (one 64-bit sum per 4 MiB piece, docs/verified-wakes.md) of the awake allocation
        holding ``address``, computed on its GPU after the work queued so far: what the next level-1 sleep
        keeps with its host copy. ``gpusleep._C.chunk_hash_pieces(data, 4 << 20)`` computes the same on the
        host. ``SleepStateError`` where the hash kernel cannot be loaded."""
        return list(self._core.device_chunk_hashes(int(address)))

    def mark_changed(self, tag: str) -> None:
        """The device bytes of ``tag`` may have changed: its kept host copies (``keep_host_copy``) are not
        trusted any more. With verification on (the default) this is only a hint: the next level-1 sleep
        hashes the tag on the GPU and copies the pieces that changed, hint or not; with it off, the next
        level-1 sleep copies the tag again."""
        self._core.mark_changed(tag)

    def _mark_kept_copies_changed(self, tags: Iterable[str]) -> None:
        """:meth:`mark_changed` for those of ``tags`` that keep host copies (the others have none to
        invalidate); for the compat layers' weight-update paths."""
        for tag in tags:
            if tag in self._kept_copy_tags:
                self._core.mark_changed(tag)

    def policy(self, tag: str) -> str:
        return self._core.policy(tag)

    def set_file_dir(self, directory: str) -> None:
        """The ``"file"`` tier's directory from now on (created 0700 if missing; files a killed process left
        there are deleted). Copies already in files stay where they are."""
        self._core.set_file_dir(str(directory))

    def host_tier(self, tag: str) -> str:
        """Where ``tag``'s level-1 host copies go first (:meth:`set_policy`'s ``host_tier``)."""
        return self._core.host_tier(tag)

    # ------------------------------------------------------------- sleep/wake
    def sleep(
        self, level: int = 1, offload_tags: Sequence[str] | None = None, *, tags: Sequence[str] | None = None
    ) -> SleepReport:
        """Release the GPU memory of every tag whose policy is not ``"keep"``.

        Level 1 copies the ``"offload"`` tags (or exactly ``offload_tags`` when given) to pinned host
        memory first; level 2 copies nothing. ``tags`` puts only those tags to sleep (a ``"keep"`` tag
        too, when named) and leaves the others as they are. Sleeping again at the same level is a no-op;
        a deeper level drops the host copies. The call is a transaction: if any copy fails, nothing is
        released and the error is raised."""
        if level not in (1, 2) or isinstance(level, bool):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        offload = _tag_list(offload_tags, "offload_tags")
        if offload is not None and level == 2:
            raise ValueError("offload_tags applies to level 1 only: level 2 discards every tag")
        only = _tag_list(tags, "tags")
        report = _sleep_report(self._core.sleep(level, offload, only))
        if report.bytes_release_pending:
            log.warning(
                "sleep: the driver refused to release %s of GPU memory; gpusleep keeps it and retries at the "
                "next sleep, wake_up, free, empty_cache or close (%s)",
                format_bytes(report.bytes_release_pending),
                _C.last_teardown_failure() or "see stats()",
            )
        _warn_if_release_falls_short(report)
        if self._log_transitions and report.tags:
            log.info(report.summary())
        return report

    def wake_up(self, tags: Sequence[str] | None = None, *, zero_fill: bool = True) -> WakeReport:
        """Map fresh GPU memory at the same addresses for ``tags`` (all sleeping tags when None) and
        restore offloaded bytes. Discarded memory is zero-filled unless ``zero_fill=False``.

        Waking an awake tag is a no-op; an unknown tag is a ``ValueError``. The call is a transaction:
        if the GPU memory cannot be had, everything this call mapped is released, the tags stay asleep
        with their host copies, and :class:`gpusleep.OutOfMemoryError` says how much was needed. With
        verification on (the default) the restored bytes are proven equal to their host copies before the
        wake completes; if any differ, the wake is rolled back the same way and
        :class:`gpusleep.WakeVerificationError` names the tags and blocks."""
        names = _tag_list(tags, "tags")
        report = _wake_report(self._core.wake_up(names, bool(zero_fill)))
        if self._log_transitions and report.tags:
            log.info(report.summary())
        if report.bytes_verified_by_read_back and not self._warned_verify_fallback:
            self._warned_verify_fallback = True
            log.warning(
                "gpusleep verifies wakes by reading the restored bytes back (twice the PCIe traffic of the wake) "
                "because %s. Allocator(verify='off') or GPUSLEEP_VERIFY=off trusts the copies instead.",
                self._core.stats().verify_fallback_reason or "the chunk hash kernel is not available",
            )
        return report

    def trust_host_copies(self, tags: Sequence[str] | None = None) -> None:
        """Accept the host copies of sleeping ``tags`` (all sleeping tags when None) as they are: forget the
        hashes their sleep took, so that the next :meth:`wake_up` checks only that the restore equals the host
        copy. The way out when :class:`gpusleep.WakeVerificationError` says ``host_copy_damaged`` and those
        bytes are wanted anyway."""
        self._core.trust_host_copies(_tag_list(tags, "tags"))

    def plan_wake(self, tags: Sequence[str] | None = None) -> tuple[WakePlan, ...]:
        """What :meth:`wake_up` with the same ``tags`` would need, per device, against the GPU memory free
        now: a dry run that changes nothing (``plan.fits`` says whether it would find the memory). A
        collective wake checks it on every rank before any rank maps memory."""
        return tuple(_from_core(WakePlan, plan) for plan in self._core.plan_wake(_tag_list(tags, "tags")))

    @property
    def is_sleeping(self) -> bool:
        """True while any tag is asleep."""
        return self._core.is_sleeping()

    @property
    def sleeping_tags(self) -> frozenset[str]:
        return frozenset(self._core.sleeping_tags())

    @property
    def known_tags(self) -> frozenset[str]:
        """Every tag that holds memory or has a policy set."""
        return frozenset(self._core.known_tags())

    # --------------------------------------------------------- host memory
    def reserve_host_memory(self, num_bytes: int | None = None) -> HostMemoryReport:
        """Pin host memory ahead of the first level-1 sleep, so that sleep never pins.

        ``num_bytes`` defaults to what ``sleep(level=1)`` would offload now. The arena only grows, by
        exactly the shortfall."""
        wanted = -1 if num_bytes is None else _check_size(num_bytes, "reserve_host_memory: num_bytes", 2**63)
        report = _host_report(self._core.reserve_host_memory(wanted))
        if self._log_transitions and report.bytes_newly_pinned:
            log.info(
                "reserve_host_memory: pinned %s in %.3f s (%.1f GB/s); %s pinned in all",
                format_bytes(report.bytes_newly_pinned),
                report.pin_seconds,
                report.pin_gbps,
                format_bytes(report.bytes_pinned),
            )
        return report

    def host_bytes_to_pin_for_level1(self) -> int:
        """The host memory ``sleep(level=1)`` would have to pin now: what it offloads, less what kept host
        copies and already pinned free memory hold (what :meth:`reserve_host_memory` would pin)."""
        return self._core.host_bytes_to_pin_for_level1()

    def release_host_memory(self) -> int:
        """Unpin and free the host memory not holding a backup now. Returns the bytes freed."""
        return self._core.release_host_memory()

    def refresh_peer_access(self) -> int:
        """Give the GPUs in use now read-write access to the memory mapped before they were.

        A map grants its own GPU and the peers whose CUDA context is active at that time; a wake grants them
        again, and gpusleep's first allocation on a GPU grants it access to what was mapped before. Call this
        after a GPU comes into use without allocating through gpusleep (pool mode) if it reads gpusleep memory
        before the next wake. Returns how many allocations gained a peer. ``GPUSLEEP_PEER_ACCESS=1`` grants
        every capable peer at each map instead."""
        return self._core.refresh_peer_access()

    # ----------------------------------------------------------- low level
    def allocate(self, size_bytes: int, tag: str | None = None, device: int = 0) -> int:
        """Map ``size_bytes`` of GPU memory at a fresh address under ``tag`` (the current tag when None).
        Returns the device address. ``size_bytes`` may be 0 (a unique address, no memory)."""
        size_bytes = _check_size(size_bytes, "allocate: size_bytes", 2**64)
        return self._core.allocate(size_bytes, tag if tag is not None else _C.current_tag(), int(device))

    def write_device(self, address: int, data: bytes) -> None:
        """Copy ``data`` into awake memory of this allocator at ``address`` and wait for it (through pinned
        staging): for tools and tests without PyTorch. The range must lie inside one allocation."""
        self._core.write_device(int(address), bytes(data))

    def read_device(self, address: int, num_bytes: int) -> bytes:
        """The ``num_bytes`` of awake memory at ``address``, copied to the host synchronously."""
        return self._core.read_device(int(address), _check_size(num_bytes, "read_device: num_bytes", 2**63))

    def free(self, address: int) -> None:
        """Free an allocation made by :meth:`allocate`. Allowed while its tag sleeps (releases the range
        and the host copy). A second free of the same address raises ``ValueError``."""
        self._core.free(int(address))

    def empty_cache(self) -> int:
        """Global mode: return unused cached segments to the driver. Returns the bytes released."""
        return self._core.empty_cache()

    def stats(self) -> AllocatorStats:
        raw = self._core.stats()
        tags = {t.tag: _from_core(TagStats, t) for t in raw.tags}
        return AllocatorStats(
            tags=tags,
            is_sleeping=raw.is_sleeping,
            host=_host_report(raw.host),
            bytes_cached=raw.bytes_cached,
            bytes_release_pending=raw.bytes_release_pending,
            objects_release_pending=raw.objects_release_pending,
            verify=raw.verify,
            verify_fallback_reason=raw.verify_fallback_reason,
            last_sleep=_sleep_report(raw.last_sleep) if raw.has_sleep else None,
            last_wake=_wake_report(raw.last_wake) if raw.has_wake else None,
            counters=dict(raw.counters),
        )

    # --------------------------------------------------------------- torch
    def pluggable(self):
        """Global mode: the ``torch.cuda.memory.CUDAPluggableAllocator`` to pass to
        ``torch.cuda.memory.change_current_allocator`` before any CUDA allocation."""
        from .torch_glue import enable_global_mode

        return enable_global_mode(self)

    def use_mem_pools(self) -> None:
        """Pool mode: from now on ``tag()`` routes PyTorch allocations into a per-(tag, device)
        ``torch.cuda.MemPool`` backed by this allocator; untagged memory keeps PyTorch's allocator."""
        from .torch_glue import enable_pool_mode

        enable_pool_mode(self)

    def mem_pool(self, tag: str, device: int | None = None) -> Any:
        """Pool mode: the ``torch.cuda.MemPool`` that holds ``tag`` on ``device`` (the current CUDA device
        when None), created on first use; e.g. ``torch.cuda.graph(g, pool=alloc.mem_pool("graphs").id)``
        so a CUDA graph's memory sleeps with that tag. For a tag whose policy is not ``"keep"`` this warns
        once per process unless ``NCCL_GRAPH_REGISTER=0`` (NCCL registers graph-captured buffers, and a
        sleep would release memory under that registration: ``docs/torch.md``)."""
        if self._torch is None or self.mode != "pool":
            raise RuntimeError("mem_pool() needs pool mode: call use_mem_pools() first")
        if device is None:
            import torch

            device = torch.cuda.current_device()
        if self.policy(tag) != "keep":
            from .torch_glue import warn_if_nccl_registers_graph_memory

            warn_if_nccl_registers_graph_memory(tag, "Allocator.mem_pool")
        return self._torch.pool_for(tag, int(device))

    @property
    def mode(self) -> str:
        """``"none"``, ``"global"`` or ``"pool"``: how this allocator is plugged into PyTorch."""
        return self._core.mode()

    def close(self) -> None:
        """Free every allocation and all host memory. The allocator is unusable afterwards.

        What the driver refuses to release is kept and reported (``stats().objects_release_pending``,
        and a warning); calling ``close()`` again retries it."""
        self._core.close()
        pending = self._core.stats().objects_release_pending
        if pending:
            log.warning(
                "close: the driver refused to release %d object(s) holding %s of GPU memory; call close() "
                "again to retry",
                pending,
                format_bytes(self._core.stats().bytes_release_pending),
            )

    def __enter__(self) -> Allocator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<gpusleep.Allocator mode={self.mode} sleeping={sorted(self.sleeping_tags)}>"


T = TypeVar("T")


#: A sleep whose measured release falls short of what it released by more than this share (and at least one
#: 2 MiB granule) logs a warning: less than that is within what other processes' allocations move.
RELEASE_SHORTFALL_WARNING_FRACTION = 0.25


def _warn_if_release_falls_short(report: SleepReport) -> None:
    shortfall = report.bytes_freed - report.bytes_freed_measured
    if shortfall > max(report.bytes_freed * RELEASE_SHORTFALL_WARNING_FRACTION, 2 << 20):
        log.warning(
            "sleep: released %s of GPU memory but the device's free memory rose by only %s (measured with "
            "cuMemGetInfo). Something still holds the memory: an NCCL user-buffer or graph registration "
            "(ncclCommRegister, NCCL_GRAPH_REGISTER), a NIC registration or dma-buf export, or a "
            "cuMemRetainAllocationHandle reference; drop them before a sleep (docs/torch.md, 'NIC and NCCL "
            "registrations'). Another process allocating at the same time also lowers the figure.",
            format_bytes(report.bytes_freed),
            format_bytes(report.bytes_freed_measured),
        )


def _from_core(cls: type[T], raw: Any) -> T:
    """The frozen dataclass ``cls`` with each field read from the _C record of the same field names
    (sequences become tuples, as the dataclasses are immutable)."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(raw, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _host_report(raw: Any) -> HostMemoryReport:
    return _from_core(HostMemoryReport, raw)


def _sleep_report(raw: Any) -> SleepReport:
    report = _from_core(SleepReport, raw)
    return dataclasses.replace(report, placements=tuple((p.tag, p.tier, p.bytes) for p in raw.placements))


def _wake_report(raw: Any) -> WakeReport:
    return _from_core(WakeReport, raw)
