"""Placed pinned backups (review 2026-12-06 finding 6, issue 19; Note [Placing pinned backups] in
csrc/pinned_host_buffer.h).

Where the GPU's nearest host NUMA node is known, a backup is an anonymous mapping bound to that node and
registered with cuMemHostRegister. The double does not model where host pages land (tests/fakecuda/README.md),
but the mapping is a real one in this process, so these tests read what the kernel recorded for it in
/proc/self/smaps and /proc/self/numa_maps, and fork to see what a child inherits. Node 0 is a real node on
any NUMA kernel; the sysfs description of the nodes (CPUs, free memory) is faked with
GPUSLEEP_NUMA_NODE_ROOT, as the budget tests fake /proc/meminfo."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from helpers import MiB, assert_blobs_intact, verification_pins, write_blobs

import gpusleep

PAGE = os.sysconf("SC_PAGE_SIZE")
OUT_OF_MEMORY = 2
# An odd size, so that the backup's mapping is the only one of its length in this process.
BACKUP_BYTES = 5 * MiB + 3 * PAGE + 123
MAPPED_BYTES = -(-BACKUP_BYTES // PAGE) * PAGE

needs_node0 = pytest.mark.skipif(
    not Path("/sys/devices/system/node/node0").is_dir(),
    reason="needs a NUMA kernel with node 0 (placement binds real pages to it)",
)


def mappings() -> dict[tuple[int, int], set[str]]:
    """(start, end) -> VmFlags of every mapping of this process."""
    out: dict[tuple[int, int], set[str]] = {}
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            current = (start, end)
            out[current] = set()
        elif head == "VmFlags:" and current is not None:
            out[current] = set(line.split()[1:])
    return out


def new_mapping_of_backup_size(before: dict[tuple[int, int], set[str]]) -> tuple[int, int, set[str]]:
    found = [(s, e, flags) for (s, e), flags in mappings().items() if e - s == MAPPED_BYTES and (s, e) not in before]
    assert len(found) == 1, f"expected one new mapping of {MAPPED_BYTES} bytes, found {found}"
    return found[0]


def numa_policy(start: int) -> str:
    """The memory policy /proc/self/numa_maps records for the mapping at `start` ("bind:0", "prefer:0", ...)."""
    for line in Path("/proc/self/numa_maps").read_text().splitlines():
        fields = line.split()
        if int(fields[0], 16) == start:
            return fields[1]
    raise AssertionError(f"no numa_maps line for {start:#x}")


def child_has_mapping(start: int, end: int) -> bool:
    """Forks; the child looks for [start, end) in its own /proc/self/maps and answers by its exit code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only reads a file
        pid = os.fork()
    if pid == 0:
        try:
            inherited = False
            with open("/proc/self/maps") as maps:
                for line in maps:
                    lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                    inherited = inherited or (lo < end and start < hi)
            os._exit(10 if inherited else 11)
        except BaseException:
            os._exit(12)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (10, 11), f"the forked child failed ({code})"
    return code == 10


@pytest.fixture
def numa_nodes(tmp_path, monkeypatch):
    """Points the core at a sysfs node directory the test writes: node N's cpulist and meminfo."""
    root = tmp_path / "node"

    def describe(node: int, cpulist: str, mem_free_bytes: int, inactive_file_bytes: int = 0) -> None:
        directory = root / f"node{node}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpulist").write_text(cpulist + "\n")
        (directory / "meminfo").write_text(
            f"Node {node} MemTotal:       99999999 kB\n"
            f"Node {node} MemFree:        {mem_free_bytes // 1024} kB\n"
            f"Node {node} MemUsed:        1234 kB\n"
            f"Node {node} Active(file):   0 kB\n"
            f"Node {node} Inactive(file): {inactive_file_bytes // 1024} kB\n"
        )

    monkeypatch.setenv("GPUSLEEP_NUMA_NODE_ROOT", str(root))
    return describe


# ----------------------------------------------------------------------------------- a: fork and core dumps


def place_a_backup(alloc, fake, how: str, seed: int):
    """A placed backup of BACKUP_BYTES on node 0, pinned ahead or by a level-1 sleep: (blobs, start, end, flags)."""
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, [BACKUP_BYTES], seed=seed)
    before = mappings()
    if how == "sleep":
        alloc.sleep(level=1)
    else:
        alloc.reserve_host_memory()
    assert alloc.stats().host.numa_node == 0, "placed on node 0"
    return (blobs, *new_mapping_of_backup_size(before))


@needs_node0
@pytest.mark.parametrize("how", ["reserve_host_memory", "sleep"])
def test_placed_backups_are_marked_dontfork_and_dontdump(alloc, fake, how):
    # Defect: the placed mapping was plain MAP_PRIVATE anonymous memory. Since Linux 5.11 fork() copies
    # DMA-pinned anonymous pages into the child eagerly (gigabytes inside fork), and a crash dumped them.
    blobs, _, _, flags = place_a_backup(alloc, fake, how, seed=61)
    assert {"dc", "dd"} <= flags, f"VmFlags {sorted(flags)}: want dc (MADV_DONTFORK) and dd (MADV_DONTDUMP)"
    if how == "sleep":
        alloc.wake_up()
    assert_blobs_intact(fake, blobs)


