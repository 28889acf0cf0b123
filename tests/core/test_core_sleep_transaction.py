"""Sleep is a transaction even when the driver fails, and nothing the driver refuses to release is forgotten.

Each test names the defect it pins down. They drive the public API on the driver double, inject one
failing driver call, and check what a user would see: the tags' state, the bytes at the same addresses,
the GPU memory in use, and that close() leaves no driver object behind.
"""

from __future__ import annotations

import pytest
from helpers import MiB, assert_blobs_intact, pattern, pin_calls, write_blobs

import gpusleep
from gpusleep import _C

UNKNOWN = 999
OUT_OF_MEMORY = 2
LEGACY_STREAM = 0


def _two_device_weights(allocator, fake, seed):
    """Weights and a KV cache on both devices, so a sleep switches contexts several times."""
    g = fake.granularity_bytes
    blobs = {}
    for device in (0, 1):
        for i, size in enumerate([g + 7, 2 * g]):
            address = allocator.allocate(size, tag="weights", device=device)
            blobs[address] = (device, pattern(size, seed + 10 * device + i))
            fake.write(address, blobs[address][1], device=device)
        allocator.allocate(g, tag="kv_cache", device=device)
    return blobs


def _assert_bytes(fake, blobs):
    for address, (device, data) in blobs.items():
        assert fake.read(address, len(data), device=device) == data, f"bytes at {address:#x} changed"


@pytest.mark.parametrize("function", ["cuCtxGetCurrent", "cuCtxSetCurrent"])
@pytest.mark.parametrize("error", [OUT_OF_MEMORY, UNKNOWN])
def test_a_context_switch_failing_anywhere_in_sleep_leaves_the_old_or_the_complete_new_state(fake, function, error):
    # Defect: a context switch failing in sleep's commit phase raised after some segments were unmapped,
    # with their tags still awake; wake_up() was then a no-op and kernels would read unmapped memory.
    allocator = gpusleep.Allocator()
    try:
        blobs = _two_device_weights(allocator, fake, seed=1)
        used = (fake.used_bytes(0), fake.used_bytes(1))
        positions = 0
        for nth in range(1, 40):
            calls_before = fake.call_count(function)
            fake.inject_fault(function, nth=nth, error=error)
            try:
                allocator.sleep(level=1)
            except gpusleep.CudaError:
                fake.clear_faults()
                assert not allocator.is_sleeping, f"failure at call {nth}: raised, yet some tag is asleep"
                assert (fake.used_bytes(0), fake.used_bytes(1)) == used, f"failure at call {nth}: memory released"
                assert allocator.stats().host.bytes_in_use == 0
                _assert_bytes(fake, blobs)
                positions += 1
                continue
            reached = fake.call_count(function) - calls_before >= nth
            fake.clear_faults()
            # It went through (the fault fell after the last switch, or a refused release is pending):
            # the new state is complete, and waking brings every byte back.
            assert allocator.sleeping_tags == {"weights", "kv_cache"}
            allocator.wake_up()
            assert not allocator.is_sleeping
            _assert_bytes(fake, blobs)
            if not reached:
                break  # the fault was never reached: every position has been tried
        assert positions > 0, "the sweep reached no context switch"
    finally:
        allocator.close()
    assert fake.live_object_count() == 0, fake.live_objects()


def test_a_refused_unmap_is_not_reported_as_freed_and_the_tag_can_still_wake(unverified_alloc, fake):
    # Defect: a failing cuMemUnmap was swallowed: sleep() reported the bytes freed, the mapping stayed,
    # and every later wake_up() failed with cuMemMap INVALID_VALUE; close() leaked it all.
    alloc = unverified_alloc  # the first unmap of the sleep is the segment's
    blobs = write_blobs(alloc, fake, [3 * MiB + 5], seed=2)
    ((address, data),) = blobs.items()
    used = fake.used_bytes(0)
    fake.inject_fault("cuMemUnmap", nth=1, error=UNKNOWN)
    report = alloc.sleep(level=1)
    assert alloc.sleeping_tags == {"weights"}
    assert report.bytes_freed == 0, "nothing was freed: the driver refused the unmap"
    assert report.bytes_release_pending == used
    assert fake.used_bytes(0) == used
    stats = alloc.stats()
    assert stats.bytes_release_pending == used
    assert stats.counters["release_refused"] >= 1

    alloc.wake_up()  # retries the release first, then maps fresh memory at the same address
    assert fake.read(address, len(data)) == data
    assert alloc.stats().bytes_release_pending == 0
    assert fake.used_bytes(0) == used


