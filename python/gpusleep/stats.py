"""Typed, immutable statistics returned by :meth:`gpusleep.Allocator.stats` and by sleep/wake calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["format_bytes", "TagStats", "SleepReport", "WakeReport", "WakePlan", "HostMemoryReport", "AllocatorStats"]

GIB = 1024**3


def _gbps(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / 1e9 if seconds > 0 else 0.0


def format_bytes(num_bytes: int) -> str:
    """``16.00 GiB``, ``3.50 MiB``, ``512 B``: the unit that keeps the figure readable."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


@dataclass(frozen=True)
class TagStats:
    """What one tag holds right now, over all devices."""

    tag: str
    policy: str  #: "offload", "discard" or "keep": what a level-1 sleep does with the tag
    is_sleeping: bool
    allocations: int  #: live allocations (segments handed out, or arena blocks in global mode)
    bytes_reserved: int  #: virtual address space held, bytes (rounded to the granularity)
    bytes_mapped: int  #: physical GPU memory mapped now, bytes
    bytes_asleep: int  #: bytes whose physical memory is released while the tag sleeps
    bytes_backed_up: (
        int  #: bytes held in host copies for this tag (every tier: bytes_pinned + bytes_pageable + bytes_file)
    )
    last_sleep_seconds: float  #: duration of the last sleep that touched this tag (0 if never)
    last_wake_seconds: float  #: duration of the last wake-up that touched this tag (0 if never)
    host_tier: str = "pinned"  #: where its level-1 copies go first: "pinned", "pageable" or "file" (docs/host-tiers.md)
    bytes_pinned: int = 0  #: its host copies in pinned memory
    bytes_pageable: int = 0  #: its host copies in pageable memory
    bytes_file: int = 0  #: its host copies in files


@dataclass(frozen=True)
class SleepReport:
    """The outcome of one :meth:`~gpusleep.Allocator.sleep` call."""

    level: int
    tags: tuple[str, ...]  #: tags put to sleep (or deepened) by this call
    bytes_offloaded: int  #: bytes copied device -> host
    bytes_reused: int  #: bytes offloaded without a copy: their kept host copy still held them
    #: pieces (4 MiB) of kept host copies whose chunk hash changed since the copy was made, copied again
    pieces_changed: int
    bytes_hashed: int  #: bytes hashed on the GPU to take or check their chunk hashes (verified wakes)
    bytes_discarded: int  #: bytes released without a copy
    bytes_freed: int  #: physical GPU memory returned to the driver
    bytes_release_pending: int  #: GPU memory the driver refused to release now; retried by later calls
    #: how much the free GPU memory (cuMemGetInfo) rose over the call, on the devices whose memory went to
    #: sleep: below bytes_freed when something else (an NCCL or NIC registration) still holds the memory
    bytes_freed_measured: int
    seconds: float  #: wall time of the whole call
    copy_seconds: float  #: time spent in device -> host copies
    verify_seconds: float  #: time spent hashing on the GPU before the copies
    host_pin_seconds: float  #: time spent pinning host memory inside this call (0 when reserved ahead)
    #: host tiers (docs/host-tiers.md): bytes of the host copies this sleep left in each tier
    bytes_pinned_tier: int = 0
    bytes_pageable_tier: int = 0
    bytes_file_tier: int = 0
    #: where each tag's copies went: ``(tag, tier, bytes)`` per tag and tier
    placements: tuple[tuple[str, str, int], ...] = ()

    @property
    def offload_gbps(self) -> float:
        """Offload bandwidth in GB/s (1e9 bytes per second) over the copy phase."""
        return _gbps(self.bytes_offloaded, self.copy_seconds)

    def summary(self) -> str:
        pending = (
            f" ({format_bytes(self.bytes_release_pending)} refused by the driver, release pending)"
            if self.bytes_release_pending
            else ""
        )
        return (
            f"sleep(level={self.level}): offloaded {format_bytes(self.bytes_offloaded)} in "
            f"{self.copy_seconds:.3f} s ({self.offload_gbps:.1f} GB/s)"
            + (f", reused kept host copies of {format_bytes(self.bytes_reused)}" if self.bytes_reused else "")
            + (f" ({self.pieces_changed} changed piece(s) copied again)" if self.pieces_changed else "")
            + ", discarded "
            f"{format_bytes(self.bytes_discarded)}, GPU memory freed {format_bytes(self.bytes_freed)}{pending} "
            f"(measured {format_bytes(self.bytes_freed_measured)}) in {self.seconds:.3f} s"
        )


