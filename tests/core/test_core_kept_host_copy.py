"""Instant re-sleep of unchanged weights (Note [Kept host copies]): a tag that keeps its host copy after a
wake sleeps again without a device-to-host copy, and every way the weights can change invalidates it."""

from __future__ import annotations

import pytest
from helpers import MiB, assert_blobs_intact, pattern, torch_malloc, write_blobs

import gpusleep
from gpusleep import _C

LEGACY_STREAM = 0


def d2h_copies(fake) -> int:
    return fake.call_count("cuMemcpyDtoHAsync_v2")


def test_unchanged_weights_sleep_again_without_a_copy_and_come_back_exact(unverified_alloc, fake):
    # With verification on, the re-sleep also reads back its chunk hashes: tests/core/test_core_verified_wake.py.
    alloc = unverified_alloc
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    blobs = write_blobs(alloc, fake, [3 * MiB + 5, MiB, 7], seed=1)
    first = alloc.sleep(level=1)
    assert first.bytes_offloaded == 4 * MiB + 12 and first.bytes_reused == 0
    alloc.wake_up()
    assert alloc.stats().host.bytes_in_use == 4 * MiB + 2 * 4096, "the host copy is kept while awake (4 KiB pages)"
    for _ in range(5):
        copies = d2h_copies(fake)
        report = alloc.sleep(level=1)
        assert d2h_copies(fake) == copies, "nothing was copied"
        assert report.bytes_offloaded == 0 and report.bytes_reused == 4 * MiB + 12
        assert fake.used_bytes(0) == 0, "the GPU memory was still released"
        alloc.wake_up()
        assert_blobs_intact(fake, blobs)


def test_a_write_after_mark_changed_is_kept(alloc, fake):
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    ((address, data),) = write_blobs(alloc, fake, [2 * MiB + 3], seed=2).items()
    alloc.sleep(level=1)
    alloc.wake_up()
    fake.write(address, pattern(2 * MiB + 3, 3))  # an RL step updates the weights in place
    alloc.mark_changed("weights")
    report = alloc.sleep(level=1)
    assert report.bytes_offloaded == 2 * MiB + 3 and report.bytes_reused == 0
    alloc.wake_up()
    assert fake.read(address, 2 * MiB + 3) == pattern(2 * MiB + 3, 3)


def test_a_write_without_mark_changed_is_the_documented_hazard_that_verification_catches(unverified_alloc, fake):
    # Verification off: the hazard, and the sampled verify_kept_copy. With verification on (the default) every
    # piece is hashed and the write is caught without either: tests/core/test_core_verified_wake.py.
    alloc = unverified_alloc
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    size = 4 * MiB
    ((address, data),) = write_blobs(alloc, fake, [size], seed=4).items()
    alloc.sleep(level=1)
    alloc.wake_up()
    fake.write(address, pattern(size, 5))  # forgot mark_changed
    alloc.sleep(level=1)
    alloc.wake_up()
    assert fake.read(address, size) == data, "the hazard: the stale copy came back"

    alloc.set_policy("weights", "offload", keep_host_copy=True, verify_kept_copy=True)
    alloc.sleep(level=1)  # the copy was dropped by set_policy; this sleep copies and keeps a fresh one
    alloc.wake_up()
    fake.write(address, pattern(size, 6))  # forgot mark_changed again
    mismatches = alloc.stats().counters.get("kept_copy_mismatches", 0)
    report = alloc.sleep(level=1)
    assert alloc.stats().counters["kept_copy_mismatches"] == mismatches + 1
    assert report.bytes_offloaded == size and report.bytes_reused == 0
    alloc.wake_up()
    assert fake.read(address, size) == pattern(size, 6), "verification caught the change"


def test_a_new_block_in_a_kept_segment_invalidates_its_copy_in_global_mode(global_mode, fake):
    global_mode.set_policy("weights", "offload", keep_host_copy=True)
    previous = _C.set_current_tag("weights")
    try:
        first = _C.torch_malloc(300 * 1024, 0, LEGACY_STREAM)
        fake.write(first, pattern(300 * 1024, 7))
        global_mode.sleep(level=1)
        global_mode.wake_up()
        second = _C.torch_malloc(200 * 1024, 0, LEGACY_STREAM)  # carved from the same small segment
        fake.write(second, pattern(200 * 1024, 8))
    finally:
        _C.set_current_tag(previous)
    report = global_mode.sleep(level=1)
    assert report.bytes_reused == 0 and report.bytes_offloaded > 0
    global_mode.wake_up()
    assert fake.read(first, 300 * 1024) == pattern(300 * 1024, 7)
    assert fake.read(second, 200 * 1024) == pattern(200 * 1024, 8)


def test_release_host_memory_drops_kept_copies_and_level_2_discards_them(alloc, fake):
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    blobs = write_blobs(alloc, fake, [3 * MiB], seed=9)
    alloc.sleep(level=1)
    alloc.wake_up()
    assert alloc.stats().bytes_backed_up == 3 * MiB
    assert alloc.release_host_memory() == 3 * MiB
    assert alloc.stats().bytes_backed_up == 0 and alloc.stats().host.bytes_pinned == 0
    report = alloc.sleep(level=1)
    assert report.bytes_offloaded == 3 * MiB, "no kept copy any more: copied again"
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)
    alloc.sleep(level=2)
    assert alloc.stats().bytes_backed_up == 0 and alloc.stats().host.bytes_in_use == 0
    alloc.wake_up()