def test_a_refused_unmap_that_keeps_being_refused_is_retried_by_close(fake):
    allocator = gpusleep.Allocator()
    allocator.allocate(2 * MiB, tag="kv_cache")
    fake.inject_fault("cuMemUnmap", nth=1, error=UNKNOWN)
    allocator.sleep(level=1)
    fake.inject_fault("cuMemUnmap", nth=1, error=UNKNOWN)
    with pytest.raises(gpusleep.CudaError, match="cuMemUnmap"):
        allocator.wake_up()  # the memory cannot be mapped again while the old mapping stands
    assert allocator.sleeping_tags == {"kv_cache"}
    allocator.close()
    assert fake.used_bytes(0) == 0
    assert fake.live_object_count() == 0, fake.live_objects()


@pytest.mark.parametrize("function", ["cuMemRelease", "cuMemAddressFree"])
def test_a_refused_release_on_free_is_kept_and_retried(alloc, fake, function):
    # Defect: a failing cuMemRelease or cuMemAddressFree was swallowed and never retried, not even by close().
    address = alloc.allocate(4 * MiB, tag="weights")
    fake.inject_fault(function, nth=1, error=UNKNOWN)
    alloc.free(address)
    assert alloc.stats().counters["release_refused"] == 1
    assert alloc.stats().objects_release_pending == 1
    other = alloc.allocate(2 * MiB, tag="weights")  # the allocator keeps working
    alloc.free(other)
    assert alloc.stats().objects_release_pending == 0, "later calls retry what was refused"
    assert fake.live_object_count() == 0, fake.live_objects()


def test_a_refused_release_at_close_is_retried_by_a_second_close(fake):
    allocator = gpusleep.Allocator()
    allocator.allocate(4 * MiB, tag="weights")
    fake.inject_fault("cuMemAddressFree", nth=1, error=UNKNOWN)
    fake.inject_fault("cuMemAddressFree", nth=2, error=UNKNOWN)  # close() retries once itself
    allocator.close()
    assert allocator.stats().objects_release_pending == 1
    assert allocator.stats().counters["release_refused"] == 2  # the release and close()'s own retry
    allocator.close()
    assert allocator.stats().objects_release_pending == 0
    assert fake.live_object_count() == 0, fake.live_objects()


def test_a_failure_while_sleep_gives_back_the_cache_keeps_the_segment_cached(global_mode, fake):
    # Defect: a failure while sleep released a cached segment left it out of the pools but mapped:
    # bytes_cached said 0, the memory stayed held, and empty_cache() could not release it.
    ptr = _C.torch_malloc(8 * MiB, 0, LEGACY_STREAM)
    assert ptr, _C.last_torch_error()
    _C.torch_free(ptr, 8 * MiB, 0, LEGACY_STREAM)
    global_mode.set_policy("default", "discard")
    cached = global_mode.stats().bytes_cached
    assert cached >= 8 * MiB
    fake.inject_fault("cuCtxSynchronize", nth=1, error=UNKNOWN)
    with pytest.raises(gpusleep.CudaError):
        global_mode.sleep(level=1)
    assert not global_mode.is_sleeping
    assert global_mode.stats().bytes_cached == cached
    used = fake.used_bytes(0)
    assert global_mode.empty_cache() == used
    assert fake.used_bytes(0) == 0


@pytest.mark.parametrize("size", [2**64 - 1, 2**64 - 4096, 2**64 - (1 << 20) - 1])
def test_sizes_that_overflow_when_rounded_are_refused(alloc, fake, size):
    # Defect: allocate(2**64 - 1) succeeded with 0 bytes mapped, and every later level-1 sleep failed.
    with pytest.raises(ValueError, match="too large"):
        alloc.allocate(size, tag="weights")
    assert alloc.stats().tags.get("weights") is None or alloc.stats().tags["weights"].allocations == 0
    blobs = write_blobs(alloc, fake, [MiB], seed=3)
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_sizes_beyond_the_address_space_are_out_of_memory_with_measured_values(alloc, fake):
    alloc.free(alloc.allocate(MiB, tag="weights"))  # device 0's context (and its memory) exists now
    free_bytes = fake.free_bytes(0)
    with pytest.raises(gpusleep.OutOfMemoryError, match="virtual address space") as info:
        alloc.allocate(2**63 + 1, tag="weights")
    assert info.value.bytes_needed >= 2**63 + 1 and info.value.device == 0
    assert info.value.bytes_free == free_bytes
    assert fake.used_bytes(0) == 0


