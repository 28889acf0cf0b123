"""Parallel pinning (issue 24 "No stalls", part 4; Note [Parallel pinning] in csrc/parallel_pinning.h).

A placed backup is populated in parallel slices, on huge pages where the kernel gives them, and registered as
disjoint pieces (one cuMemHostRegister each, from several threads). The driver refuses a copy whose host range
spans two registrations (docs/driver-rules.md section 8b), so the arena hands out no extent that crosses a piece
boundary. The piece size is 1 GiB by default; these tests shrink it with GPUSLEEP_PIN_PIECE_BYTES, read at each
pin, so that a few MiB make several pieces."""

from __future__ import annotations

import ctypes
import os
import select
import threading
import time

import pytest
from helpers import MiB, assert_blobs_intact, pattern, write_blobs
from test_core_pinned_backups import child_has_mapping, mappings, needs_node0

import gpusleep

PIECE = 2 * MiB
PAGE = 4096
OUT_OF_MEMORY = 2

pytestmark = needs_node0


@pytest.fixture
def pieces(monkeypatch):
    """Registration pieces of 2 MiB, on two threads."""
    monkeypatch.setenv("GPUSLEEP_PIN_PIECE_BYTES", str(PIECE))
    monkeypatch.setenv("GPUSLEEP_PIN_THREADS", "2")


