"""Calls that run while another thread captures a CUDA graph gpusleep never saw (review 2026-12-06, finding 3).

In pool mode the engine's graphs use PyTorch's own graph pool, so gpusleep never sees their captures. In the
default GLOBAL interaction mode a thread may not allocate, map or pin memory while any other thread has a
GLOBAL capture: the call fails with 900 and the other thread's capture is invalidated. PyTorch runs
cudaMalloc and cudaHostAlloc in RELAXED mode for that reason; gpusleep's wake, pinning and unpinning, and the
first retain of a device's context must too. The double captures on its own thread (``capture_on_thread``).
"""

from __future__ import annotations

import pytest
from helpers import MiB, pattern

import gpusleep


@pytest.mark.parametrize("level", [1, 2])
def test_a_wake_during_another_threads_capture_leaves_it_valid(alloc, fake, level):
    weights = alloc.allocate(3 * MiB + 5, tag="weights")
    fake.write(weights, pattern(3 * MiB + 5, 1))
    alloc.sleep(level=level)
    with fake.capture_on_thread(0, mode="global") as capture:
        report = alloc.wake_up()
        assert capture.status() == "active"
        assert capture.end() == 0, "the other thread's capture stayed valid"
    assert report.bytes_mapped > 0 and not alloc.is_sleeping
    expected = pattern(3 * MiB + 5, 1) if level == 1 else bytes(3 * MiB + 5)
    assert fake.read(weights, 3 * MiB + 5) == expected


def test_pinning_and_unpinning_during_another_threads_capture_leave_it_valid(alloc, fake):
    alloc.allocate(4 * MiB, tag="weights")
    with fake.capture_on_thread(0, mode="global") as capture:
        assert alloc.reserve_host_memory().bytes_newly_pinned == 4 * MiB
        assert alloc.release_host_memory() == 4 * MiB
        assert capture.end() == 0, "the other thread's capture stayed valid"


def test_the_first_allocation_on_a_device_during_another_threads_capture_leaves_it_valid(alloc, fake):
    # The first retain of a device's primary context creates it (memory, like cudaMalloc): it must already
    # run in RELAXED mode.
    with fake.capture_on_thread(0, mode="global") as capture:
        address = alloc.allocate(MiB, tag="weights", device=1)
        assert capture.end() == 0, "the other thread's capture stayed valid"
    fake.write(address, pattern(MiB, 2), device=1)
    assert fake.read(address, MiB, device=1) == pattern(MiB, 2)


def test_a_sleep_during_an_unseen_capture_is_still_refused_cleanly(alloc, fake):
    # Sleep must wait for the device (cuCtxSynchronize), which the driver refuses in every mode during a
    # capture on that device: it says so (the capture is invalidated by then, Note [Captures]).
    alloc.allocate(MiB, tag="weights")
    with fake.capture_on_thread(0, mode="global") as capture:
        with pytest.raises(gpusleep.CaptureInProgressError):
            alloc.sleep(level=1)
        capture.end()
    assert not alloc.is_sleeping
    alloc.sleep(level=1)
    alloc.wake_up()
