"""No stalls (issue 24): frees never wait for a sleep, device waits have a deadline, cached segments are
released with one synchronize per device.

Work that never finishes is the double's stalled stream (tests/fakecuda/README.md, "Stalled streams"): a
synchronize on it blocks until the test releases it, as a collective waiting for a dead peer would block a
GPU. No test here measures time: a thread is "not waiting" when it has finished while the sleep it would
have waited for is still blocked (benchmarks/bench_sleep_wake.py measures the stall itself).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import MiB, pattern
from helpers import torch_malloc as malloc

import gpusleep
from gpusleep import _C

LEGACY_STREAM = 0


def counters(alloc) -> dict:
    return dict(alloc._core.stats().counters)


@pytest.fixture
def short_hang_limit(fake):
    # Old code (an unbounded cuCtxSynchronize) then fails after 3 s instead of hanging the suite.
    fake.set_hang_limit_ms(3000)
    yield
    fake.set_hang_limit_ms(10000)


def test_a_free_during_a_blocked_sleep_does_not_wait_for_it(global_mode, fake, short_hang_limit):
    weights = malloc("weights", 8 * MiB)
    fake.write(weights, pattern(8 * MiB, 1))
    scratch = [malloc("default", 1 * MiB) for _ in range(4)]
    assert global_mode.stats().tags["default"].allocations == 4
    fake.reset_call_counts()
    errors, sleeping_done, frees_done = [], threading.Event(), threading.Event()

    with fake.stuck_work(0):

        def sleeper():
            try:
                global_mode.sleep(level=1)
            except Exception as error:  # noqa: BLE001
                errors.append(error)
            sleeping_done.set()

        def freer():
            for ptr in scratch:
                _C.torch_free(ptr, 1 * MiB, 0, LEGACY_STREAM)
            frees_done.set()

        t_sleep = threading.Thread(target=sleeper)
        t_sleep.start()
        # Wait until the sleep waits for the stuck device, with the allocator's lock held.
        for _ in range(2000):
            if fake.call_count("cuCtxSynchronize") > 0 or sleeping_done.wait(0.005):
                break
        t_free = threading.Thread(target=freer)
        t_free.start()
        assert frees_done.wait(2.5), "torch_free waited for the sleep"
        assert not sleeping_done.is_set(), "the sleep was not blocked while the frees ran"
    t_sleep.join(10)
    t_free.join(1)
    assert not errors, errors
    global_mode.wake_up()
    assert fake.read(weights, 8 * MiB) == pattern(8 * MiB, 1)
    assert global_mode.stats().tags["default"].allocations == 0, "the queued frees were done"
    assert counters(global_mode).get("frees_queued_during_transition", 0) == 4


def test_an_allocation_made_with_the_gil_held_lets_python_run_while_it_waits_for_a_sleep(
    global_mode, fake, short_hang_limit
):
    # PyTorch calls the allocator from C++, on some paths with the GIL held (a tensor made from Python data). Such
    # a malloc waiting for a transition froze every Python thread (the HTTP loop, /is_sleeping) until the
    # transition ended (review finding 9). ctypes.PyDLL calls the entry point with the GIL held, as PyTorch may.
    entry = ctypes.PyDLL(_C.library_path()).gpusleep_torch_malloc
    entry.restype, entry.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    weights = malloc("weights", 8 * MiB)
    fake.write(weights, pattern(8 * MiB, 3))
    fake.reset_call_counts()
    errors, results, sleeping_done, malloc_started, malloc_done = [], [], threading.Event(), threading.Event(), []

    def sleeper():
        try:
            global_mode.sleep(level=1, tags=["weights"])
        except Exception as error:  # noqa: BLE001
            errors.append(error)
        sleeping_done.set()

    def allocate_with_the_gil_held():
        previous = _C.set_current_tag("default")
        malloc_started.set()
        results.append(entry(MiB, 0, None))
        malloc_done.append(True)
        _C.set_current_tag(previous)

    with fake.stuck_work(0):
        t_sleep = threading.Thread(target=sleeper)
        t_sleep.start()
        for _ in range(2000):  # until the sleep waits for the stuck device with the allocator's lock held
            if fake.call_count("cuCtxSynchronize") > 0 or sleeping_done.wait(0.005):
                break
        assert not sleeping_done.is_set(), "the sleep was not blocked"
        t_malloc = threading.Thread(target=allocate_with_the_gil_held)
        t_malloc.start()
        malloc_started.wait(5)
        time.sleep(0.2)  # the malloc thread calls in and waits for the lock, holding the GIL unless it lets go
        seen_while_waiting = [not malloc_done for _ in range(20)]
        assert any(seen_while_waiting), "this thread ran only after the malloc ended: it held the GIL while waiting"
        assert not sleeping_done.is_set()
    t_sleep.join(10)
    t_malloc.join(10)
    assert not errors, errors
    assert results and results[0], _C.last_torch_error()
    _C.torch_free(results[0], MiB, 0, LEGACY_STREAM)
    global_mode.wake_up()
    assert fake.read(weights, 8 * MiB) == pattern(8 * MiB, 3)
    assert global_mode.stats().counters["gil_released_while_waiting"] == 1, "it waited, without the GIL"


def test_in_pool_mode_an_allocation_waiting_for_a_sleep_keeps_the_gil(fake, short_hang_limit):
    # Pool mode's caller, PyTorch's DeviceCachingAllocator, holds its device mutex while it asks for a segment, and
    # a thread freeing a tensor takes that mutex with the GIL held: giving the GIL up there would trade the freeze
    # for a deadlock (Note [Waiting without the GIL]).
    entry = ctypes.PyDLL(_C.library_path()).gpusleep_torch_malloc
    entry.restype, entry.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    alloc = gpusleep.Allocator(wait_timeout_seconds=0.5)
    try:
        alloc._core.set_mode("pool")
        weights = alloc._core.allocate(8 * MiB, "weights", 0)
        fake.write(weights, pattern(8 * MiB, 4))
        fake.reset_call_counts()
        errors, results = [], []

        def sleeper():
            try:
                alloc.sleep(level=1)
            except gpusleep.CudaError as error:
                errors.append(error)

        with fake.stuck_work(0):
            t_sleep = threading.Thread(target=sleeper)
            t_sleep.start()
            for _ in range(2000):  # until the sleep holds the lock, waiting for the stuck device
                if fake.call_count("cuCtxSynchronize") > 0 or not t_sleep.is_alive():
                    break
                time.sleep(0.005)
            previous = _C.set_current_tag("default")
            try:
                results.append(entry(MiB, 0, None))  # waits, with the GIL, until the sleep gives up (0.5 s)
            finally:
                _C.set_current_tag(previous)
            t_sleep.join(10)
        assert errors and errors[0].name == "CUDA_ERROR_TIMEOUT", "the malloc waited for the sleep"
        assert results[0], _C.last_torch_error()
        assert alloc.stats().counters["gil_released_while_waiting"] == 0
        _C.torch_free(results[0], MiB, 0, LEGACY_STREAM)
        assert fake.read(weights, 8 * MiB) == pattern(8 * MiB, 4)
    finally:
        alloc.close()


def test_a_sleep_over_work_that_never_finishes_raises_after_its_deadline_unchanged(fake, short_hang_limit):
    alloc = gpusleep.Allocator(wait_timeout_seconds=0.2)
    try:
        ptr = alloc._core.allocate(8 * MiB, "weights", 0)
        fake.write(ptr, pattern(8 * MiB, 2))
        used = fake.used_bytes(0)
        with fake.stuck_work(0):
            with pytest.raises(gpusleep.CudaError) as raised:
                alloc.sleep(level=1)
            message = str(raised.value)
            assert raised.value.name == "CUDA_ERROR_TIMEOUT"
            assert "device 0" in message and "0.2" in message and "waiting for" in message
            # Invariant 2: the old state, nothing copied, nothing released.
            assert not alloc.is_sleeping
            assert fake.used_bytes(0) == used
            assert alloc._core.stats().host.bytes_in_use == 0
            assert counters(alloc).get("device_wait_timeouts", 0) == 1
        report = alloc.sleep(level=1)  # the work finished: the same sleep succeeds
        assert report.bytes_offloaded == 8 * MiB
        alloc.wake_up()
        assert fake.read(ptr, 8 * MiB) == pattern(8 * MiB, 2)
    finally:
        alloc.close()


def test_empty_cache_over_a_stuck_device_raises_and_keeps_the_cache(global_mode, fake, short_hang_limit):
    ptr = malloc("default", 32 * MiB)
    _C.torch_free(ptr, 32 * MiB, 0, LEGACY_STREAM)
    cached = global_mode._core.stats().bytes_cached
    assert cached >= 32 * MiB
    core = global_mode._core
    core.set_wait_timeout(0.2)
    with fake.stuck_work(0):
        with pytest.raises(gpusleep.CudaError, match="device 0"):
            global_mode.empty_cache()
        assert core.stats().bytes_cached == cached
    assert global_mode.empty_cache() > 0


def synchronizes(fake) -> int:
    return sum(1 for name in fake.call_log() if name == "cuCtxSynchronize")


@pytest.mark.parametrize("how", ["empty_cache", "sleep", "out_of_memory"])
def test_releasing_cached_segments_synchronizes_once_per_device(global_mode, fake, how):
    # Three cached segments of their own (>= 10 MiB each) on device 0, one live block to keep.
    live = malloc("default", 1 * MiB)
    cached = [malloc("default", 40 * MiB) for _ in range(3)]
    for ptr in cached:
        _C.torch_free(ptr, 40 * MiB, 0, LEGACY_STREAM)
    fake.reset_call_counts()
    if how == "empty_cache":
        assert global_mode.empty_cache() >= 3 * 40 * MiB
    elif how == "sleep":
        global_mode._core.set_policy("default", "offload")
        global_mode.sleep(level=1)
    else:
        # A new allocation that fits only once the cache is given back.
        fake.set_foreign_load(0, fake.free_bytes(0) - 100 * MiB)
        big = malloc("default", 120 * MiB)
    assert global_mode._core.stats().bytes_cached < 40 * MiB
    assert synchronizes(fake) == 1, fake.call_log()
    if how == "sleep":
        global_mode.wake_up()
    if how == "out_of_memory":
        _C.torch_free(big, 120 * MiB, 0, LEGACY_STREAM)
        fake.set_foreign_load(0, 0)
    _C.torch_free(live, 1 * MiB, 0, LEGACY_STREAM)


# Deadlines on gpusleep's own streams (issue 24): the copy engine's, the chunk hash stream, the staging ring's,
# and the device-wide wait of a retry of refused releases. stall_on_call stalls the stream of the nth op a call
# enqueues (tests/fakecuda/README.md, "Stalled streams"): a copy or kernel that never finishes. Old code waited
# without a deadline: the double's hang limit (short_hang_limit) then fails the test instead of hanging it.


def tag_states(alloc) -> dict:
    return {name: (t.is_sleeping, t.bytes_mapped, t.bytes_asleep) for name, t in alloc.stats().tags.items()}


def assert_timed_out(raised, what: str) -> None:
    message = str(raised.value)
    assert raised.value.name == "CUDA_ERROR_TIMEOUT", message
    assert "device 0" in message and "0.2 s" in message and what in message, message


@pytest.mark.timeout(60)
def test_a_sleep_whose_copy_stream_never_finishes_raises_after_its_deadline_unchanged(fake, short_hang_limit):
    alloc = gpusleep.Allocator(wait_timeout_seconds=0.2, verify="off")
    try:
        ptr = alloc._core.allocate(8 * MiB, "weights", 0)
        fake.write(ptr, pattern(8 * MiB, 3))
        before, used = tag_states(alloc), fake.used_bytes(0)
        fake.stall_on_call("cuMemcpyDtoHAsync")
        with pytest.raises(gpusleep.CudaError) as raised:
            alloc.sleep(level=1)
        assert_timed_out(raised, "copy streams")
        # Invariant 2: every tag as before, nothing released.
        assert tag_states(alloc) == before and not alloc.is_sleeping
        assert fake.used_bytes(0) == used
        assert counters(alloc)["device_wait_timeouts"] == 1
        assert fake.release_stalls() == 1
        assert alloc.sleep(level=1).bytes_offloaded == 8 * MiB  # the copy finished: the same sleep succeeds
        alloc.wake_up()
        assert fake.read(ptr, 8 * MiB) == pattern(8 * MiB, 3)
    finally:
        fake.release_stalls()
        alloc.close()


@pytest.mark.timeout(60)
def test_a_wake_whose_copy_stream_never_finishes_raises_after_its_deadline_still_asleep(fake, short_hang_limit):
    alloc = gpusleep.Allocator(wait_timeout_seconds=0.2)
    try:
        ptr = alloc._core.allocate(8 * MiB, "weights", 0)
        fake.write(ptr, pattern(8 * MiB, 4))
        alloc.sleep(level=1)
        before = tag_states(alloc)
        fake.stall_on_call("cuMemcpyHtoDAsync")
        with pytest.raises(gpusleep.CudaError) as raised:
            alloc.wake_up()
        assert_timed_out(raised, "copy streams")
        assert tag_states(alloc) == before and alloc.sleeping_tags == {"weights"}
        assert alloc.read_host_backup(ptr, 8 * MiB) == pattern(8 * MiB, 4), "the host copy stays"
        assert fake.release_stalls() == 1
        alloc.wake_up()
        assert fake.read(ptr, 8 * MiB) == pattern(8 * MiB, 4)
        assert alloc.stats().bytes_release_pending == 0
    finally:
        fake.release_stalls()
        alloc.close()


@pytest.mark.timeout(60)
def test_a_retry_of_refused_releases_over_a_stalled_device_does_not_hang(fake, short_hang_limit):
    # A wake that ran out of time leaves what it mapped to the release queue, untried until the device drains
    # (Note [Refused releases]); every later call retries it with a device-wide wait, which had no deadline.
    alloc = gpusleep.Allocator(wait_timeout_seconds=0.2, verify="off")
    try:
        ptr = alloc._core.allocate(8 * MiB, "weights", 0)
        fake.write(ptr, pattern(8 * MiB, 5))
        alloc.sleep(level=1)
        fake.stall_on_call("cuMemcpyHtoDAsync")
        with pytest.raises(gpusleep.CudaError):
            alloc.wake_up()
        assert alloc.stats().bytes_release_pending == 8 * MiB
        # The device is still stuck: each retry gives up after its deadline, the memory stays pending.
        assert alloc.empty_cache() == 0
        with pytest.raises(gpusleep.CudaError, match="still refuses to unmap"):
            alloc.wake_up()
        assert alloc.sleeping_tags == {"weights"}
        assert alloc.stats().bytes_release_pending == 8 * MiB
        fake.release_stalls()
        alloc.wake_up()
        assert fake.read(ptr, 8 * MiB) == pattern(8 * MiB, 5)
        assert alloc.stats().bytes_release_pending == 0
    finally:
        fake.release_stalls()
        alloc.close()


@pytest.mark.timeout(60)
def test_a_sleep_whose_hash_kernel_never_finishes_raises_after_its_deadline_unchanged(fake, short_hang_limit):
    alloc = gpusleep.Allocator(wait_timeout_seconds=0.2)  # verify="full": the sleep hashes on the GPU first
    try:
        ptr = alloc._core.allocate(8 * MiB, "weights", 0)
        fake.write(ptr, pattern(8 * MiB, 6))
        before = tag_states(alloc)
        fake.stall_on_call("cuLaunchKernel")
        with pytest.raises(gpusleep.CudaError) as raised:
            alloc.sleep(level=1)
        assert_timed_out(raised, "chunk hash stream")
        assert tag_states(alloc) == before and not alloc.is_sleeping
        fake.release_stalls()
        report = alloc.sleep(level=1)
        assert report.bytes_offloaded == 8 * MiB and report.bytes_hashed == 8 * MiB
        assert alloc.wake_up().bytes_verified_by_hash == 8 * MiB
        assert fake.read(ptr, 8 * MiB) == pattern(8 * MiB, 6)
    finally:
        fake.release_stalls()
        alloc.close()


@pytest.mark.timeout(60)
def test_a_staged_sleep_whose_copy_never_finishes_raises_after_its_deadline_unchanged(fake, short_hang_limit):
    alloc = gpusleep.Allocator(wait_timeout_seconds=0.2, verify="off")
    try:
        ptr = alloc._core.allocate(8 * MiB, "weights", 0)
        fake.write(ptr, pattern(8 * MiB, 7))
        alloc.set_policy("weights", "offload", host_tier="pageable")  # copied through the staging ring
        before = tag_states(alloc)
        fake.stall_on_call("cuMemcpyDtoHAsync")
        with pytest.raises(gpusleep.CudaError) as raised:
            alloc.sleep(level=1)
        assert_timed_out(raised, "staging ring stream")
        assert tag_states(alloc) == before and not alloc.is_sleeping
        fake.release_stalls()
        assert alloc.sleep(level=1).bytes_pageable_tier == 8 * MiB
        alloc.wake_up()
        assert fake.read(ptr, 8 * MiB) == pattern(8 * MiB, 7)
    finally:
        fake.release_stalls()
        alloc.close()


# A daemon thread waits for a stuck sleep, one without the GIL in a binding and one in an allocation PyTorch made
# with the GIL, while the interpreter exits: both come back during finalization, when taking the GIL back ends
# the thread inside PyEval_RestoreThread (Python 3.10-3.13) through noexcept frames.
EXIT_WHILE_WAITING = """
    import builtins, ctypes, os, sys, threading, time
    from fakecuda import harness
    from helpers import MiB, pattern, torch_malloc
    fake = harness.FakeCuda(os.environ["GPUSLEEP_CUDA_DRIVER"])
    fake.configure(devices=1, capacity_bytes=1 << 30, granularity_bytes=2 << 20, seed=1)
    import gpusleep
    from gpusleep import _C
    alloc = gpusleep.Allocator(wait_timeout_seconds=1.0)
    alloc._core.set_mode("global")
    fake.write(torch_malloc("weights", 8 * MiB), pattern(8 * MiB, 3))
    entry = ctypes.PyDLL(_C.library_path()).gpusleep_torch_malloc
    entry.restype, entry.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    stuck = fake.stuck_work(0)  # entered and never left (kept referenced): the sleep gives up after 1 s
    stuck.__enter__()

    def sleeper():
        try:
            alloc.sleep(level=1, tags=["weights"])
        except gpusleep.CudaError:
            pass

    def allocate_with_the_gil():
        _C.set_current_tag("default")
        entry(MiB, 0, None)

    threading.Thread(target=sleeper, daemon=True).start()
    while fake.call_count("cuCtxSynchronize") == 0:
        time.sleep(0.005)
    threading.Thread(target=allocate_with_the_gil, daemon=True).start()
    time.sleep(0.2)

    class SlowTeardown:  # keeps the interpreter finalizing while the daemon threads come back
        def __del__(self):
            time.sleep(2)

    builtins.keep = SlowTeardown()
    print("main exits", flush=True)
"""


def test_threads_that_come_back_while_python_exits_do_not_abort_it(fakecuda_driver, tmp_path):
    script = tmp_path / "exit_while_waiting.py"
    script.write_text(textwrap.dedent(EXIT_WHILE_WAITING))
    tests_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GPUSLEEP_CUDA_DRIVER=str(fakecuda_driver.path), PYTHONPATH=tests_root)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert "main exits" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-3000:]}"
