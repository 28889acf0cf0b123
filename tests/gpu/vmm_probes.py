"""The VMM probe table of docs/driver-rules.md section 13.7: what the real driver answers where the docs are
silent, so the driver double (tests/fakecuda) can be made exactly as strict.

``python vmm_probes.py --out probes.json`` runs every probe in a fresh child process (a probe may leave a
sticky error or, for undefined behaviour such as a double release, crash) and writes one JSON document:

* ``facts``: granularities, default reservation alignment, whether address hints are honoured, the
  contents of fresh physical memory, cuMemGetInfo deltas around create / map / release;
* ``probes``: one entry per mapping rule (map over a mapping, unmap of a sub-range, ...), with the CUresult
  code and name of the call under test and, where relevant, of a following synchronize;
* ``no_context``: each VMM / host-memory call made from a thread without a current context;
* ``capture``: each of those calls made while a stream captures in GLOBAL, THREAD_LOCAL or RELAXED mode,
  from the capturing thread (``own``) and from another thread (``other``), with the code of
  cuStreamEndCapture afterwards (non-zero: the call invalidated the capture).

No torch, no gpusleep: ctypes on libcuda only (cuda_driver.py)."""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cuda_driver import CU_MEM_ALLOC_GRANULARITY_RECOMMENDED, Driver
from gpu_workers import emit_result, parse_result

CHILD_TIMEOUT_S = 60
HOST_BYTES = 1 << 20


class Probe:
    """A current context on device 0 and helpers that keep track of what to clean up."""

    def __init__(self) -> None:
        self.drv = Driver()
        self.drv.check("cuInit", self.drv.init())
        self.device = self.drv.device(0)
        self.ctx = self.drv.primary_context(self.device)
        self.drv.check("cuCtxSetCurrent", self.drv.set_current(self.ctx))
        rc, self.g = self.drv.granularity(self.device)
        self.drv.check("cuMemGetAllocationGranularity", rc)

    def code(self, rc: int | None) -> dict:
        return {"code": rc, "name": None if rc is None else self.drv.error_name(rc)}

    def reserve(self, size: int, hint: int = 0) -> int:
        rc, va = self.drv.reserve(size, 0, hint)
        self.drv.check("cuMemAddressReserve", rc)
        return va

    def create(self, size: int) -> int:
        rc, handle = self.drv.create(size, self.device)
        self.drv.check("cuMemCreate", rc)
        return handle

    def mapped(self, size: int, access: bool = True) -> tuple[int, int]:
        va, handle = self.reserve(size), self.create(size)
        self.drv.check("cuMemMap", self.drv.map(va, size, handle))
        if access:
            self.drv.check("cuMemSetAccess", self.drv.set_access(va, size, self.device))
        return va, handle

    def adjacent_reservations(self) -> tuple[int, int] | None:
        a = self.reserve(self.g)
        b = self.reserve(self.g, hint=a + self.g)
        return (a, b) if b == a + self.g else None

    def sync(self) -> dict:
        return self.code(self.drv.ctx_synchronize())


def host_buffer(size: int) -> tuple[mmap.mmap, int]:
    buf = mmap.mmap(-1, size)
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


