"""Refused drains and refused releases (issue 19, found by an adversarial campaign).

A copy stream that cannot be drained may still read or write the memory its queued copies name; a release
the driver refuses keeps the object (and its memory) alive. These tests inject such refusals on the driver
double and check what a GPU would see: no queued work ever meets unmapped memory or reused host memory
(the double records a violation, and the `fake` fixture fails on any), the bytes reported freed or
pending equal what the double holds, refused objects are retried until they go, and every refusal is
counted once.
"""

from __future__ import annotations

import pytest
from helpers import MiB, assert_blobs_intact, pattern, write_blobs
from helpers import torch_malloc as _malloc

import gpusleep
from gpusleep import _C

UNKNOWN = 999
OUT_OF_MEMORY = 2
LEGACY_STREAM = 0
COPY_STREAMS = 4


def _refuse_stream_syncs(fake, count=2 * COPY_STREAMS):
    """The next `count` cuStreamSynchronize calls fail: every copy stream refuses two drains in a row."""
    for nth in range(1, count + 1):
        fake.inject_fault("cuStreamSynchronize", nth=nth, error=UNKNOWN)


# 1. A failed wake whose rollback cannot drain its copy streams ------------------------------------------


@pytest.mark.parametrize("function, error", [("cuMemMap", UNKNOWN), ("cuMemCreate", OUT_OF_MEMORY)])
def test_a_failed_wake_that_cannot_drain_its_zero_fill_keeps_that_memory_mapped(fake, function, error):
    # Defect: the rollback ignored a refused drain and unmapped a segment whose zero fill was still queued
    # (on a GPU, a memset into unmapped memory: a sticky illegal address).
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator(chunk_bytes=g, copy_streams=COPY_STREAMS)
    try:
        first = allocator.allocate(g, tag="kv_cache")
        second = allocator.allocate(g, tag="kv_cache")
        allocator.sleep(level=1)  # kv_cache is discarded
        fake.inject_fault(function, nth=2, error=error)  # the second segment's memory
        _refuse_stream_syncs(fake)
        with pytest.raises((gpusleep.CudaError, MemoryError)):
            allocator.wake_up()
        fake.clear_faults()
        assert fake.violations() == []
        assert allocator.sleeping_tags == {"kv_cache"}
        # The first segment's memory is still mapped for the queued fill, owned and reported pending.
        assert allocator.stats().bytes_release_pending == fake.used_bytes(0) == g

        allocator.wake_up()
        assert fake.violations() == []
        assert not allocator.is_sleeping
        assert allocator.stats().bytes_release_pending == 0
        assert fake.used_bytes(0) == 2 * g
        assert fake.read(first, g) == bytes(g) and fake.read(second, g) == bytes(g)
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


@pytest.mark.parametrize("function, error", [("cuMemMap", UNKNOWN), ("cuMemCreate", OUT_OF_MEMORY)])
def test_a_failed_wake_that_cannot_drain_its_restore_keeps_that_memory_mapped(fake, function, error):
    # Defect: the same for restores: both Segment::map's own cleanup (a chunk of the failing segment whose
    # copy is queued) and the wake's rollback (a segment restored before) unmapped memory that a queued
    # host->device copy still writes.
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator(chunk_bytes=g, copy_streams=COPY_STREAMS)
    try:
        blobs = write_blobs(allocator, fake, [g + 5, 2 * g], seed=19)  # 2 + 2 chunks
        used = fake.used_bytes(0)
        allocator.sleep(level=1)
        fake.inject_fault(function, nth=4, error=error)  # the last chunk of the second segment
        _refuse_stream_syncs(fake)
        with pytest.raises((gpusleep.CudaError, MemoryError)):
            allocator.wake_up()
        fake.clear_faults()
        assert fake.violations() == []
        assert allocator.sleeping_tags == {"weights"}
        assert allocator.stats().bytes_release_pending == fake.used_bytes(0) > 0
        for address, data in blobs.items():  # the host copies the queued restores read stay owned
            assert allocator._core.read_host_backup(address, len(data)) == data

        allocator.wake_up()
        assert fake.violations() == []
        assert allocator.stats().bytes_release_pending == 0
        assert fake.used_bytes(0) == used
        assert_blobs_intact(fake, blobs)
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


