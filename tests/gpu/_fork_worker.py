"""fork() after pinning, on a real GPU: ``python _fork_worker.py`` (review 2026-12-06 section C item 6).

Pins a few GiB with reserve_host_memory(), then forks: the child reports its RSS and whether the pinned
range is mapped in it, through a pipe. The same is measured for a baseline: an anonymous mapping registered
with cuMemHostRegister without MADV_DONTFORK (what gpusleep's placed backups were before issue 19), whose
pages Linux >= 5.11 copies into the child inside fork(). Prints one GPUSLEEP_RESULT JSON line (assertions:
test_gpu_pinned_fork.py); the timings are facts for the review, not asserted."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from cuda_driver import Driver
from gpu_workers import emit_result

import gpusleep

MiB, GiB = 1 << 20, 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")
BASELINE_BYTES = 1 * GiB


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return -1


def mappings() -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            current = tuple(int(x, 16) for x in head.split("-"))
            out[current] = []
        elif head == "VmFlags:" and current is not None:
            out[current] = line.split()[1:]
    return out


def numa_policy(start: int) -> str | None:
    for line in Path("/proc/self/numa_maps").read_text().splitlines():
        fields = line.split()
        if int(fields[0], 16) == start:
            return fields[1]
    return None


def fork_and_look(start: int, end: int) -> dict:
    """fork(); the child reports its RSS and whether [start, end) is mapped in it."""
    read_end, write_end = os.pipe()
    began = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            inherited = False
            with open("/proc/self/maps") as maps:
                for line in maps:
                    lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                    inherited = inherited or (lo < end and start < hi)
            os.write(write_end, json.dumps({"rss_bytes": rss_bytes(), "has_region": inherited}).encode())
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    fork_seconds = time.perf_counter() - began
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    return {
        "fork_seconds": fork_seconds,
        "child_exit": os.waitstatus_to_exitcode(status),
        "child_rss_bytes": report.get("rss_bytes", -1),
        "child_has_region": report.get("has_region"),
        "parent_rss_bytes": rss_bytes(),
    }


def baseline(drv: Driver, size: int) -> dict:
    """An anonymous private mapping, written, registered without MADV_DONTFORK, then forked."""
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(region)
    address = ctypes.addressof(view)
    for offset in range(0, size, PAGE):
        region[offset] = 1
    drv.check(
        "cuMemHostRegister",
        drv.lib.cuMemHostRegister_v2(ctypes.c_void_p(address), ctypes.c_size_t(size), ctypes.c_uint(0)),
    )
    try:
        return {"bytes": size, **fork_and_look(address, address + size)}
    finally:
        drv.check("cuMemHostUnregister", drv.lib.cuMemHostUnregister(ctypes.c_void_p(address)))
        del view
        region.close()


def run() -> dict:
    drv = Driver()
    drv.check("cuInit", drv.init())
    drv.check("cuCtxSetCurrent", drv.set_current(drv.primary_context(drv.device(0))))
    facts: dict = {"kernel": platform.release(), "mem_available_bytes": mem_available()}
    reserve = min(4 * GiB, mem_available() // 4) // PAGE * PAGE
    facts["reserve_bytes"] = reserve
    alloc = gpusleep.Allocator()
    weights = alloc.allocate(64 * MiB, tag="weights")
    before = mappings()
    report = alloc.reserve_host_memory(reserve)
    facts["bytes_newly_pinned"] = report.bytes_newly_pinned
    facts["pin_seconds"] = report.pin_seconds
    facts["numa_node"] = report.numa_node
    new = [(s, e, flags) for (s, e), flags in mappings().items() if e - s == reserve and (s, e) not in before]
    facts["region_found"] = len(new) == 1
    if len(new) == 1:
        start, end, flags = new[0]
        facts["vmflags"] = flags
        facts["numa_policy"] = numa_policy(start)
        facts["gpusleep"] = fork_and_look(start, end)
    else:
        facts["gpusleep"] = fork_and_look(0, 0)  # RSS and timing only: the buffer is a driver mapping
    alloc.free(weights)
    alloc.close()
    if mem_available() > 4 * BASELINE_BYTES:
        facts["baseline_no_dontfork"] = baseline(drv, BASELINE_BYTES)
    return facts


def main() -> int:
    os.environ.pop("GPUSLEEP_CUDA_DRIVER", None)
    try:
        facts, status = run(), 0
    except Exception:  # noqa: BLE001
        facts, status = {"error": traceback.format_exc()}, 1
        traceback.print_exc()
    emit_result(facts)
    return status


if __name__ == "__main__":
    sys.exit(main())
