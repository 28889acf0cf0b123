"""What a real GPU would show and the first version got wrong: granularity tails in global mode, stray
contexts on other GPUs, out of memory during a CUDA graph capture, calls that would break a capture."""

from __future__ import annotations

import ctypes
import threading

import pytest
from helpers import MiB, pattern, verification_pins
from helpers import torch_malloc as malloc

import gpusleep
from gpusleep import _C

LEGACY_STREAM = 0
NON_BLOCKING = 1
CAPTURE_MODE_GLOBAL = 0


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@pytest.mark.parametrize("first_bytes", [10 * MiB + MiB // 2, 16 * MiB + MiB // 4 + 3, 151936 * 3584 * 2 // 256 + 1])
def test_every_byte_of_a_block_in_the_granularity_tail_comes_back(global_mode, fake, first_bytes):
    # Defect: an arena segment maps round_up(size, granularity) and its free tail becomes a block, but a
    # level-1 sleep backed up only the requested size: a weight placed in the tail came back as garbage.
    g = fake.granularity_bytes
    first = malloc("weights", first_bytes)
    tail_bytes = round_up(first_bytes, g) - round_up(first_bytes, 512)
    assert tail_bytes > MiB + 4096, "the scenario needs a tail big enough for a second large block"
    second_bytes = tail_bytes - 4096 + 7
    second = malloc("weights", second_bytes)
    assert second == first + round_up(first_bytes, 512), "precondition: the second weight sits in the tail"
    fake.write(first, pattern(first_bytes, 1))
    fake.write(second, pattern(second_bytes, 2))

    global_mode.sleep(level=1)
    assert fake.used_bytes(0) == 0
    global_mode.wake_up()

    assert fake.read(first, first_bytes) == pattern(first_bytes, 1)
    assert fake.read(second, second_bytes) == pattern(second_bytes, 2)


def test_using_only_device_1_leaves_device_0_untouched(fake):
    # Defect: the allocator retained the primary context of every lower-numbered GPU (hundreds of MiB each
    # on a real card, and a failure in EXCLUSIVE_PROCESS mode).
    free_on_0 = fake.free_bytes(0)
    retained_before = fake.primary_context_retains(1)  # allocators of earlier tests may still be alive
    fake.reset_call_counts()
    with gpusleep.Allocator() as allocator:
        address = allocator.allocate(3 * MiB, tag="weights", device=1)
        fake.write(address, pattern(3 * MiB, 3), device=1)
        allocator.reserve_host_memory()
        allocator.sleep(level=1)
        assert fake.free_bytes(0) == free_on_0
        allocator.wake_up()
        allocator.release_host_memory()
        assert fake.free_bytes(0) == free_on_0, "no context, no memory on device 0"
        assert fake.read(address, 3 * MiB, device=1) == pattern(3 * MiB, 3)
        assert fake.primary_context_retains(1) == retained_before + 1
    assert fake.primary_context_retain_calls(0) == 0, "device 0's context was never retained, not even briefly"
    assert fake.free_bytes(0) == free_on_0


@pytest.mark.parametrize("owner, reader", [(0, 1), (1, 0)])
def test_other_gpus_can_read_and_write_gpusleep_memory_after_every_map(fake, owner, reader):
    # Defect: mappings granted access to the owning device only, so cross-device copies and kernels faulted.
    with gpusleep.Allocator() as allocator:
        scratch = allocator.allocate(MiB, tag="default", device=reader)
        weights = allocator.allocate(MiB + 3, tag="weights", device=owner)
        fake.write(weights, pattern(MiB + 3, 4), device=owner)
        fake.copy_device_to_device(scratch, weights, MiB + 3, device=reader)  # a peer reads owner's memory
        assert fake.read(scratch, MiB + 3, device=reader) == pattern(MiB + 3, 4)
        allocator.sleep(level=1)
        allocator.wake_up()  # a remap resets access: it must be granted again
        fake.write(scratch, pattern(MiB + 3, 5), device=reader)
        fake.copy_device_to_device(weights, scratch, MiB + 3, device=reader)  # and writes it
        assert fake.read(weights, MiB + 3, device=owner) == pattern(MiB + 3, 5)


def test_devices_that_cannot_access_each_other_are_not_granted_access(fake):
    fake.set_peer_access(1, 0, False)
    with gpusleep.Allocator() as allocator:
        weights = allocator.allocate(MiB, tag="weights", device=0)
        fake.write(weights, pattern(MiB, 6))
        allocator.sleep(level=1)
        allocator.wake_up()
        assert fake.read(weights, MiB) == pattern(MiB, 6)


@pytest.mark.parametrize("supported", [True, False])
def test_memory_is_rdma_capable_where_the_device_supports_rdma_with_vmm(fake, supported):
    fake.set_rdma_vmm_supported(0, supported)
    with gpusleep.Allocator() as allocator:
        address = allocator.allocate(MiB, tag="weights")
        assert fake.rdma_capable(address) is supported
        allocator.sleep(level=1)
        allocator.wake_up()
        assert fake.rdma_capable(address) is supported


class Capture:
    """A CUDA graph capture on a fresh non-blocking stream of device 0, begun on the calling thread."""

    def __init__(self, fake):
        self.fake = fake
        self.lib = fake.lib
        self.stream = ctypes.c_void_p()

    def __enter__(self):
        self._context = self.fake.context(0)
        self._context.__enter__()
        assert self.lib.cuStreamCreate(ctypes.byref(self.stream), NON_BLOCKING) == 0
        assert self.lib.cuStreamBeginCapture_v2(self.stream, CAPTURE_MODE_GLOBAL) == 0
        return self

    def end(self) -> int:
        graph = ctypes.c_void_p()
        rc = self.lib.cuStreamEndCapture(self.stream, ctypes.byref(graph))
        if graph.value:
            self.lib.cuGraphDestroy(graph)
        return rc

    def __exit__(self, *exc):
        self.lib.cuStreamDestroy_v2(self.stream)
        self._context.__exit__(*exc)


def test_out_of_memory_during_a_capture_fails_cleanly_and_keeps_the_capture_valid(global_mode, fake):
    # Defect: an allocation that ran out of memory during a capture retried after giving back cached
    # segments: the synchronize that needs invalidated the user's capture and orphaned a segment.
    cached = malloc("default", 8 * MiB)
    _C.torch_free(cached, 8 * MiB, 0, LEGACY_STREAM)
    cached_bytes = global_mode.stats().bytes_cached
    assert cached_bytes >= 8 * MiB
    fake.set_foreign_load(0, fake.free_bytes(0) - MiB)
    with Capture(fake) as capture:
        ptr = _C.torch_malloc(32 * MiB, 0, capture.stream.value)
        assert ptr == 0
        error = _C.last_torch_error()
        assert "CUDA graph capture" in error and "out of memory" in error.lower()
        assert capture.end() == 0, "the capture is still valid"
    assert global_mode.stats().bytes_cached == cached_bytes, "the cached segment was neither lost nor orphaned"
    fake.set_foreign_load(0, 0)
    assert global_mode.empty_cache() == cached_bytes
    assert fake.used_bytes(0) == 0


@pytest.mark.parametrize("call", ["sleep", "wake_up", "empty_cache", "free"])
def test_calls_that_would_break_another_threads_capture_say_so_and_leave_it_valid(global_mode, fake, call):
    # Defect: sleep, wake, free or empty_cache during another thread's capture failed with a bare code 900
    # (and invalidated the capture).
    low_level = global_mode.allocate(2 * MiB, tag="kv_cache")
    if call == "wake_up":
        global_mode.sleep(level=1)
    started, done = threading.Event(), threading.Event()
    result = {}

    def capturing_thread():
        with Capture(fake) as capture:
            result["ptr"] = malloc("default", MiB, capture.stream.value)  # the capture allocates through us
            started.set()
            done.wait(10)
            _C.torch_free(result["ptr"], MiB, 0, capture.stream.value)
            result["end"] = capture.end()

    thread = threading.Thread(target=capturing_thread)
    thread.start()
    try:
        assert started.wait(10)
        with pytest.raises(gpusleep.CaptureInProgressError, match="CUDA graph capture is in progress"):
            if call == "free":
                global_mode.free(low_level)
            else:
                getattr(global_mode, call)()
    finally:
        done.set()
        thread.join(10)
    assert result["end"] == 0, "the other thread's capture stayed valid"
    # Once the capture has ended, the same call goes through.
    if call == "free":
        global_mode.free(low_level)
    else:
        getattr(global_mode, call)()


def test_out_of_memory_is_a_runtime_error_like_torchs():
    assert issubclass(gpusleep.OutOfMemoryError, RuntimeError)
    assert issubclass(gpusleep.OutOfMemoryError, MemoryError)
    assert not issubclass(gpusleep.HostOutOfMemoryError, gpusleep.OutOfMemoryError)


def test_backups_are_pinned_on_the_host_numa_node_nearest_the_gpu(fake):
    # Defect: pinned memory landed wherever the kernel put it; on a two-socket host a backup on the far
    # socket crosses the inter-socket link on every copy.
    fake.set_host_numa_id(0, 0)
    with gpusleep.Allocator() as allocator:
        address = allocator.allocate(3 * MiB + 1, tag="weights")
        fake.write(address, pattern(3 * MiB + 1, 7))
        registers, host_allocs = fake.call_count("cuMemHostRegister_v2"), fake.call_count("cuMemHostAlloc")
        allocator.sleep(level=1)
        assert allocator.stats().host.numa_node == 0
        assert fake.call_count("cuMemHostRegister_v2") == registers + 1
        assert fake.call_count("cuMemHostAlloc") == host_allocs + verification_pins(allocator)
        allocator.wake_up()
        assert fake.read(address, 3 * MiB + 1) == pattern(3 * MiB + 1, 7)
        assert allocator.release_host_memory() > 0
    assert fake.live_object_count() == 0, fake.live_objects()


@pytest.mark.parametrize("node", [None, -1, 1000], ids=["old-driver", "no-numa", "missing-node"])
def test_pinning_falls_back_cleanly_when_the_numa_node_is_unknown_or_missing(fake, node):
    fake.set_host_numa_id(0, node)  # 1000: a node this host does not have, so mbind refuses it
    with gpusleep.Allocator() as allocator:
        address = allocator.allocate(MiB, tag="weights")
        fake.write(address, pattern(MiB, 8))
        report = allocator.reserve_host_memory()
        assert report.numa_node == -1 and report.bytes_newly_pinned == MiB
        allocator.sleep(level=1)
        allocator.wake_up()
        assert fake.read(address, MiB) == pattern(MiB, 8)
    assert fake.live_object_count() == 0, fake.live_objects()


def test_peer_access_can_be_turned_off(fake, monkeypatch):
    monkeypatch.setenv("GPUSLEEP_PEER_ACCESS", "0")
    with gpusleep.Allocator() as allocator:
        scratch = allocator.allocate(MiB, tag="default", device=1)
        weights = allocator.allocate(MiB, tag="weights", device=0)
        from fakecuda.harness import CudaCallError

        with pytest.raises(CudaCallError):
            fake.copy_device_to_device(scratch, weights, MiB, device=1)


def test_close_gives_the_primary_contexts_back(fake):
    before = [fake.primary_context_retains(d) for d in (0, 1)]
    allocator = gpusleep.Allocator()
    allocator.allocate(MiB, tag="weights", device=1)
    allocator.sleep(level=1)
    assert fake.primary_context_retains(1) == before[1] + 1
    allocator.close()
    assert [fake.primary_context_retains(d) for d in (0, 1)] == before


def test_a_pool_mode_free_refused_by_a_capture_is_done_after_it(alloc, fake):
    # PyTorch's MemPool frees a segment while another thread captures: gpusleep cannot synchronize and
    # unmap then, and PyTorch never asks again, so the free waits for the next call that may do it.
    alloc._core.set_mode("pool")
    previous = _C.set_current_tag("weights")
    try:
        segment = _C.torch_malloc(4 * MiB, 0, LEGACY_STREAM)
        assert segment, _C.last_torch_error()
        used = fake.used_bytes(0)
        started, done = threading.Event(), threading.Event()
        result = {}

        def capturing_thread():
            with Capture(fake) as capture:
                result["ptr"] = _C.torch_malloc(2 * MiB, 0, capture.stream.value)  # gpusleep sees the capture
                started.set()
                done.wait(10)
                result["end"] = capture.end()

        thread = threading.Thread(target=capturing_thread)
        thread.start()
        try:
            assert started.wait(10)
            _C.torch_free(segment, 4 * MiB, 0, LEGACY_STREAM)
            assert alloc.stats().counters["frees_deferred_by_capture"] == 1
            assert fake.used_bytes(0) >= used, "not freed during the capture"
        finally:
            done.set()
            thread.join(10)
        assert result["end"] == 0, "the capture stayed valid"
        alloc.empty_cache()
        assert fake.used_bytes(0) == round_up(2 * MiB, fake.granularity_bytes), "freed once the capture ended"
        _C.torch_free(result["ptr"], 2 * MiB, 0, LEGACY_STREAM)
    finally:
        _C.set_current_tag(previous)