def test_a_free_while_a_failed_wake_is_undrained_waits_for_the_device(fake):
    # The host copy of an asleep segment may still be read by a queued restore: freeing the segment must not
    # hand that host memory out again before the device has drained (or must fail and keep it).
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator(chunk_bytes=g, copy_streams=COPY_STREAMS)
    try:
        blobs = write_blobs(allocator, fake, [2 * g], seed=23)
        ((address, data),) = blobs.items()
        allocator.sleep(level=1)
        fake.inject_fault("cuMemMap", nth=2, error=UNKNOWN)
        _refuse_stream_syncs(fake)
        with pytest.raises(gpusleep.CudaError):
            allocator.wake_up()
        fake.clear_faults()
        allocator.free(address)  # drains the device first, then releases everything
        assert fake.violations() == []
        assert allocator.stats().bytes_release_pending == 0
        assert fake.used_bytes(0) == 0
        allocator.set_policy("other", "offload")
        other = write_blobs(allocator, fake, [2 * g], seed=24, tag="other")
        allocator.sleep(level=1)
        allocator.wake_up()
        assert_blobs_intact(fake, other)
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


# 2. The verify scratch of a kept host copy ----------------------------------------------------------------


def test_verify_scratch_whose_copies_could_not_be_drained_is_never_handed_out_again(fake, monkeypatch):
    # Defect: after refused stream syncs, kept_copy_matches gave its scratch back to the host arena while
    # device->host copies into it were still queued; the next backup carved from it was overwritten by them.
    monkeypatch.setenv("GPUSLEEP_PEER_ACCESS", "0")  # a sleep on device 1 then waits for device 1 only
    allocator = gpusleep.Allocator(copy_streams=COPY_STREAMS)
    try:
        allocator.set_policy("weights", "offload", keep_host_copy=True, verify_kept_copy=True)
        kept = write_blobs(allocator, fake, [MiB], seed=31)  # verified in four 64 KiB pieces, one per stream
        allocator.sleep(level=1)
        allocator.wake_up()  # the host copy is kept

        _refuse_stream_syncs(fake)
        with pytest.raises(gpusleep.CudaError):
            allocator.sleep(level=1, tags=["weights"])
        fake.clear_faults()
        assert not allocator.is_sleeping

        allocator.set_policy("other", "offload")
        other_address = allocator.allocate(256 * 1024, tag="other", device=1)
        other = pattern(256 * 1024, 32)
        fake.write(other_address, other, device=1)
        allocator.sleep(level=1, tags=["other"])  # its backup must not be the old scratch
        allocator.sleep(level=1, tags=["weights"])  # waits for device 0: the queued verify copies run now
        allocator.wake_up()
        assert fake.read(other_address, len(other), device=1) == other
        assert_blobs_intact(fake, kept)
        assert fake.violations() == []
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


# 3. Refused releases of cached global-mode segments -------------------------------------------------------


@pytest.mark.parametrize("function", ["cuMemRelease", "cuMemUnmap"])
def test_a_refused_release_of_a_cached_segment_is_not_reported_freed_by_sleep(global_mode, fake, function):
    # Defect: release_cached added the segment's physical bytes whether or not the driver released them.
    ptr = _malloc("default", 8 * MiB)
    _C.torch_free(ptr, 8 * MiB, 0, LEGACY_STREAM)
    global_mode.set_policy("default", "discard")
    used = fake.used_bytes(0)
    assert used > 0
    fake.inject_fault(function, nth=1, error=UNKNOWN)
    report = global_mode.sleep(level=1)
    fake.clear_faults()
    assert report.bytes_freed == used - fake.used_bytes(0) == 0
    assert report.bytes_release_pending == global_mode.stats().bytes_release_pending == fake.used_bytes(0) == used
    global_mode.wake_up()  # retries the release
    assert global_mode.stats().bytes_release_pending == 0
    assert fake.used_bytes(0) == 0