def test_the_largest_size_pytorch_can_ask_for_fails_cleanly(global_mode, fake):
    assert _C.torch_malloc(2**63 - 1, 0, LEGACY_STREAM) == 0
    assert "virtual address space" in _C.last_torch_error()
    assert fake.used_bytes(0) == 0


def test_out_of_memory_from_a_non_allocation_call_is_a_cuda_error_not_a_made_up_gpu_oom(alloc, fake):
    # Defect: OutOfMemoryError from a non-allocation call reported bytes_needed=0, bytes_free=0, device=-1.
    blobs = write_blobs(alloc, fake, [MiB], seed=4)
    fake.inject_fault("cuMemcpyDtoHAsync_v2", nth=2, error=OUT_OF_MEMORY)  # 1: the chunk hash sums
    with pytest.raises(gpusleep.CudaError) as info:
        alloc.sleep(level=1)
    assert not isinstance(info.value, gpusleep.OutOfMemoryError)
    assert info.value.name == "CUDA_ERROR_OUT_OF_MEMORY"
    assert not alloc.is_sleeping
    assert_blobs_intact(fake, blobs)


@pytest.mark.parametrize("numa_node, pin_call", [(-1, "cuMemHostAlloc"), (0, "cuMemHostRegister_v2")])
def test_pinning_refused_by_the_driver_is_a_host_memory_error(alloc, fake, numa_node, pin_call):
    fake.set_host_numa_id(0, numa_node)
    blobs = write_blobs(alloc, fake, [MiB], seed=5)
    fake.inject_fault(pin_call, nth=1, error=OUT_OF_MEMORY)
    with pytest.raises(gpusleep.HostOutOfMemoryError) as info:
        alloc.sleep(level=1)
    assert not isinstance(info.value, gpusleep.OutOfMemoryError), "the GPU is not what ran out"
    assert info.value.bytes_needed == MiB
    assert info.value.limited_by == "driver"
    assert not alloc.is_sleeping
    assert_blobs_intact(fake, blobs)


def test_gpu_out_of_memory_carries_the_free_bytes_measured_on_its_device(alloc, fake):
    alloc.free(alloc.allocate(MiB, tag="weights", device=1))  # device 1's context is retained now
    fake.set_foreign_load(1, fake.free_bytes(1) - 3 * MiB)
    free_before = fake.free_bytes(1)
    with pytest.raises(gpusleep.OutOfMemoryError) as info:
        alloc.allocate(64 * MiB, tag="weights", device=1)
    assert info.value.device == 1
    assert info.value.bytes_needed == 64 * MiB
    assert info.value.bytes_free == free_before
    assert isinstance(info.value, RuntimeError), "vLLM's callers catch RuntimeError"


def test_a_sleep_that_would_pin_more_than_the_host_has_fails_fast_and_changes_nothing(alloc, fake, host_limits):
    # Defect: pinning was attempted whatever the host had left, which gets the process killed.
    host_limits(mem_available_bytes=2 * MiB)
    blobs = write_blobs(alloc, fake, [3 * MiB], seed=6)
    pins = pin_calls(fake)
    with pytest.raises(gpusleep.HostOutOfMemoryError) as info:
        alloc.sleep(level=1)
    assert info.value.limited_by == "MemAvailable"
    assert info.value.bytes_needed == 3 * MiB and info.value.bytes_available == 2 * MiB
    assert "host" in str(info.value) and "GPU" not in str(info.value).split(".")[0]
    assert pin_calls(fake) == pins, "nothing was pinned"
    assert not alloc.is_sleeping
    assert_blobs_intact(fake, blobs)
    host_limits(mem_available_bytes=64 * MiB)
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_the_cgroup_limit_counts_when_it_is_tighter_than_the_host(alloc, fake, host_limits):
    host_limits(mem_available_bytes=1 << 40, cgroup_max_bytes=100 * MiB, cgroup_current_bytes=99 * MiB)
    alloc.allocate(2 * MiB, tag="weights")
    with pytest.raises(gpusleep.HostOutOfMemoryError) as info:
        alloc.reserve_host_memory()
    assert info.value.limited_by == "cgroup" and info.value.bytes_available == MiB
    assert alloc.stats().host.bytes_pinned == 0
    host_limits(mem_available_bytes=1 << 40, cgroup_max_bytes=100 * MiB, cgroup_current_bytes=10 * MiB)
    assert alloc.reserve_host_memory().bytes_newly_pinned == 2 * MiB