def test_keep_host_copy_needs_the_offload_policy(alloc):
    with pytest.raises(ValueError, match="offload"):
        alloc.set_policy("kv_cache", "discard", keep_host_copy=True)
    with pytest.raises(ValueError, match="unknown tag"):
        alloc.mark_changed("never-seen")


def test_a_failed_sleep_does_not_trust_a_half_overwritten_copy(alloc, fake):
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    ((address, data),) = write_blobs(alloc, fake, [3 * MiB], seed=10).items()
    alloc.sleep(level=1)
    alloc.wake_up()
    fake.write(address, pattern(3 * MiB, 11))
    alloc.mark_changed("weights")
    fake.inject_fault("cuMemcpyDtoHAsync_v2", nth=2, error=999)  # 1: the chunk hash sums
    with pytest.raises(gpusleep.CudaError):
        alloc.sleep(level=1)
    assert not alloc.is_sleeping
    alloc.sleep(level=1)
    alloc.wake_up()
    assert fake.read(address, 3 * MiB) == pattern(3 * MiB, 11)


# ----------------------------------------------------------------- pool mode: entering the tag (issue 19, 5a)


def test_entering_a_kept_tag_in_pool_mode_invalidates_its_copy(alloc, fake):
    """PyTorch's MemPool hands a freed block of a tagged segment to a new tensor without calling gpusleep;
    the only way to allocate in that pool is inside ``tag()``, so entering it drops the kept copy's trust."""
    alloc._core.set_mode("pool")
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    size = 3 * MiB
    address = torch_malloc("weights", size)
    fake.write(address, pattern(size, 12))
    alloc.sleep(level=1)
    alloc.wake_up()
    with alloc.tag("weights"):
        fake.write(address, pattern(size, 13))  # weights reloaded into a block the pool reused
    report = alloc.sleep(level=1)
    alloc.wake_up()
    assert fake.read(address, size) == pattern(size, 13), "the stale kept copy came back"
    assert report.bytes_reused == 0 and report.bytes_offloaded == size
    _C.torch_free(address, size, 0, LEGACY_STREAM)


def test_entering_a_kept_tag_costs_no_driver_call_and_other_tags_keep_their_copy(unverified_alloc, fake):
    # Verification off: entering the tag is the hint that makes the next sleep copy it. With verification on,
    # only pieces whose hash changed are copied, hint or not (tests/core/test_core_verified_wake.py).
    alloc = unverified_alloc
    alloc._core.set_mode("pool")
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    alloc.set_policy("lora", "offload", keep_host_copy=True)
    weights, lora = torch_malloc("weights", 2 * MiB), torch_malloc("lora", MiB)
    fake.write(weights, pattern(2 * MiB, 14))
    fake.write(lora, pattern(MiB, 15))
    alloc.sleep(level=1)
    alloc.wake_up()
    before = _C.driver_counters()
    with alloc.tag("weights"), alloc.tag("kv_cache"):
        pass
    assert _C.driver_counters() == before
    report = alloc.sleep(level=1)
    assert (report.bytes_offloaded, report.bytes_reused) == (2 * MiB, MiB), "only the entered tag is copied again"
    alloc.wake_up()
    assert fake.read(weights, 2 * MiB) == pattern(2 * MiB, 14) and fake.read(lora, MiB) == pattern(MiB, 15)
    for address, size in ((weights, 2 * MiB), (lora, MiB)):
        _C.torch_free(address, size, 0, LEGACY_STREAM)


def test_entering_a_kept_tag_in_global_mode_keeps_the_copy(global_mode, fake):
    """Global mode sees every new block itself (the arena invalidates), so tag() changes nothing there."""
    global_mode.set_policy("weights", "offload", keep_host_copy=True)
    ((address, data),) = write_blobs(global_mode, fake, [2 * MiB], seed=16).items()
    global_mode.sleep(level=1)
    global_mode.wake_up()
    with global_mode.tag("weights"):
        pass
    report = global_mode.sleep(level=1)
    assert report.bytes_reused == 2 * MiB and report.bytes_offloaded == 0
    global_mode.wake_up()
    assert fake.read(address, 2 * MiB) == data


def test_host_bytes_to_pin_for_level1_counts_only_what_a_sleep_would_pin(alloc, fake):
    """What a collective sleep sums per node (Note [Host memory per node]): kept copies and pinned free memory
    need nothing new, and it is exactly what reserve_host_memory() then pins."""
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    write_blobs(alloc, fake, [2 * MiB], seed=3)
    assert alloc.host_bytes_to_pin_for_level1() == 2 * MiB
    assert alloc.reserve_host_memory().bytes_newly_pinned == 2 * MiB
    assert alloc.host_bytes_to_pin_for_level1() == 0, "reserved: nothing more to pin"
    alloc.sleep(level=1)
    alloc.wake_up()
    assert alloc.host_bytes_to_pin_for_level1() == 0, "the kept copy is reused"
    alloc.set_policy("adapter", "offload")
    write_blobs(alloc, fake, [8 * MiB], seed=4, tag="adapter")  # no kept copy: needs new memory
    host = alloc.stats().host
    spare = host.bytes_pinned - host.bytes_in_use  # pinned, unused: the arena's free memory
    assert alloc.host_bytes_to_pin_for_level1() == 8 * MiB - spare