def pages(num_bytes: int) -> int:
    """The pinned bytes a backup of num_bytes takes: whole 4 KiB pages (host_arena.h)."""
    return -(-num_bytes // PAGE) * PAGE


def host_ranges(fake) -> list[tuple[int, int, bool]]:
    """(base, size, registered) of every live pinned host range of the double, ascending."""
    fn = fake.lib.fakecuda_host_ranges
    fn.restype, fn.argtypes = ctypes.c_size_t, [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    count = fn(None, 0)
    out = (ctypes.c_uint64 * (3 * count))()
    fn(out, count)
    return [(out[3 * i], out[3 * i + 1], bool(out[3 * i + 2])) for i in range(count)]


def registrations(fake) -> list[tuple[int, int]]:
    return [(base, size) for base, size, registered in host_ranges(fake) if registered]


def spanning_copies(fake) -> int:
    fn = fake.lib.fakecuda_spanning_copy_count
    fn.restype = ctypes.c_uint64
    return int(fn())


def new_backup_mappings(before) -> list[tuple[int, int, set[str]]]:
    """Mappings made since `before` that are marked DONTFORK (the placed backups' mark)."""
    return [(s, e, flags) for (s, e), flags in mappings().items() if (s, e) not in before and "dc" in flags]


# Sizes that end just short of, just past, and well past piece boundaries.
ODD_SIZES = [PIECE - 1, PIECE + 1, 2 * PIECE + PAGE + 7, 3 * PIECE - PAGE + 123]


@pytest.mark.parametrize("how", ["reserve_host_memory", "sleep"])
def test_odd_sizes_round_trip_bit_exact_through_pieced_registrations(alloc, fake, pieces, how):
    # Defect: the whole backup was one registration, pinned on one thread (35-70 s for 140 GB).
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, ODD_SIZES, seed=71)
    registers = fake.call_count("cuMemHostRegister_v2")
    if how == "reserve_host_memory":
        assert alloc.reserve_host_memory().numa_node == 0  # one buffer: the backups are carved across pieces
    for cycle in range(2):  # the second cycle reuses the arena's coalesced free memory
        alloc.sleep(level=1)
        assert alloc.stats().host.numa_node == 0
        alloc.wake_up()
        assert_blobs_intact(fake, blobs)
        if cycle == 0:
            for address, data in list(blobs.items()):
                blobs[address] = pattern(len(data), 90 + len(data) % 7)
                fake.write(address, blobs[address])
    regs = registrations(fake)
    assert fake.call_count("cuMemHostRegister_v2") - registers == len(regs) > 1, "several pieces"
    assert sum(size for _, size in regs) == sum(pages(size) for size in ODD_SIZES), "whole 4 KiB pages"
    for base, size in regs:
        assert size <= PIECE and base % PIECE == 0, f"piece {base:#x}+{size} is not a 2 MiB aligned piece"
    assert spanning_copies(fake) == 0, "a copy spanned two registrations"


def test_a_backup_larger_than_a_piece_is_registered_piece_by_piece_and_unregistered_whole(alloc, fake, pieces):
    fake.set_host_numa_id(0, 0)
    size = 2 * PIECE + 3 * PAGE + 5
    blobs = write_blobs(alloc, fake, [size], seed=72)
    alloc.sleep(level=1)
    regs = registrations(fake)
    assert [s for _, s in regs] == [PIECE, PIECE, pages(3 * PAGE + 5)]
    assert [b - regs[0][0] for b, _ in regs] == [0, PIECE, 2 * PIECE], "adjacent, disjoint pieces of one mapping"
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)
    unregisters = fake.call_count("cuMemHostUnregister")
    assert alloc.release_host_memory() == pages(size)
    assert fake.call_count("cuMemHostUnregister") - unregisters == 3
    assert registrations(fake) == []


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_one_piece_out_of_memory_leaves_nothing_registered_or_mapped(alloc, fake, pieces, nth):
    fake.set_host_numa_id(0, 0)
    size = 2 * PIECE + 3 * PAGE + 5  # three pieces
    blobs = write_blobs(alloc, fake, [size], seed=73)
    before = mappings()
    host_allocs = fake.call_count("cuMemHostAlloc")
    fake.inject_fault("cuMemHostRegister_v2", nth=nth, error=OUT_OF_MEMORY)
    with pytest.raises(gpusleep.HostOutOfMemoryError) as info:
        alloc.sleep(level=1)
    assert info.value.limited_by == "driver" and info.value.bytes_needed == pages(size)
    assert registrations(fake) == [], "a failed pin left pieces registered"
    assert not new_backup_mappings(before), "a failed pin left its mapping mapped"
    assert fake.call_count("cuMemHostAlloc") == host_allocs, "no fallback after an out-of-memory"
    assert not alloc.is_sleeping
    assert_blobs_intact(fake, blobs)
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_one_piece_refused_otherwise_falls_back_to_cuMemHostAlloc_with_nothing_left_behind(alloc, fake, pieces):
    fake.set_host_numa_id(0, 0)
    size = 2 * PIECE + 3 * PAGE + 5
    blobs = write_blobs(alloc, fake, [size], seed=74)
    before = mappings()
    fake.inject_fault("cuMemHostRegister_v2", nth=2, error=999)
    alloc.sleep(level=1)
    assert alloc.stats().host.numa_node == -1
    assert registrations(fake) == [], "the pieces registered before the refusal were not undone"
    assert not new_backup_mappings(before), "the refused mapping was not unmapped"
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_registration_unsupported_still_pins_with_cuMemHostAlloc(alloc, fake, pieces):
    fake.set_host_numa_id(0, 0)
    fake.set_host_register_supported(0, False)
    blobs = write_blobs(alloc, fake, [2 * PIECE + 1], seed=75)
    alloc.sleep(level=1)
    assert alloc.stats().host.numa_node == -1
    assert registrations(fake) == []
    assert any(not registered and size == pages(2 * PIECE + 1) for _, size, registered in host_ranges(fake))
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_a_pieced_backup_is_on_a_2_mib_boundary_asks_for_huge_pages_and_is_not_forked(alloc, fake, pieces):
    # Defect: the mapping was wherever mmap put it and never asked for transparent huge pages.
    fake.set_host_numa_id(0, 0)
    size = 2 * PIECE + 3 * PAGE + 5
    blobs = write_blobs(alloc, fake, [size], seed=76)
    before = mappings()
    alloc.reserve_host_memory()
    [(start, end, flags)] = new_backup_mappings(before)
    assert start % PIECE == 0 and end - start == -(-size // PAGE) * PAGE
    assert {"hg", "dc", "dd"} <= flags, f"VmFlags {sorted(flags)}: want hg (MADV_HUGEPAGE), dc and dd"
    assert not child_has_mapping(start, end), "a forked child inherited the pinned backup"
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_huge_pages_can_be_turned_off(alloc, fake, pieces, monkeypatch):
    monkeypatch.setenv("GPUSLEEP_PIN_HUGE_PAGES", "0")
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, [PIECE + 1], seed=77)
    before = mappings()
    alloc.reserve_host_memory()
    [(_, _, flags)] = new_backup_mappings(before)
    assert "hg" not in flags
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_piece_bytes_zero_is_one_registration(alloc, fake, monkeypatch):
    """GPUSLEEP_PIN_PIECE_BYTES=0, GPUSLEEP_PIN_THREADS=1: the single registration of earlier versions (the
    benchmark's comparison row)."""
    monkeypatch.setenv("GPUSLEEP_PIN_PIECE_BYTES", "0")
    monkeypatch.setenv("GPUSLEEP_PIN_THREADS", "1")
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, [3 * PIECE + 1], seed=78)
    alloc.sleep(level=1)
    assert [s for _, s in registrations(fake)] == [pages(3 * PIECE + 1)]
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def unregister_and_unmap(fake, mapping: tuple[int, int] | None) -> None:
    """Undoes what a refused rollback has to leave behind (the test's own teardown): the registered pieces, the
    mapping."""
    with fake.context(0), fake._as_harness():
        for base, _, registered in host_ranges(fake):
            if registered:
                assert fake.lib.cuMemHostUnregister(ctypes.c_void_p(base)) == 0
    if mapping is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        assert libc.munmap(mapping[0], mapping[1] - mapping[0]) == 0