# ------------------------------------------------------------------------------------------ facts
def probe_facts(p: Probe) -> dict:
    drv, g = p.drv, p.g
    rc, rec = drv.granularity(p.device, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
    alignments = {}
    for size in (g, 3 * g, 1 << 30):
        va = p.reserve(size)
        alignments[str(size)] = va & -va
        drv.address_free(va, size)
    va = p.reserve(g)
    drv.address_free(va, g)
    hint = va + (64 << 30)
    got = p.reserve(g, hint=hint)
    drv.address_free(got, g)

    def free_now() -> int:
        drv.ctx_synchronize()
        return drv.mem_get_info()[1]

    size = 32 * g
    free0 = free_now()
    va, handle = p.reserve(size), p.create(size)
    free_created = free_now()
    drv.map(va, size, handle)
    drv.set_access(va, size, p.device)
    free_mapped = free_now()
    rc_read, fresh = drv.dtoh(va, 4096)
    drv.unmap(va, size)
    free_unmapped = free_now()
    drv.release(handle)
    free_released = free_now()
    time.sleep(0.2)
    free_released_later = free_now()
    drv.address_free(va, size)
    return {
        "device_name": drv.device_name(p.device),
        "driver_version": drv.driver_version(),
        "granularity_minimum": g,
        "granularity_recommended": rec if rc == 0 else None,
        "reserve_alignment_by_size": alignments,
        "address_hint_honoured": got == hint,
        "fresh_memory_read": p.code(rc_read),
        "fresh_memory_distinct_bytes": sorted(set(fresh))[:16],
        "mem_get_info_delta": {
            "bytes": size,
            "after_create": free0 - free_created,
            "after_map": free0 - free_mapped,
            "after_unmap": free0 - free_unmapped,
            "after_release": free0 - free_released,
            "after_release_plus_200ms": free0 - free_released_later,
        },
    }


# ------------------------------------------------------------------------------------ rule probes
def probe_map_over_mapping(p: Probe) -> dict:
    va, _ = p.mapped(p.g)
    return p.code(p.drv.map(va, p.g, p.create(p.g)))


def probe_map_straddling_reservations(p: Probe) -> dict:
    pair = p.adjacent_reservations()
    if pair is None:
        return {**p.code(None), "note": "no adjacent reservations (hint not honoured)"}
    return p.code(p.drv.map(pair[0], 2 * p.g, p.create(2 * p.g)))


def probe_map_size_smaller_than_handle(p: Probe) -> dict:
    va = p.reserve(2 * p.g)
    result = p.code(p.drv.map(va, p.g, p.create(2 * p.g)))
    result["access"] = p.code(p.drv.set_access(va, p.g, p.device)) if result["code"] == 0 else None
    return result


def probe_map_nonzero_offset(p: Probe) -> dict:
    return p.code(p.drv.map(p.reserve(p.g), p.g, p.create(2 * p.g), offset=p.g))


def probe_unmap_subrange(p: Probe) -> dict:
    va, _ = p.mapped(2 * p.g)
    return p.code(p.drv.unmap(va, p.g))


def probe_unmap_two_mappings(p: Probe) -> dict:
    va = p.reserve(2 * p.g)
    p.drv.check("cuMemMap", p.drv.map(va, p.g, p.create(p.g)))
    p.drv.check("cuMemMap", p.drv.map(va + p.g, p.g, p.create(p.g)))
    return p.code(p.drv.unmap(va, 2 * p.g))


def probe_unmap_across_reservations(p: Probe) -> dict:
    pair = p.adjacent_reservations()
    if pair is None:
        return {**p.code(None), "note": "no adjacent reservations (hint not honoured)"}
    for va in pair:
        p.drv.check("cuMemMap", p.drv.map(va, p.g, p.create(p.g)))
    return p.code(p.drv.unmap(pair[0], 2 * p.g))


def probe_set_access_subrange(p: Probe) -> dict:
    va, _ = p.mapped(2 * p.g, access=False)
    return p.code(p.drv.set_access(va, p.g, p.device))


def probe_set_access_two_mappings(p: Probe) -> dict:
    va = p.reserve(2 * p.g)
    p.drv.check("cuMemMap", p.drv.map(va, p.g, p.create(p.g)))
    p.drv.check("cuMemMap", p.drv.map(va + p.g, p.g, p.create(p.g)))
    return p.code(p.drv.set_access(va, 2 * p.g, p.device))


def probe_address_free_with_live_mapping(p: Probe) -> dict:
    va, _ = p.mapped(p.g)
    return p.code(p.drv.address_free(va, p.g))


def probe_double_release(p: Probe) -> dict:
    handle = p.create(p.g)
    first = p.drv.release(handle)
    return {**p.code(p.drv.release(handle)), "first_release": p.code(first)}


def probe_release_while_mapped(p: Probe) -> dict:
    va, handle = p.mapped(p.g)
    result = p.code(p.drv.release(handle))
    result["copy_after_release"] = p.code(p.drv.htod(va, b"\x01" * 4096))
    result["unmap_after_release"] = p.code(p.drv.unmap(va, p.g))
    return result


def probe_htod_reserved_unmapped(p: Probe) -> dict:
    va = p.reserve(p.g)
    return {**p.code(p.drv.htod(va, b"\x01" * 4096)), "sync": p.sync()}


def probe_htod_mapped_no_access(p: Probe) -> dict:
    va, _ = p.mapped(p.g, access=False)
    return {**p.code(p.drv.htod(va, b"\x01" * 4096)), "sync": p.sync()}


def probe_access_reset_by_unmap(p: Probe) -> dict:
    va, handle = p.mapped(p.g)
    p.drv.check("cuMemUnmap", p.drv.unmap(va, p.g))
    p.drv.check("cuMemMap", p.drv.map(va, p.g, handle))
    return {**p.code(p.drv.htod(va, b"\x01" * 4096)), "sync": p.sync()}


def probe_contents_survive_remap(p: Probe) -> dict:
    va, handle = p.mapped(p.g)
    pattern = bytes(range(256)) * 16
    p.drv.check("cuMemcpyHtoD", p.drv.htod(va, pattern))
    p.drv.check("cuMemUnmap", p.drv.unmap(va, p.g))
    p.drv.check("cuMemMap", p.drv.map(va, p.g, handle))
    p.drv.check("cuMemSetAccess", p.drv.set_access(va, p.g, p.device))
    rc, data = p.drv.dtoh(va, len(pattern))
    return {**p.code(rc), "equal": data == pattern}


def probe_rdma_capable_create(p: Probe) -> dict:
    """The core asks for gpuDirectRDMACapable chunks where attribute 110 says RDMA with VMM works."""
    rc_attr, supported = p.drv.attribute(110, p.device)
    rc, handle = p.drv.create(p.g, p.device, rdma_capable=True)
    if rc == 0:
        p.drv.release(handle)
    return {"attribute_110": {**p.code(rc_attr), "value": supported}, **p.code(rc)}


def probe_host_numa_id(p: Probe) -> dict:
    """What the core places pinned backups by (attribute 134, CUDA >= 12.2 drivers)."""
    rc, node = p.drv.attribute(134, p.device)
    return {**p.code(rc), "value": node}


PROBES: dict[str, Callable[[Probe], dict]] = {
    name[len("probe_") :]: fn for name, fn in globals().items() if name.startswith("probe_")
}


# --------------------------------------------------------------------- calls without context / in capture
class Resources:
    """Everything one call under test may consume, prepared outside any capture, cleaned up after."""

    def __init__(self, p: Probe) -> None:
        self.p = p
        g = p.g
        self.va_for_map, self.handle_for_map = p.reserve(g), p.create(g)
        self.va_mapped, self.handle_mapped = p.mapped(g)
        self.handle_to_release = p.create(g)
        self.va_to_free = p.reserve(g)
        rc, self.pinned = p.drv.host_alloc(HOST_BYTES)
        p.drv.check("cuMemHostAlloc", rc)
        self.plain, self.plain_address = host_buffer(HOST_BYTES)
        self.registered, self.registered_address = host_buffer(HOST_BYTES)
        p.drv.check("cuMemHostRegister", p.drv.host_register(self.registered_address, HOST_BYTES))
        self.other_stream = p.drv.stream_create()
        self.created: list[tuple[str, int]] = []

    def calls(self) -> dict[str, Callable[[], int]]:
        p, drv, g = self.p, self.p.drv, self.p.g

        def keep(kind: str, rc_value: tuple[int, int]) -> int:
            rc, value = rc_value
            if rc == 0:
                self.created.append((kind, value))
            return rc

        return {
            "cuMemGetInfo": lambda: drv.mem_get_info()[0],
            "cuMemGetAllocationGranularity": lambda: drv.granularity(p.device)[0],
            "cuMemCreate": lambda: keep("handle", drv.create(g, p.device)),
            "cuMemAddressReserve": lambda: keep("va", drv.reserve(g)),
            "cuMemMap": lambda: drv.map(self.va_for_map, g, self.handle_for_map),
            "cuMemSetAccess": lambda: drv.set_access(self.va_mapped, g, p.device),
            "cuMemUnmap": lambda: drv.unmap(self.va_mapped, g),
            "cuMemRelease": lambda: drv.release(self.handle_to_release),
            "cuMemAddressFree": lambda: drv.address_free(self.va_to_free, g),
            "cuMemHostAlloc": lambda: keep("pinned", drv.host_alloc(HOST_BYTES)),
            "cuMemFreeHost": lambda: drv.free_host(self.pinned),
            "cuMemHostRegister": lambda: drv.host_register(self.plain_address, HOST_BYTES),
            "cuMemHostUnregister": lambda: drv.host_unregister(self.registered_address),
            "cuStreamSynchronize(other stream)": lambda: drv.stream_synchronize(self.other_stream),
            "cuCtxSynchronize": drv.ctx_synchronize,
        }

    def cleanup(self) -> None:
        """Best effort: every call may or may not have consumed its resource; errors are ignored."""
        drv, g = self.p.drv, self.p.g
        drv.set_current(self.p.ctx)
        drv.ctx_synchronize()
        for va in (self.va_for_map, self.va_mapped):
            drv.unmap(va, g)
        for handle in (self.handle_for_map, self.handle_mapped, self.handle_to_release):
            drv.release(handle)
        for va in (self.va_for_map, self.va_mapped, self.va_to_free):
            drv.address_free(va, g)
        drv.free_host(self.pinned)
        drv.host_unregister(self.plain_address)
        drv.host_unregister(self.registered_address)
        drv.stream_destroy(self.other_stream)
        for kind, value in self.created:
            {"handle": drv.release, "va": lambda v: drv.address_free(v, g), "pinned": drv.free_host}[kind](value)


def in_thread(fn: Callable[[], int], ctx=None, driver: Driver | None = None) -> int:
    """Run ``fn`` on a new thread (with ``ctx`` current when given) and return its CUresult."""
    out: list[int] = []

    def body() -> None:
        if ctx is not None and driver is not None:
            driver.set_current(ctx)
        out.append(fn())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(CHILD_TIMEOUT_S)
    return out[0] if out else -1


def group_no_context(p: Probe) -> dict:
    results = {}
    for name in Resources(p).calls():
        resources = Resources(p)
        results[name] = p.code(in_thread(resources.calls()[name]))
        resources.cleanup()
    return results


def group_capture(p: Probe, mode: str, where: str, caller: str = "") -> dict:
    """Each call while a capture in ``mode`` runs, on the capturing thread or another one; ``caller``
    "relaxed": the calling thread first switches its own interaction mode to RELAXED, as gpusleep does
    around creating memory and around releasing it once the device is idle (Note [Captures])."""
    results = {}
    stream = p.drv.stream_create()
    for name in Resources(p).calls():
        resources = Resources(p)
        call = resources.calls()[name]
        begin = p.drv.begin_capture(stream, mode)
        if begin != 0:
            results[name] = {"begin_capture": p.code(begin)}
            resources.cleanup()
            continue
        if caller == "relaxed":
            call = (lambda c: lambda: (p.drv.exchange_capture_mode("relaxed"), c())[1])(call)
        rc = call() if where == "own" else in_thread(call, p.ctx, p.drv)
        end_rc, graph = p.drv.end_capture(stream)
        p.drv.graph_destroy(graph)
        results[name] = {"call": p.code(rc), "end_capture": p.code(end_rc)}
        resources.cleanup()
    p.drv.stream_destroy(stream)
    return results


GROUPS: dict[str, Callable[[Probe], dict]] = {"facts": probe_facts, "no_context": group_no_context}
for _mode in ("global", "thread_local", "relaxed"):
    for _where in ("own", "other"):
        GROUPS[f"capture:{_mode}:{_where}"] = (lambda m, w: lambda p: group_capture(p, m, w))(_mode, _where)
GROUPS["capture:global:other:relaxed-caller"] = lambda p: group_capture(p, "global", "other", caller="relaxed")


# ------------------------------------------------------------------------------------------ driver
def run_child(name: str) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            cwd=Path(__file__).parent,
        )
    except subprocess.TimeoutExpired:
        return {"crashed": "timeout"}
    result = parse_result(proc.stdout)
    return result if result is not None else {"crashed": proc.returncode, "stderr": proc.stderr[-2000:]}


def child(name: str) -> int:
    try:
        p = Probe()
        fn = PROBES.get(name) or GROUPS[name]
        result = fn(p)
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        result = {"exception": f"{type(exc).__name__}: {exc}"}
    emit_result(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the probe table here (JSON)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    table = {
        "facts": run_child("facts"),
        "probes": {name: run_child(name) for name in PROBES if name != "facts"},
        "no_context": run_child("no_context"),
        "capture": {name.split(":", 1)[1]: run_child(name) for name in GROUPS if name.startswith("capture:")},
    }
    text = json.dumps(table, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    emit_result(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