@pytest.mark.parametrize("function", ["cuMemRelease", "cuMemUnmap"])
def test_empty_cache_returns_only_the_bytes_the_driver_released(global_mode, fake, function):
    sizes = [8 * MiB, 24 * MiB]  # two segments: a shared 20 MiB one and a large one of its own
    ptrs = [_malloc("default", size) for size in sizes]
    for ptr, size in zip(ptrs, sizes, strict=False):
        _C.torch_free(ptr, size, 0, LEGACY_STREAM)
    used = fake.used_bytes(0)
    # The first segment's release is refused; the second one, in the same batch (Note [Batched release]), is not.
    fake.inject_fault(function, nth=1, error=UNKNOWN)
    freed = global_mode.empty_cache()
    fake.clear_faults()
    assert freed == used - fake.used_bytes(0)
    assert 0 < freed < used
    pending = global_mode.stats().bytes_release_pending
    assert pending == fake.used_bytes(0) == used - freed
    # The retry releases the rest: it leaves bytes_release_pending; empty_cache() released no segment now.
    assert global_mode.empty_cache() == 0
    assert fake.used_bytes(0) == 0
    assert global_mode.stats().bytes_release_pending == 0


# 4. Chunks held behind a refused unmap --------------------------------------------------------------------


def test_a_refused_unmap_in_sleep_reports_every_chunk_pending(fake):
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator(chunk_bytes=g, verify="off")  # the first unmap is the segment's
    try:
        blobs = write_blobs(allocator, fake, [3 * g], seed=41)  # three chunks, one mapping
        used = fake.used_bytes(0)
        fake.inject_fault("cuMemUnmap", nth=1, error=UNKNOWN)
        report = allocator.sleep(level=1)
        fake.clear_faults()
        assert report.bytes_freed == 0
        assert report.bytes_release_pending == allocator.stats().bytes_release_pending == fake.used_bytes(0) == used
        allocator.wake_up()  # the retry frees the old memory; new memory is mapped
        assert allocator.stats().bytes_release_pending == 0
        assert fake.used_bytes(0) == used
        assert_blobs_intact(fake, blobs)
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


def test_a_refused_unmap_after_a_failed_map_keeps_its_chunks_pending(fake):
    # Defect: Segment::map's cleanup released the chunks of a mapping the driver refused to undo; the
    # driver frees such a chunk only at the unmap, yet it left the queue and bytes_release_pending at once.
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator(chunk_bytes=g)
    try:
        allocator.allocate(3 * g, tag="kv_cache")
        allocator.sleep(level=1)
        fake.inject_fault("cuMemMap", nth=3, error=UNKNOWN)  # two chunks are mapped when the third fails
        fake.inject_fault("cuMemUnmap", nth=1, error=UNKNOWN)
        with pytest.raises(gpusleep.CudaError):
            allocator.wake_up()
        fake.clear_faults()
        assert allocator.sleeping_tags == {"kv_cache"}
        assert allocator.stats().bytes_release_pending == fake.used_bytes(0) == 2 * g
        allocator.wake_up()
        assert allocator.stats().bytes_release_pending == 0
        assert fake.used_bytes(0) == 3 * g
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


def test_a_refused_unmap_while_allocating_keeps_its_chunks_and_range_pending(fake):
    # The same in a new segment's constructor; its address range waits for the mapping inside it instead
    # of a cuMemAddressFree that must fail (and would count as a second refusal).
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator(chunk_bytes=g)
    try:
        allocator.free(allocator.allocate(g, tag="weights"))  # the context exists
        fake.inject_fault("cuMemMap", nth=2, error=UNKNOWN)
        fake.inject_fault("cuMemUnmap", nth=1, error=UNKNOWN)
        with pytest.raises(gpusleep.CudaError):
            allocator.allocate(2 * g, tag="weights")
        fake.clear_faults()
        stats = allocator.stats()
        assert stats.bytes_release_pending == fake.used_bytes(0) == g
        assert stats.counters["release_refused"] == 1
        allocator.free(allocator.allocate(g, tag="weights"))  # the free retries: everything goes
        assert allocator.stats().objects_release_pending == 0
        assert fake.used_bytes(0) == 0
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