def test_a_refused_rollback_leaves_the_mapping_mapped_and_reports_the_out_of_memory(alloc, fake, pieces):
    # Defect: when an unregister of the all-or-nothing rollback was refused, the constructor unmapped anyway: the
    # driver kept those pages pinned, and a later mapping at that address could receive stale DMA.
    fake.set_host_numa_id(0, 0)
    size = 2 * PIECE + 3 * PAGE + 5  # three pieces
    blobs = write_blobs(alloc, fake, [size], seed=79)
    before = mappings()
    teardown_failures = dict(alloc._core.stats().counters)["teardown_failures"]
    fake.inject_fault("cuMemHostRegister_v2", nth=2, error=OUT_OF_MEMORY)
    fake.inject_fault("cuMemHostUnregister", nth=1, error=999)
    left = new_backup_mappings(before)
    try:
        with pytest.raises(gpusleep.HostOutOfMemoryError) as info:
            alloc.sleep(level=1)
        assert info.value.limited_by == "driver" and info.value.bytes_needed == pages(size), "the usual error"
        still_registered = registrations(fake)
        assert still_registered, "the refused piece is still registered in the driver"
        left = new_backup_mappings(before)
        assert len(left) == 1, "the mapping of a refused rollback was unmapped under pages the driver still pins"
        [(start, end, _)] = left
        for base, piece_size in still_registered:
            assert start <= base and base + piece_size <= end, "the registered piece lies in the mapping kept"
        assert dict(alloc._core.stats().counters)["teardown_failures"] > teardown_failures, "the refusal is counted"
        assert not alloc.is_sleeping
        assert_blobs_intact(fake, blobs)
    finally:
        unregister_and_unmap(fake, left[0][:2] if len(left) == 1 else None)