def test_host_memory_already_pinned_needs_no_new_budget(alloc, fake, host_limits):
    blobs = write_blobs(alloc, fake, [2 * MiB], seed=7)
    alloc.reserve_host_memory()
    host_limits(mem_available_bytes=0)  # the host is full now, but the backup's memory is pinned already
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_weights_whose_host_copy_is_kept_need_no_new_pinned_memory(alloc, fake, host_limits):
    # Defect: reserve_host_memory() (the distributed prepare step, `serve --reserve-host-memory`) counted
    # weights that keep their host copy as needing new pinned memory: it pinned a second copy the sleep
    # never used, or refused a sleep that needed no new byte on a host with room for one copy.
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    blobs = write_blobs(alloc, fake, [16 * MiB + 3, MiB], seed=11)
    alloc.sleep(level=1)
    alloc.wake_up()
    pinned = alloc.stats().host.bytes_pinned
    host_limits(mem_available_bytes=MiB)  # room for far less than another copy
    pins = pin_calls(fake)
    assert alloc.reserve_host_memory().bytes_newly_pinned == 0
    assert pin_calls(fake) == pins and alloc.stats().host.bytes_pinned == pinned
    assert alloc.sleep(level=1).bytes_reused == 17 * MiB + 3
    alloc.wake_up()
    big = next(address for address, data in blobs.items() if len(data) == 16 * MiB + 3)
    blobs[big] = pattern(16 * MiB + 3, 12)
    fake.write(big, blobs[big])  # in place: a stale copy, whose extents are the destination of the next copy
    alloc.mark_changed("weights")
    assert alloc.reserve_host_memory().bytes_newly_pinned == 0
    report = alloc.sleep(level=1)
    assert report.bytes_offloaded == 16 * MiB + 3, (
        "the changed weights are copied again (all of them: every piece changed)"
    )
    assert report.bytes_reused == MiB, "the unchanged ones are not (their chunk hashes held)"
    assert alloc.stats().host.bytes_pinned == pinned
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_reclaimable_file_cache_does_not_count_and_a_parent_cgroup_limit_does(alloc, fake, tmp_path, monkeypatch):
    # A serving container that just read its weights from disk has memory.current full of page cache that
    # the kernel can reclaim; a pod-level limit sits on the parent cgroup.
    root = tmp_path / "cgroup"
    own = root / "pod" / "container"
    own.mkdir(parents=True)
    (tmp_path / "meminfo").write_text("MemAvailable: 1073741824 kB\n")
    (tmp_path / "self_cgroup").write_text("0::/pod/container\n")
    (own / "memory.max").write_text(f"{100 * MiB}\n")
    (own / "memory.current").write_text(f"{99 * MiB}\n")
    (own / "memory.stat").write_text(f"anon {9 * MiB}\ninactive_file {90 * MiB}\n")
    (root / "pod" / "memory.max").write_text(f"{400 * MiB}\n")
    (root / "pod" / "memory.current").write_text(f"{398 * MiB}\n")
    monkeypatch.setenv("GPUSLEEP_PROC_MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setenv("GPUSLEEP_CGROUP_ROOT", str(root))
    monkeypatch.setenv("GPUSLEEP_PROC_SELF_CGROUP", str(tmp_path / "self_cgroup"))
    alloc.allocate(4 * MiB, tag="weights")
    with pytest.raises(gpusleep.HostOutOfMemoryError) as info:
        alloc.reserve_host_memory()
    assert info.value.limited_by == "cgroup" and info.value.bytes_available == 2 * MiB, "the parent's limit binds"
    (root / "pod" / "memory.current").write_text(f"{100 * MiB}\n")
    assert alloc.reserve_host_memory().bytes_newly_pinned == 4 * MiB, "91 MiB of the 99 are reclaimable cache"
