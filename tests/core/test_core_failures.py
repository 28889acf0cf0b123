"""Failures: out of memory on wake, injected map/create/copy faults. Sleep and wake are transactions."""

from __future__ import annotations

import pytest
from helpers import MiB, assert_blobs_intact, pattern, write_blobs

import gpusleep


def test_wake_that_cannot_fit_raises_memory_error_and_stays_asleep(alloc, fake):
    size = 6 * MiB
    weights = alloc.allocate(size, tag="weights")
    fake.write(weights, pattern(size, 1))
    alloc.sleep(level=1)
    needed = alloc.stats().tags["weights"].bytes_asleep

    fake.set_foreign_load(0, fake.free_bytes(0) - needed // 2)  # someone took the GPU memory meanwhile
    with pytest.raises(MemoryError) as info:
        alloc.wake_up()
    error = info.value
    assert isinstance(error, gpusleep.OutOfMemoryError)
    assert error.bytes_needed == needed
    assert error.bytes_free < needed
    assert error.device == 0
    assert "needs" in str(error) and "free" in str(error) and "host copies are intact" in str(error)
    assert alloc.is_sleeping and alloc.sleeping_tags == {"weights"}
    assert alloc.stats().tags["weights"].bytes_backed_up == size
    assert fake.used_bytes(0) == 0

    fake.set_foreign_load(0, 0)
    alloc.wake_up()
    assert fake.read(weights, size) == pattern(size, 1)


def test_capacity_reduced_while_asleep_then_restored(alloc, fake):
    size = 3 * fake.granularity_bytes
    weights = alloc.allocate(size, tag="weights")
    fake.write(weights, pattern(size, 2))
    alloc.sleep(level=1)
    fake.set_capacity(0, fake.granularity_bytes)
    with pytest.raises(gpusleep.OutOfMemoryError):
        alloc.wake_up()
    assert alloc.is_sleeping
    fake.set_capacity(0, 1 << 30)
    alloc.wake_up()
    assert fake.read(weights, size) == pattern(size, 2)


@pytest.mark.parametrize("function, nth", [("cuMemMap", 3), ("cuMemCreate", 4), ("cuMemSetAccess", 2)])
def test_failure_in_the_middle_of_wake_rolls_back_everything_it_mapped(fake, function, nth):
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator(chunk_bytes=g)
    try:
        blobs = write_blobs(allocator, fake, [2 * g] * 3, seed=10)
        allocator.sleep(level=1)
        fake.inject_fault(function, nth=nth, error=2)
        with pytest.raises(MemoryError):
            allocator.wake_up()
        assert fake.used_bytes(0) == 0, "everything this call created was released"
        assert allocator.sleeping_tags == {"weights"}
        assert allocator.stats().bytes_backed_up == 6 * g
        fake.clear_faults()
        allocator.wake_up()
        assert_blobs_intact(fake, blobs)
    finally:
        allocator.close()


def test_non_memory_driver_failure_during_wake_is_a_cuda_error_and_rolls_back(alloc, fake):
    size = 2 * MiB
    weights = alloc.allocate(size, tag="weights")
    fake.write(weights, pattern(size, 3))
    alloc.sleep(level=1)
    fake.inject_fault("cuMemcpyHtoDAsync_v2", nth=1, error=1)  # CUDA_ERROR_INVALID_VALUE
    with pytest.raises(gpusleep.CudaError) as info:
        alloc.wake_up()
    assert info.value.name == "CUDA_ERROR_INVALID_VALUE" and info.value.code == 1
    assert "cuMemcpyHtoDAsync" in str(info.value)
    assert alloc.is_sleeping and fake.used_bytes(0) == 0
    fake.clear_faults()
    alloc.wake_up()
    assert fake.read(weights, size) == pattern(size, 3)


def test_copy_failure_during_sleep_changes_nothing(fake):
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator()
    try:
        blobs = write_blobs(allocator, fake, [g + 100] * 3, seed=20)
        used = fake.used_bytes(0)
        fake.inject_fault("cuMemcpyDtoHAsync_v2", nth=2, error=1)
        with pytest.raises(gpusleep.CudaError):
            allocator.sleep(level=1)
        assert not allocator.is_sleeping
        assert fake.used_bytes(0) == used, "nothing was unmapped"
        assert allocator.stats().host.bytes_in_use == 0, "host extents were returned"
        assert_blobs_intact(fake, blobs)
        fake.clear_faults()
        allocator.sleep(level=1)
        allocator.wake_up()
        assert_blobs_intact(fake, blobs)
    finally:
        allocator.close()


@pytest.mark.parametrize("numa_node, pin_call", [(-1, "cuMemHostAlloc"), (0, "cuMemHostRegister_v2")])
def test_pinning_failure_during_sleep_changes_nothing(alloc, fake, numa_node, pin_call):
    fake.set_host_numa_id(0, numa_node)
    size = 2 * MiB
    weights = alloc.allocate(size, tag="weights")
    fake.write(weights, pattern(size, 4))
    fake.inject_fault(pin_call, nth=1, error=2)
    with pytest.raises(MemoryError, match="pinned host memory"):
        alloc.sleep(level=1)
    assert not alloc.is_sleeping
    assert fake.read(weights, size) == pattern(size, 4)


def test_out_of_memory_on_allocate(alloc, fake):
    with pytest.raises(gpusleep.OutOfMemoryError) as info:
        alloc.allocate(2 << 30, tag="weights")
    assert info.value.bytes_needed == 2 << 30
    assert 0 < info.value.bytes_free < 2 << 30
    assert "CUDA_ERROR_OUT_OF_MEMORY" in str(info.value)
    assert fake.used_bytes(0) == 0


def test_wake_copies_each_chunk_as_soon_as_it_is_mapped_and_drains_them_on_failure(fake):
    g = fake.granularity_bytes
    allocator = gpusleep.Allocator(chunk_bytes=g)
    try:
        size = 5 * g - 3
        address = allocator.allocate(size, tag="weights")
        fake.write(address, pattern(size, 40))
        allocator.sleep(level=1)
        copies = fake.call_count("cuMemcpyHtoDAsync_v2")
        fake.inject_fault("cuMemCreate", nth=3, error=2)
        with pytest.raises(MemoryError):
            allocator.wake_up()
        assert fake.call_count("cuMemcpyHtoDAsync_v2") > copies, "chunks 1 and 2 were already being copied"
        assert fake.used_bytes(0) == 0 and allocator.is_sleeping
        fake.clear_faults()
        report = allocator.wake_up()
        assert report.bytes_restored == size
        assert fake.read(address, size) == pattern(size, 40)
    finally:
        allocator.close()
