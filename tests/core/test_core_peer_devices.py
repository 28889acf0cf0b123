"""Other GPUs and gpusleep memory: which peers are granted access, and that sleep, free and empty_cache wait
for every peer that may still read or write it (review 2026-12-06, findings 2 and 10).

A peer "in use" is one whose primary context is active, whoever made it so: PyTorch initialises the
devices it uses, so a kernel or copy on cuda:1 can read weights on cuda:0 that gpusleep never allocated on
cuda:1. The tests hold a device's context through the harness (``fake.context(d)``) the way PyTorch would.
"""

from __future__ import annotations

import ctypes

import pytest
from helpers import MiB, pattern

import gpusleep
from gpusleep import _C

NON_BLOCKING = 1
LEGACY_STREAM = 0


class QueuedRead:
    """A device-to-host copy queued on a stream of `device` and not yet run: GPU work that still reads."""

    def __init__(self, fake, device: int, address: int, num_bytes: int):
        self.fake, self.num_bytes = fake, num_bytes
        self.host = ctypes.create_string_buffer(num_bytes)
        self.stream = ctypes.c_void_p()
        with fake.context(device):
            assert fake.lib.cuStreamCreate(ctypes.byref(self.stream), NON_BLOCKING) == 0
            assert fake.lib.cuMemcpyDtoHAsync_v2(self.host, address, num_bytes, self.stream) == 0
        self.device = device

    def close(self) -> None:
        with self.fake.context(self.device):
            assert self.fake.lib.cuStreamDestroy_v2(self.stream) == 0


@pytest.mark.parametrize("how", ["sleep", "free"])
def test_releasing_memory_waits_for_a_peer_gpu_that_still_reads_it(fake, how):
    # Defect: only peers whose context gpusleep itself retained were waited for. PyTorch's cuda:1 still
    # read cuda:0's weights when they were unmapped: on a GPU a sticky illegal address (Xid 31).
    size = 8 * MiB + 3
    with fake.context(1):  # PyTorch uses cuda:1; gpusleep allocates on cuda:0 only
        with gpusleep.Allocator() as allocator:
            weights = allocator.allocate(size, tag="weights", device=0)
            fake.write(weights, pattern(size, 1))
            reader = QueuedRead(fake, 1, weights, size)
            if how == "sleep":
                report = allocator.sleep(level=1)
                assert report.bytes_release_pending == 0
                assert allocator.stats().bytes_release_pending == 0
            else:
                allocator.free(weights)
            assert fake.violations() == [], "memory was unmapped under queued work of the peer"
            assert reader.host.raw == pattern(size, 1), "the peer's read ran before the unmap"
            reader.close()
            if how == "sleep":
                allocator.wake_up()
                assert fake.read(weights, size) == pattern(size, 1)


def test_empty_cache_waits_for_a_peer_gpu_that_still_reads_cached_memory(global_mode, fake):
    with fake.context(1):
        previous = _C.set_current_tag(gpusleep.DEFAULT_TAG)
        try:
            address = _C.torch_malloc(3 * MiB, 0, LEGACY_STREAM)
        finally:
            _C.set_current_tag(previous)
        assert address, _C.last_torch_error()
        fake.write(address, pattern(3 * MiB, 6))
        reader = QueuedRead(fake, 1, address, 3 * MiB)
        _C.torch_free(address, 3 * MiB, 0, LEGACY_STREAM)
        assert global_mode.empty_cache() > 0
        assert fake.violations() == []
        assert reader.host.raw == pattern(3 * MiB, 6)
        reader.close()


def test_a_peer_whose_context_is_not_active_gets_no_access(fake):
    # Defect: every P2P-capable GPU was granted access, including GPUs the process never used: 8x the
    # page-table work per map and unmap on an 8-GPU box, and a full peer failed this process's allocation.
    with gpusleep.Allocator() as allocator:
        weights = allocator.allocate(MiB, tag="weights", device=0)
        assert fake.access(weights, device=0) == "readwrite"
        assert fake.access(weights, device=1) == "none"
        allocator.sleep(level=1)
        allocator.wake_up()
        assert fake.access(weights, device=1) == "none"
    assert fake.primary_context_retain_calls(1) == 0, "device 1 was never touched"


