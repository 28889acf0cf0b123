"""Global mode through the driver double: arena blocks sleep and wake with their tag, cached segments are
released rather than copied, and allocations during a CUDA graph capture neither break the capture nor
get reused outside it."""

from __future__ import annotations

import ctypes

import pytest
from helpers import MiB, pattern
from helpers import torch_malloc as malloc

from gpusleep import _C

LEGACY_STREAM = 0
CAPTURE_MODE_GLOBAL = 0
NON_BLOCKING = 1


def test_arena_blocks_of_a_tag_sleep_and_wake_bit_exact(global_mode, fake):
    blocks = {}
    for i, size in enumerate([512, 4096, 300 * 1024, 3 * MiB, 12 * MiB + 5]):
        ptr = malloc("weights", size)
        blocks[ptr] = pattern(size, i)
        fake.write(ptr, blocks[ptr])
    kv = malloc("kv_cache", 2 * MiB)
    used = fake.used_bytes(0)
    report = global_mode.sleep(level=1)
    assert fake.used_bytes(0) == 0
    assert report.bytes_freed == used
    global_mode.wake_up()
    assert fake.used_bytes(0) == used
    for ptr, data in blocks.items():
        assert fake.read(ptr, len(data)) == data
    assert fake.read(kv, 2 * MiB) == bytes(2 * MiB)
    assert global_mode.stats().tags["weights"].allocations == len(blocks)


def test_cached_segments_without_live_blocks_are_released_not_copied(global_mode, fake):
    live = malloc("weights", 1 * MiB)
    cached = malloc("weights", 64 * MiB)
    _C.torch_free(cached, 64 * MiB, 0, LEGACY_STREAM)
    assert global_mode.stats().bytes_cached >= 64 * MiB
    report = global_mode.sleep(level=1)
    assert report.bytes_offloaded < 64 * MiB, "the free 64 MiB segment was not copied"
    assert global_mode.stats().bytes_cached < 64 * MiB
    global_mode.wake_up()
    _C.torch_free(live, 1 * MiB, 0, LEGACY_STREAM)


def test_blocks_freed_while_asleep_and_empty_cache_while_asleep(global_mode, fake):
    ptr = malloc("kv_cache", 5 * MiB)
    global_mode.sleep(level=1)
    _C.torch_free(ptr, 5 * MiB, 0, LEGACY_STREAM)
    assert global_mode.empty_cache() > 0
    assert global_mode.stats().tags["kv_cache"].bytes_asleep == 0
    global_mode.wake_up()
    assert fake.used_bytes(0) == 0


def test_malloc_from_a_sleeping_tag_fails_with_a_reason(global_mode):
    malloc("kv_cache", 1 * MiB)
    global_mode.sleep(level=1)
    previous = _C.set_current_tag("kv_cache")
    try:
        assert _C.torch_malloc(1 * MiB, 0, LEGACY_STREAM) == 0
    finally:
        _C.set_current_tag(previous)
    assert "kv_cache" in _C.last_torch_error() and "asleep" in _C.last_torch_error()


def test_allocation_during_capture_keeps_the_capture_valid_and_its_blocks_private(global_mode, fake):
    lib = fake.lib
    size = 3 * MiB
    with fake.context(0):
        stream = ctypes.c_void_p()
        assert lib.cuStreamCreate(ctypes.byref(stream), NON_BLOCKING) == 0
        try:
            assert lib.cuStreamBeginCapture_v2(stream, CAPTURE_MODE_GLOBAL) == 0
            creates = fake.call_count("cuMemCreate")
            inside = malloc("default", size, stream.value)
            assert fake.call_count("cuMemCreate") > creates, "a new segment was mapped during the capture"
            _C.torch_free(inside, size, 0, stream.value)
            reused = malloc("default", size, stream.value)
            assert reused == inside, "blocks freed during a capture are reused within it"
            _C.torch_free(reused, size, 0, stream.value)
            graph = ctypes.c_void_p()
            assert lib.cuStreamEndCapture(stream, ctypes.byref(graph)) == 0, "the capture was invalidated"
            assert graph.value
            lib.cuGraphDestroy(graph)

            after = malloc("default", size, stream.value)
            assert after != inside, "graph memory must not be handed out after the capture"
            _C.torch_free(after, size, 0, stream.value)
            used = fake.used_bytes(0)
            released = global_mode.empty_cache()
            assert fake.used_bytes(0) == used - released
            assert fake.used_bytes(0) > 0, "the graph's segment is kept"
        finally:
            lib.cuStreamDestroy_v2(stream)


def test_the_exported_malloc_throws_in_global_mode_because_pytorch_does_not_check_for_null(global_mode):
    # Note [Global-mode allocation failure]: a nullptr would become a tensor at address 0.
    import gpusleep

    with pytest.raises(gpusleep.OutOfMemoryError, match="could not allocate"):
        _C._pluggable_malloc(4 << 30, 0, LEGACY_STREAM)
    global_mode.close()
    with pytest.raises(MemoryError, match="closed"):
        _C._pluggable_malloc(1024, 0, LEGACY_STREAM)


def test_the_exported_malloc_returns_null_in_pool_mode(alloc):
    alloc._core.set_mode("pool")
    assert _C._pluggable_malloc(4 << 30, 0, LEGACY_STREAM) == 0
    assert "CUDA_ERROR_OUT_OF_MEMORY" in _C.last_torch_error()


def test_wake_releases_unused_cached_segments_before_giving_up(global_mode, fake):
    weights = malloc("weights", 8 * MiB)
    fake.write(weights, pattern(8 * MiB, 7))
    cached = malloc("default", 64 * MiB)
    _C.torch_free(cached, 64 * MiB, 0, LEGACY_STREAM)  # stays cached under the awake 'default' tag
    global_mode.sleep(level=1)
    fake.set_capacity(0, fake.used_bytes(0) + 8 * MiB)  # fits only once the cache is given back
    global_mode.wake_up()
    assert global_mode.stats().bytes_cached < 64 * MiB
    assert global_mode.stats().counters["cache_released_for_wake"] == 1
    assert fake.read(weights, 8 * MiB) == pattern(8 * MiB, 7)