@dataclass(frozen=True)
class WakeReport:
    """The outcome of one :meth:`~gpusleep.Allocator.wake_up` call."""

    tags: tuple[str, ...]  #: tags woken by this call
    bytes_restored: int  #: bytes copied host -> device
    bytes_zeroed: int  #: discarded bytes filled with zeros
    bytes_mapped: int  #: physical GPU memory created and mapped
    #: restored bytes proven equal to their host copy by the chunk hash on the GPU before the wake completed
    bytes_verified_by_hash: int
    #: restored bytes proven equal by reading them back (where the hash kernel could not be loaded)
    bytes_verified_by_read_back: int
    seconds: float
    copy_seconds: float  #: time spent mapping and copying host -> device (overlapped)
    verify_seconds: float  #: time spent proving the restored bytes (after the copies)

    @property
    def bytes_verified(self) -> int:
        return self.bytes_verified_by_hash + self.bytes_verified_by_read_back

    @property
    def restore_gbps(self) -> float:
        return _gbps(self.bytes_restored, self.copy_seconds)

    def summary(self) -> str:
        return (
            f"wake_up(tags={list(self.tags)}): restored {format_bytes(self.bytes_restored)} in "
            f"{self.copy_seconds:.3f} s ({self.restore_gbps:.1f} GB/s), zero-filled "
            f"{format_bytes(self.bytes_zeroed)}, GPU memory mapped {format_bytes(self.bytes_mapped)}"
            + (
                f", verified {format_bytes(self.bytes_verified)} in {self.verify_seconds:.3f} s"
                if self.bytes_verified
                else ""
            )
            + f" in {self.seconds:.3f} s"
        )


@dataclass(frozen=True)
class WakePlan:
    """:meth:`~gpusleep.Allocator.plan_wake`: one device's figures for a wake that has not happened."""

    device: int
    bytes_needed: int  #: GPU memory the wake would map on the device
    bytes_free: int  #: what cuMemGetInfo reports free there now
    bytes_reclaimable: int  #: unused cached global-mode segments the wake would give back first

    @property
    def fits(self) -> bool:
        """Whether the wake would find the memory now (another tenant may still take it before the wake)."""
        return self.bytes_needed <= self.bytes_free + self.bytes_reclaimable


@dataclass(frozen=True)
class HostMemoryReport:
    """Pinned host memory held for level-1 backups."""

    bytes_pinned: int  #: pinned host memory held now
    bytes_in_use: int  #: part of it holding backups now
    bytes_newly_pinned: int  #: pinned by the call that returned this report
    pin_seconds: float  #: time that call spent pinning
    numa_node: int = -1  #: host NUMA node the pinned memory sits on (nearest the GPU), -1 if not placed
    bytes_pageable: int = 0  #: held by pageable host copies (docs/host-tiers.md)
    bytes_file: int = 0  #: held by host copies in files
    bytes_staging: int = 0  #: pinned by the staging rings of the pageable and file tiers (not in bytes_pinned)
    pinned_budget_bytes: int | None = None  #: the most pinned memory level-1 copies may hold (None: no limit)
    pageable_budget_bytes: int | None = None  #: the most pageable memory they may hold (None: no limit)
    file_dir: str = ""  #: the file tier's directory ("" when there is no file tier)

    @property
    def pin_gbps(self) -> float:
        return _gbps(self.bytes_newly_pinned, self.pin_seconds)


@dataclass(frozen=True)
class AllocatorStats:
    """A snapshot of the allocator: per-tag figures plus the last sleep and wake."""

    tags: Mapping[str, TagStats]
    is_sleeping: bool
    host: HostMemoryReport
    bytes_cached: int  #: global mode: mapped bytes held in free arena blocks
    bytes_release_pending: int = 0  #: GPU memory held by driver objects the driver refused to release
    objects_release_pending: int = 0  #: those objects (mappings, chunks, ranges); every later call retries them
    verify: str = "full"  #: "full": every wake proves its restored bytes; "off"
    #: why a device verifies by reading back (the hash kernel could not be loaded); "" while none does
    verify_fallback_reason: str = ""
    last_sleep: SleepReport | None = None
    last_wake: WakeReport | None = None
    counters: Mapping[str, int] = field(default_factory=dict)  #: driver calls and allocator events by name

    @property
    def bytes_mapped(self) -> int:
        return sum(t.bytes_mapped for t in self.tags.values())

    @property
    def bytes_asleep(self) -> int:
        return sum(t.bytes_asleep for t in self.tags.values())

    @property
    def bytes_backed_up(self) -> int:
        return sum(t.bytes_backed_up for t in self.tags.values())