def test_a_peer_in_use_is_granted_access_at_map_time(fake):
    with fake.context(1):
        with gpusleep.Allocator() as allocator:
            weights = allocator.allocate(MiB + 7, tag="weights", device=0)
            assert fake.access(weights, device=1) == "readwrite"
            fake.write(weights, pattern(MiB + 7, 2))
            assert fake.primary_context_retain_calls(1) == 0, "a query of the peer's state creates nothing"


def test_a_peer_that_comes_into_use_later_is_granted_at_wake_and_on_request(fake):
    with gpusleep.Allocator() as allocator:
        weights = allocator.allocate(MiB, tag="weights", device=0)
        fake.write(weights, pattern(MiB, 3))
        with fake.context(1):  # the server starts using cuda:1 after the weights were loaded
            assert fake.access(weights, device=1) == "none"
            assert allocator.refresh_peer_access() == 1, "one mapped allocation was granted to the new peer"
            assert fake.access(weights, device=1) == "readwrite"
            assert allocator.refresh_peer_access() == 0, "nothing new the second time"
        allocator.sleep(level=1)
        allocator.wake_up()
        assert fake.access(weights, device=1) == "none", "a wake grants the peers in use at that time"
        with fake.context(1):
            allocator.sleep(level=1)
            allocator.wake_up()
            assert fake.access(weights, device=1) == "readwrite"
            assert fake.read(weights, MiB) == pattern(MiB, 3)


def test_first_use_of_a_device_grants_it_access_to_memory_mapped_before(fake):
    with gpusleep.Allocator() as allocator:
        weights = allocator.allocate(MiB, tag="weights", device=0)
        fake.write(weights, pattern(MiB, 4))
        scratch = allocator.allocate(MiB, tag="default", device=1)  # gpusleep's first allocation on cuda:1
        assert fake.access(weights, device=1) == "readwrite"
        fake.copy_device_to_device(scratch, weights, MiB, device=1)
        assert fake.read(scratch, MiB, device=1) == pattern(MiB, 4)


def test_peer_access_can_be_forced_for_every_capable_peer(fake, monkeypatch):
    monkeypatch.setenv("GPUSLEEP_PEER_ACCESS", "1")
    with gpusleep.Allocator() as allocator:
        weights = allocator.allocate(MiB, tag="weights", device=0)
        assert fake.access(weights, device=1) == "readwrite"
    assert fake.primary_context_retain_calls(1) == 0


@pytest.mark.parametrize("error", [2, 999], ids=["out_of_memory", "unknown"])
def test_a_peer_that_refuses_its_grant_is_skipped_not_fatal(fake, error):
    # Defect: an out-of-memory from a peer (nearly full: another tenant at 99%) failed this process's
    # allocation as "out of memory on device 0".
    with fake.context(1):
        with gpusleep.Allocator() as allocator:
            fake.inject_fault("cuMemSetAccess", nth=1, error=error)  # the grant naming owner and peer,
            fake.inject_fault("cuMemSetAccess", nth=3, error=error)  # and, after the owner's alone, the peer's
            weights = allocator.allocate(MiB, tag="weights", device=0)
            fake.write(weights, pattern(MiB, 5))
            assert fake.read(weights, MiB) == pattern(MiB, 5), "the owner can use its memory"
            assert fake.access(weights, device=1) == "none"
            assert dict(allocator.stats().counters).get("peer_grants_refused") == 1
            allocator.sleep(level=1)
            allocator.wake_up()  # the peer is granted again at the next map
            assert fake.access(weights, device=1) == "readwrite"
            assert fake.read(weights, MiB) == pattern(MiB, 5)


def test_an_owner_that_runs_out_of_memory_for_its_own_grant_fails_the_allocation(fake):
    with gpusleep.Allocator() as allocator:
        fake.inject_fault("cuMemSetAccess", nth=1, error=2)  # device 1 is not in use: the owner's own grant
        with pytest.raises(gpusleep.OutOfMemoryError):
            allocator.allocate(MiB, tag="weights", device=0)
        assert fake.used_bytes(0) == 0