@pytest.mark.parametrize("function", ["cuCtxGetCurrent", "cuCtxSetCurrent"])
def test_memory_given_up_without_a_context_is_pending_but_no_refusal(fake, function):
    # give_up_physical: when no context can be made current nothing is tried, so nothing was refused.
    allocator = gpusleep.Allocator()
    try:
        for device in (0, 1):
            allocator.allocate(2 * MiB, tag="weights", device=device)
        for nth in range(1, 40):
            fake.inject_fault(function, nth=nth, error=UNKNOWN)
            try:
                allocator.sleep(level=1)
            except gpusleep.CudaError:
                fake.clear_faults()
                continue
            fake.clear_faults()
            stats = allocator.stats()
            assert stats.counters["release_refused"] == 0, f"fault at call {nth}: nothing was refused"
            assert stats.bytes_release_pending == fake.used_bytes(0) + fake.used_bytes(1)
            allocator.wake_up()
        assert fake.violations() == []
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


# 5. Contexts refused at close, and counting refusals -------------------------------------------------------


def test_a_refused_context_release_at_close_is_kept_and_retried_by_the_next_close(fake):
    # Defect: the refused cuDevicePrimaryCtxRelease was noted and forgotten: the context stayed retained for
    # the life of the process, unreported, and a second close() did not retry it.
    allocator = gpusleep.Allocator()
    allocator.allocate(2 * MiB, tag="weights")
    fake.inject_fault("cuDevicePrimaryCtxRelease_v2", nth=1, error=UNKNOWN)
    allocator.close()
    fake.clear_faults()
    stats = allocator.stats()
    assert fake.primary_context_retains(0) == 1
    assert stats.objects_release_pending == 1
    assert stats.counters["release_refused"] == 1
    allocator.close()
    assert fake.primary_context_retains(0) == 0
    assert allocator.stats().objects_release_pending == 0
    assert fake.live_object_count() == 0, fake.live_objects()


def test_release_refused_counts_every_refusal_once(fake):
    # Defect: refusals during retries were not counted, and a cuMemAddressFree tried while a refused mapping
    # still lay inside the range was counted although it could not succeed (and no fault refused it).
    allocator = gpusleep.Allocator(verify="off")  # each refusal below hits the segment's own call
    refusals = 0

    def refuse(function):
        nonlocal refusals
        fake.inject_fault(function, nth=1, error=UNKNOWN)
        refusals += 1

    def counted():
        return allocator.stats().counters["release_refused"]

    weights = write_blobs(allocator, fake, [3 * MiB], seed=51)
    refuse("cuMemUnmap")
    allocator.sleep(level=1)
    assert counted() == refusals
    refuse("cuMemUnmap")  # the retry at the start of the wake is refused too
    with pytest.raises(gpusleep.CudaError):
        allocator.wake_up()
    assert counted() == refusals
    refuse("cuMemRelease")  # the retry unmaps, then a chunk is refused; the wake goes on
    allocator.wake_up()
    assert counted() == refusals
    assert_blobs_intact(fake, weights)

    kv = allocator.allocate(2 * MiB, tag="kv_cache")
    refuse("cuMemUnmap")  # a free whose unmap is refused: the range waits, untried
    allocator.free(kv)
    assert counted() == refusals
    refuse("cuMemAddressFree")  # the retry of the free's range, at the next free
    allocator.free(allocator.allocate(2 * MiB, tag="kv_cache"))
    assert counted() == refusals
    refuse("cuDevicePrimaryCtxRelease_v2")
    allocator.close()
    assert counted() == refusals
    assert allocator.stats().objects_release_pending == 1
    allocator.close()
    assert counted() == refusals
    assert allocator.stats().objects_release_pending == 0
    fake.clear_faults()
    assert fake.primary_context_retains(0) == 0
    assert fake.live_object_count() == 0, fake.live_objects()