@pytest.fixture
def pin_hook(tmp_path, monkeypatch):
    """Node 0 described by a sysfs directory whose cpulist is a FIFO: a pin reads it at the start of
    PinnedHostBuffer's constructor (after the sleep's device wait) and blocks until the test answers. Yields
    ``answer(then)``: waits for the pin to open the FIFO, runs ``then()``, lets the pin go on."""
    node = tmp_path / "node" / "node0"
    node.mkdir(parents=True)
    (node / "meminfo").write_text("Node 0 MemFree: 99999999 kB\nNode 0 Inactive(file): 0 kB\n")
    fifo = node / "cpulist"
    os.mkfifo(fifo)
    monkeypatch.setenv("GPUSLEEP_NUMA_NODE_ROOT", str(tmp_path / "node"))

    def answer(then) -> None:
        for _ in range(4000):  # O_NONBLOCK: ENXIO until the pin opens the FIFO to read
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                time.sleep(0.005)
        else:
            raise AssertionError("the pin never read the node's cpulist")
        try:
            then()
        finally:
            os.write(fd, b"0\n")
            # Until this pin has read the answer and closed the FIFO (POLLERR: no reader left): else the next
            # answer's open could succeed against this pin's closing end and write into a broken pipe.
            poller = select.poll()
            poller.register(fd, select.POLLERR)
            for _ in range(4000):
                if poller.poll(5):
                    break
            os.close(fd)

    def release_pending(thread: threading.Thread) -> None:
        """Answers every pin still waiting until ``thread`` ends (a failing test must not leave one blocked
        holding the allocator's lock: pytest's report would wait for it)."""
        for _ in range(3000):
            if not thread.is_alive():
                return
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.01)
                continue
            try:
                os.write(fd, b"0\n")
            except BrokenPipeError:
                pass
            os.close(fd)

    answer.release_pending = release_pending  # type: ignore[attr-defined]
    yield answer
    # A pin the test did not answer (a failing test) would block for ever: answer it, then leave a plain file.
    for _ in range(20):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.01)
            continue
        os.write(fd, b"0\n")
        os.close(fd)
    plain = node / "cpulist.plain"
    plain.write_text("0\n")
    os.replace(plain, fifo)


def test_a_refused_pin_breaks_no_other_threads_capture_with_its_rollback_or_fallback(alloc, fake, pieces, pin_hook):
    # Defect: the rollback's cuMemHostUnregister and the cuMemHostAlloc fallback ran in the thread's GLOBAL capture
    # mode (only the pieces were relaxed): that invalidates another thread's GLOBAL capture (driver-rules 12), and
    # the fallback was itself refused. Two backups, so two pins, each reading the node's cpulist: the capture begins
    # at the first (after the sleep's device wait, which no GLOBAL capture allows), is checked and ended at the
    # second, after the first pin's rollback and fallback and before the sleep's own waits.
    fake.set_host_numa_id(0, 0)
    sizes = [2 * PIECE + 3 * PAGE + 5, PAGE + 3]  # the first pin (lower address first) has three pieces
    blobs = write_blobs(alloc, fake, sizes, seed=80)
    fake.inject_fault("cuMemHostRegister_v2", nth=2, error=999)
    outcome: list = []

    def sleeper() -> None:
        try:
            outcome.append(alloc.sleep(level=1))
        except Exception as failure:  # noqa: BLE001
            outcome.append(failure)

    thread = threading.Thread(target=sleeper)
    thread.start()
    capture = fake.capture_on_thread(device=1, mode="global")
    seen: list = []
    try:
        pin_hook(capture.__enter__)
        pin_hook(lambda: seen.extend([capture.status(), capture.end()]))
    finally:
        pin_hook.release_pending(thread)
        thread.join(30)
        capture.end()
    assert seen == ["active", 0], f"the first pin's rollback or fallback broke another thread's capture: {outcome}"
    assert not isinstance(outcome[0], Exception), outcome
    assert registrations(fake) != [] and alloc.stats().host.numa_node == -1, "one buffer placed, one fallback"
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)