@needs_node0
@pytest.mark.parametrize("how", ["reserve_host_memory", "sleep"])
def test_a_forked_child_does_not_inherit_a_placed_backup(alloc, fake, how):
    blobs, start, end, _ = place_a_backup(alloc, fake, how, seed=62)
    assert not child_has_mapping(start, end), "a forked child inherited the pinned backup"
    if how == "sleep":
        alloc.wake_up()
    assert_blobs_intact(fake, blobs)


# ---------------------------------------------------------------------- b: bind, CPU-less nodes, node budget


@needs_node0
def test_placed_backups_are_bound_to_the_node_not_preferred(alloc, fake, numa_nodes):
    # Defect: MPOL_PREFERRED silently takes pages from any node when the preferred one is short; on a
    # GH200 that is the HBM node the sleep is freeing.
    numa_nodes(0, "0-1", mem_free_bytes=64 << 30)
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, [BACKUP_BYTES], seed=62)
    before = mappings()
    assert alloc.reserve_host_memory().numa_node == 0
    start, _, _ = new_mapping_of_backup_size(before)
    assert numa_policy(start) == "bind:0"
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_a_cpu_less_node_is_never_chosen(alloc, fake, numa_nodes):
    # GH200/GB200: the GPU's HBM is onlined as a NUMA node without CPUs; a "host" backup must not land there.
    numa_nodes(0, "", mem_free_bytes=64 << 30)
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, [3 * MiB], seed=63)
    registers, host_allocs = fake.call_count("cuMemHostRegister_v2"), fake.call_count("cuMemHostAlloc")
    report = alloc.reserve_host_memory()
    assert report.numa_node == -1 and report.bytes_newly_pinned == 3 * MiB
    assert fake.call_count("cuMemHostRegister_v2") == registers, "nothing was placed"
    assert fake.call_count("cuMemHostAlloc") == host_allocs + 1 + verification_pins(alloc)
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


@needs_node0
def test_a_node_short_of_free_memory_is_not_placed_on_even_when_memavailable_is_large(alloc, fake, numa_nodes):
    # Defect: only MemAvailable (the whole host, HBM included on a GH200) was checked; the node itself
    # was never asked. Its own MemFree plus reclaimable file pages is what a bound mapping can get.
    numa_nodes(0, "0-1", mem_free_bytes=MiB)
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, [3 * MiB], seed=64)
    registers = fake.call_count("cuMemHostRegister_v2")
    report = alloc.reserve_host_memory()
    assert report.numa_node == -1 and report.bytes_newly_pinned == 3 * MiB, "fell back to unplaced pinning"
    assert fake.call_count("cuMemHostRegister_v2") == registers
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)
    assert alloc.release_host_memory() == 3 * MiB
    # Reclaimable file cache on the node counts, as it does for the cgroup limit.
    numa_nodes(0, "0-1", mem_free_bytes=MiB, inactive_file_bytes=64 * MiB)
    assert alloc.reserve_host_memory().numa_node == 0
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


# ------------------------------------------------------------------------------ c: registration fallbacks


def test_a_level1_sleep_succeeds_where_host_registration_is_unsupported(alloc, fake):
    # Defect: CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED was not asked, and the refused registration
    # failed the sleep.
    fake.set_host_numa_id(0, 0)
    fake.set_host_register_supported(0, False)
    blobs = write_blobs(alloc, fake, [BACKUP_BYTES], seed=65)
    host_allocs = fake.call_count("cuMemHostAlloc")
    alloc.sleep(level=1)
    assert alloc.stats().host.numa_node == -1
    assert fake.call_count("cuMemHostAlloc") == host_allocs + 1 + verification_pins(alloc), (
        "the backup went through cuMemHostAlloc"
    )
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_a_registration_failure_other_than_out_of_memory_falls_back_to_cuMemHostAlloc(alloc, fake):
    # Defect: any cuMemHostRegister failure failed the sleep.
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, [BACKUP_BYTES], seed=66)
    host_allocs = fake.call_count("cuMemHostAlloc")
    before = mappings()
    fake.inject_fault("cuMemHostRegister_v2", nth=1, error=999)
    alloc.sleep(level=1)
    assert fake.call_count("cuMemHostRegister_v2") >= 1, "registration was tried"
    assert alloc.stats().host.numa_node == -1
    assert fake.call_count("cuMemHostAlloc") == host_allocs + 1 + verification_pins(alloc)
    leftover = [(s, e) for (s, e), flags in mappings().items() if (s, e) not in before and "dc" in flags]
    assert not leftover, f"the refused mapping was not unmapped: {leftover}"
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_out_of_memory_from_registration_is_still_a_host_memory_error(alloc, fake):
    # Not a regression: guards that the fallback above does not swallow a real shortage.
    fake.set_host_numa_id(0, 0)
    blobs = write_blobs(alloc, fake, [MiB], seed=67)
    fake.inject_fault("cuMemHostRegister_v2", nth=1, error=OUT_OF_MEMORY)
    host_allocs = fake.call_count("cuMemHostAlloc")
    with pytest.raises(gpusleep.HostOutOfMemoryError) as info:
        alloc.sleep(level=1)
    assert info.value.limited_by == "driver" and info.value.bytes_needed == MiB
    assert fake.call_count("cuMemHostAlloc") == host_allocs, "no fallback after an out-of-memory"
    assert not alloc.is_sleeping
    assert_blobs_intact(fake, blobs)
    assert alloc.sleep(level=1).bytes_offloaded == MiB
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)
