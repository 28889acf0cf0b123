"""Sleep and wake speed against the machine's own pinned-copy bandwidth, measured in the same run.

For each weights size (``--sizes-gib``, default 1 4 16 64; sizes that do not fit the GPU or host RAM are
skipped and listed), in few large tensors and in many small ones, plus a KV cache, at level 1 and 2:
sleep and wake wall time, GB/s, GPU memory freed (``torch.cuda.mem_get_info`` delta), and a bit-exact
check (per-tensor checksums before sleep and after a level-1 wake). The baseline is a plain
``Tensor.copy_`` of the same tensors into / out of a pinned buffer allocated outside the timing; the
ratio of gpusleep's GB/s to it is the headline. Peers run side by side when importable:
torch_memory_saver and vLLM's CuMemAllocator. Each system runs in a fresh process.

gpusleep extras: driver call cost of a level-2 sleep and wake (``_C.driver_counters()``: µs per call and
per GiB), the cost of pinning the host arena (``reserve_host_memory()``), and the cost of verified wakes
(docs/verified-wakes.md): for every level-1 cycle, the time the sleep spent hashing and the time the wake
spent proving its bytes, against the copy time. ``gpusleep verify=off`` runs the same cycles unverified in
the same run, and ``gpusleep changed pieces`` times the re-sleep of kept host copies after an in-place
write to one piece in 64 (only those pieces are copied).

``--fake`` runs gpusleep through the CPU driver double (gpusleep.simulated_gpu) with small sizes: host-side costs
and copy scheduling only, against a host memcpy baseline. Without CUDA and without ``--fake`` it says
so and exits 0.

Usage: python benchmarks/bench_sleep_wake.py [--sizes-gib 1 4 16] [--json out.json] [--fake]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Chart,
    CopyBaseline,
    GiB,
    MiB,
    cuda_available,
    emit,
    format_table,
    host_bytes_available,
    machine,
    needs_cuda_message,
    pinned_copy_baseline,
    run_worker,
    start_driver_double,
    write_json,
)

LAYOUTS = ("few-large", "many-small")
VMM_CALLS = ("cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap", "cuMemRelease")
PEERS = {"torch_memory_saver": "torch_memory_saver", "vllm": "vllm"}


@dataclass(frozen=True)
class SleepWakeRow:
    system: str
    weights_gib: float
    layout: str
    tensors: int
    kv_gib: float
    level: int
    sleep_seconds: float
    wake_seconds: float
    sleep_gbps: float  #: weights bytes / sleep wall time (level 1), 0 at level 2
    wake_gbps: float
    freed_gib: float  #: GPU memory freed while asleep (mem_get_info delta; the double's used bytes)
    bit_exact: bool | None  #: level 1: checksums equal after wake; level 2: None (contents discarded)
    baseline_d2h_gbps: float
    baseline_h2d_gbps: float
    sleep_vs_copy: float  #: sleep_gbps / baseline_d2h_gbps: the headline (1.0 = as fast as a plain copy)
    wake_vs_copy: float


@dataclass(frozen=True)
class DriverCallCost:
    case: str  #: weights size and layout, e.g. "16 GiB many-small"
    phase: str  #: "sleep(level=2)" or "wake_up() after level 2"
    entry_point: str
    calls: int
    us_per_call: float
    us_per_gib: float


@dataclass(frozen=True)
class HostPinCost:
    case: str
    num_bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass(frozen=True)
class PinningRow:
    """Pinning ``num_bytes`` of host memory one way (Note [Parallel pinning] in csrc/parallel_pinning.h)."""

    path: str  #: "parallel pieces", "single registration" or "cuMemHostAlloc"
    num_bytes: int
    seconds: float  #: the fastest of the repeats
    numa_node: int  #: the node the memory was placed on; -1: cuMemHostAlloc (not placed)
    huge_page_bytes: int  #: AnonHugePages gained while pinned (/proc/self/smaps_rollup)
    threads: int
    piece_bytes: int  #: 0: one registration of the whole buffer

    @property
    def gbps(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def gib(self) -> float:
        return self.num_bytes / GiB

    @property
    def huge_page_share(self) -> float:
        return self.huge_page_bytes / self.num_bytes if self.num_bytes else 0.0


@dataclass(frozen=True)
class VerifyCost:
    case: str
    phase: str  #: "sleep(level=1)" (hashing before the copies) or "wake_up()" (proving after them)
    bytes_hashed: int
    verify_seconds: float
    copy_seconds: float
    bytes_copied: int  #: the phase's copies (a changed-piece re-sleep copies only what changed)

    @property
    def share_of_copy(self) -> float:
        return self.verify_seconds / self.copy_seconds if self.copy_seconds else 0.0


@dataclass
class SystemResult:
    system: str
    card: str = ""
    rows: list[SleepWakeRow] = field(default_factory=list)
    driver_costs: list[DriverCallCost] = field(default_factory=list)
    host_pin: list[HostPinCost] = field(default_factory=list)
    pinning: list[PinningRow] = field(default_factory=list)
    verify: list[VerifyCost] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str = ""


# ------------------------------------------------------------------------------ systems under test
class GpusleepSystem:
    name = "gpusleep"
    verify = "full"

    def __init__(self) -> None:
        import gpusleep

        self.gpusleep = gpusleep
        self.alloc = gpusleep.Allocator(log_transitions=False, verify=self.verify)
        self.alloc.use_mem_pools()

    def allocate(self, tag: str, sizes: Sequence[int]) -> list:
        import torch

        with self.alloc.tag(tag):
            return [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]

    def before_sleep(self, level: int, result: SystemResult, case: str) -> None:
        if level == 1:
            report = self.alloc.reserve_host_memory()
            if report.bytes_newly_pinned:
                result.host_pin.append(HostPinCost(case, report.bytes_newly_pinned, report.pin_seconds))
        self.gpusleep._C.reset_driver_counters()

    def sleep(self, level: int) -> None:
        self.last_sleep = self.alloc.sleep(level=level)

    def wake(self) -> None:
        self.last_wake = self.alloc.wake_up()

    def verify_costs(self, case: str) -> list[VerifyCost]:
        """The verification figures of the last level-1 sleep and wake."""
        s, w = self.last_sleep, self.last_wake
        return [
            VerifyCost(case, "sleep(level=1)", s.bytes_hashed, s.verify_seconds, s.copy_seconds, s.bytes_offloaded),
            VerifyCost(case, "wake_up()", w.bytes_verified, w.verify_seconds, w.copy_seconds, w.bytes_restored),
        ]

    def release(self) -> None:
        import torch

        torch.cuda.empty_cache()
        self.alloc.release_host_memory()


class GpusleepUnverifiedSystem(GpusleepSystem):
    """gpusleep with verification off: the same cycles, to weigh what verification costs in the same run."""

    name = "gpusleep verify=off"
    verify = "off"


class GpusleepChangedPiecesSystem(GpusleepSystem):
    """Kept host copies after an in-place update of one 4 MiB piece in 64: the timed level-1 sleep hashes
    everything on the GPU and copies only the changed pieces (no mark_changed needed)."""

    name = "gpusleep changed pieces"

    def __init__(self) -> None:
        super().__init__()
        self.alloc.set_policy("weights", "offload", keep_host_copy=True)
        self.weights: list = []

    def allocate(self, tag: str, sizes: Sequence[int]) -> list:
        tensors = super().allocate(tag, sizes)
        if tag == "weights":
            self.weights = tensors
        return tensors

    def before_sleep(self, level: int, result: SystemResult, case: str) -> None:
        if level != 1:
            raise NotImplementedError("kept host copies serve level 1 only")
        super().before_sleep(level, result, case)
        self.alloc.sleep(level=1)  # the first sleep copies everything and keeps the copy
        self.alloc.wake_up()
        piece, stride = 4 * MiB, 64 * 4 * MiB
        flat = [(t, offset) for t in self.weights for offset in range(0, t.numel(), piece)]
        for t, offset in flat[:: stride // piece]:
            t[offset] += 1  # an in-place update (an RL step), without mark_changed


class GpusleepKeptCopySystem(GpusleepSystem):
    """gpusleep with keep_host_copy on the weights: the timed level-1 sleep is a re-sleep of unchanged
    weights (a model switch), which only unmaps; the first, copying sleep and its wake run untimed."""

    name = "gpusleep kept copy"

    def __init__(self) -> None:
        super().__init__()
        self.alloc.set_policy("weights", "offload", keep_host_copy=True)

    def before_sleep(self, level: int, result: SystemResult, case: str) -> None:
        if level != 1:
            raise NotImplementedError("kept host copies serve level 1 only")
        super().before_sleep(level, result, case)
        self.alloc.mark_changed("weights")  # the weights were just written: the first sleep copies them
        self.alloc.sleep(level=1)
        self.alloc.wake_up()


class TorchMemorySaverSystem:
    name = "torch_memory_saver"

    def __init__(self) -> None:
        from torch_memory_saver import torch_memory_saver

        self.tms = torch_memory_saver
        if hasattr(self.tms, "hook_mode"):
            self.tms.hook_mode = "torch"

    def allocate(self, tag: str, sizes: Sequence[int]) -> list:
        import torch

        with self.tms.region(tag=tag, enable_cpu_backup=(tag == "weights")):
            return [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]

    def before_sleep(self, level: int, result: SystemResult, case: str) -> None:
        if level != 1:
            raise NotImplementedError("torch_memory_saver fixes the backup per region at allocation: level 1 only")

    def sleep(self, level: int) -> None:
        self.tms.pause()

    def wake(self) -> None:
        self.tms.resume()

    def release(self) -> None:
        import torch

        torch.cuda.empty_cache()


class VllmCuMemSystem:
    name = "vllm"

    def __init__(self) -> None:
        from vllm.device_allocator.cumem import CuMemAllocator

        self.allocator = CuMemAllocator.get_instance()

    def allocate(self, tag: str, sizes: Sequence[int]) -> list:
        import torch

        with self.allocator.use_memory_pool(tag=tag):
            return [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]

    def before_sleep(self, level: int, result: SystemResult, case: str) -> None:
        pass

    def sleep(self, level: int) -> None:
        self.allocator.sleep(offload_tags=("weights",) if level == 1 else ())

    def wake(self) -> None:
        self.allocator.wake_up(tags=None)

    def release(self) -> None:
        import torch

        torch.cuda.empty_cache()


SYSTEMS = {
    cls.name: cls
    for cls in (
        GpusleepSystem,
        GpusleepUnverifiedSystem,
        GpusleepKeptCopySystem,
        GpusleepChangedPiecesSystem,
        TorchMemorySaverSystem,
        VllmCuMemSystem,
    )
}


# --------------------------------------------------------------------------------- GPU measurement
def tensor_sizes(total_bytes: int, layout: str, small_bytes: int) -> list[int]:
    piece = min(total_bytes, GiB) if layout == "few-large" else small_bytes
    sizes = [piece] * (total_bytes // piece)
    if total_bytes % piece:
        sizes.append(total_bytes % piece // 8 * 8 or 8)
    return sizes


def checksums(tensors: Sequence) -> list[int]:
    """Per-tensor wrapping int64 sums of the 8-byte words (a corrupted or zeroed tensor changes its sum)."""
    import torch

    sums = torch.stack([t.view(torch.int64).sum() for t in tensors])
    return sums.cpu().tolist()


def measure_gpu(
    system_name: str,
    sizes_gib: Sequence[float],
    kv_gib: float,
    small_bytes: int,
    levels: Sequence[int],
    pin_gib: float | None = None,
) -> SystemResult:
    import torch

    result = SystemResult(system_name, card=torch.cuda.get_device_name())
    system = SYSTEMS[system_name]()
    kv_bytes = int(kv_gib * GiB)
    for size_gib in sizes_gib:
        weights_bytes = int(size_gib * GiB)
        for layout in LAYOUTS:
            free, _ = torch.cuda.mem_get_info()
            if weights_bytes + kv_bytes > 0.9 * free:
                result.skipped.append(
                    f"{size_gib} GiB {layout}: needs {(weights_bytes + kv_bytes) / GiB:.1f} GiB, "
                    f"GPU has {free / GiB:.1f} GiB free"
                )
                continue
            if weights_bytes > 0.45 * host_bytes_available():
                result.skipped.append(f"{size_gib} GiB {layout}: host RAM too small for backup + baseline")
                continue
            sizes = tensor_sizes(weights_bytes, layout, small_bytes)
            case = f"{size_gib:g} GiB {layout}"
            weights = system.allocate("weights", sizes)
            kv = system.allocate("kv_cache", [kv_bytes]) if kv_bytes else []
            for t in weights + kv:
                t.random_(0, 256)
            expected = checksums(weights)
            baseline = pinned_copy_baseline(weights)
            for level in levels:
                try:
                    system.before_sleep(level, result, case)
                except NotImplementedError as exc:
                    result.skipped.append(f"{size_gib} GiB {layout} level {level}: {exc}")
                    continue
                torch.cuda.synchronize()
                free_awake = torch.cuda.mem_get_info()[0]
                start = time.perf_counter()
                system.sleep(level)
                torch.cuda.synchronize()
                sleep_s = time.perf_counter() - start
                freed = torch.cuda.mem_get_info()[0] - free_awake
                if system_name == "gpusleep" and level == 2:
                    result.driver_costs += driver_costs(case, "sleep(level=2)", weights_bytes + kv_bytes)
                    system.gpusleep._C.reset_driver_counters()
                start = time.perf_counter()
                system.wake()
                torch.cuda.synchronize()
                wake_s = time.perf_counter() - start
                if system_name == "gpusleep" and level == 2:
                    result.driver_costs += driver_costs(case, "wake_up() after level 2", weights_bytes + kv_bytes)
                if level == 1 and hasattr(system, "verify_costs"):
                    result.verify += system.verify_costs(case)
                bit_exact = checksums(weights) == expected if level == 1 else None
                if system_name == "gpusleep changed pieces" and level == 1:
                    bit_exact = None  # the weights were updated on purpose; the verified wake proved them
                result.rows.append(
                    row(
                        system_name,
                        size_gib,
                        layout,
                        len(sizes),
                        kv_gib,
                        level,
                        sleep_s,
                        wake_s,
                        freed,
                        bit_exact,
                        baseline,
                        weights_bytes,
                    )
                )
            del weights, kv
            system.release()
    if system_name == "gpusleep":
        pin_bytes = int((max(sizes_gib) if pin_gib is None else pin_gib) * GiB)
        if pin_bytes <= 0.45 * host_bytes_available():
            anchor = system.allocate("pinning", [MiB])  # a context for the pinning
            result.pinning = measure_pinning(system.alloc, pin_bytes)
            del anchor
            system.release()
        else:
            result.skipped.append(f"pinning {pin_bytes / GiB:.1f} GiB: host RAM too small")
    return result


def row(
    system: str,
    size_gib: float,
    layout: str,
    tensors: int,
    kv_gib: float,
    level: int,
    sleep_s: float,
    wake_s: float,
    freed_bytes: int,
    bit_exact: bool | None,
    baseline: CopyBaseline,
    weights_bytes: int,
) -> SleepWakeRow:
    sleep_gbps = weights_bytes / sleep_s / 1e9 if level == 1 and sleep_s else 0.0
    wake_gbps = weights_bytes / wake_s / 1e9 if level == 1 and wake_s else 0.0
    return SleepWakeRow(
        system=system,
        weights_gib=size_gib,
        layout=layout,
        tensors=tensors,
        kv_gib=kv_gib,
        level=level,
        sleep_seconds=sleep_s,
        wake_seconds=wake_s,
        sleep_gbps=sleep_gbps,
        wake_gbps=wake_gbps,
        freed_gib=freed_bytes / GiB,
        bit_exact=bit_exact,
        baseline_d2h_gbps=baseline.d2h_gbps,
        baseline_h2d_gbps=baseline.h2d_gbps,
        sleep_vs_copy=sleep_gbps / baseline.d2h_gbps if baseline.d2h_gbps and sleep_gbps else 0.0,
        wake_vs_copy=wake_gbps / baseline.h2d_gbps if baseline.h2d_gbps and wake_gbps else 0.0,
    )


def driver_costs(case: str, phase: str, num_bytes: int) -> list[DriverCallCost]:
    from gpusleep import _C

    counters = _C.driver_counters()
    costs = []
    for name in VMM_CALLS:
        calls, total_ns = counters.get(name, (0, 0))
        if calls:
            costs.append(
                DriverCallCost(case, phase, name, calls, total_ns / calls / 1e3, total_ns / 1e3 / (num_bytes / GiB))
            )
    return costs


# ------------------------------------------------------------------------------ host pinning paths
# The environment each pinning path runs under (read by the core at every pin; Note [Parallel pinning]).
PIN_PATHS: dict[str, dict[str, str]] = {
    "cuMemHostAlloc": {"GPUSLEEP_NUMA_NODE_ROOT": "/nonexistent-gpusleep-bench"},  # no node to place on
    "single registration": {
        "GPUSLEEP_PIN_PIECE_BYTES": "0",
        "GPUSLEEP_PIN_THREADS": "1",
        "GPUSLEEP_PIN_HUGE_PAGES": "0",
    },
    "parallel pieces": {},  # the defaults
}
PIN_ENV = ("GPUSLEEP_NUMA_NODE_ROOT", "GPUSLEEP_PIN_PIECE_BYTES", "GPUSLEEP_PIN_THREADS", "GPUSLEEP_PIN_HUGE_PAGES")


def anon_huge_page_bytes() -> int:
    """This process's AnonHugePages (transparent huge pages), or 0 where /proc does not say."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_pinning(alloc: Any, num_bytes: int, repeats: int = 2) -> list[PinningRow]:
    """Pins ``num_bytes`` with ``alloc.reserve_host_memory`` along each path of PIN_PATHS, ``repeats`` times in
    turn (the fastest counts), unpinning between. The allocator must have a context (it allocated before)."""
    saved = {name: os.environ.get(name) for name in PIN_ENV}
    best: dict[str, PinningRow] = {}
    try:
        for _ in range(repeats):
            for path, env in PIN_PATHS.items():
                for name in PIN_ENV:
                    os.environ.pop(name, None)
                os.environ.update(env)
                alloc.release_host_memory()
                huge_before = anon_huge_page_bytes()
                report = alloc.reserve_host_memory(num_bytes)
                huge = max(0, anon_huge_page_bytes() - huge_before)
                alloc.release_host_memory()
                if not report.bytes_newly_pinned:
                    continue
                threads = int(env.get("GPUSLEEP_PIN_THREADS", min(8, os.cpu_count() or 1)))
                threads = 1 if path == "cuMemHostAlloc" else threads
                piece = int(env.get("GPUSLEEP_PIN_PIECE_BYTES", GiB)) if path != "cuMemHostAlloc" else 0
                candidate = PinningRow(
                    path, report.bytes_newly_pinned, report.pin_seconds, report.numa_node, huge, threads, piece
                )
                if path not in best or candidate.seconds < best[path].seconds:
                    best[path] = candidate
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return [best[p] for p in PIN_PATHS if p in best]


# ------------------------------------------------------------------------------ driver double (--fake)
def measure_fake(
    sizes_gib: Sequence[float], kv_gib: float, small_bytes: int, levels: Sequence[int], pin_gib: float | None = None
) -> SystemResult:
    """gpusleep's host-side costs through the driver double: low-level allocate(), bytes written with the
    double's copies, memcpy as the baseline."""
    import numpy as np

    kv_bytes = int(kv_gib * GiB)
    capacity = int(2 * max(sizes_gib) * GiB) + 2 * kv_bytes + 256 * MiB
    fake = start_driver_double(capacity)
    import gpusleep
    from gpusleep import _C

    result = SystemResult("gpusleep (driver double)", card="driver double (CPU, no GPU)")
    alloc = gpusleep.Allocator(log_transitions=False)
    for size_gib in sizes_gib:
        weights_bytes = int(size_gib * GiB)
        src = np.random.default_rng(0).integers(0, 256, weights_bytes, dtype=np.uint8)
        dst = np.zeros_like(src)
        memcpy_s = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            np.copyto(dst, src)
            memcpy_s = min(memcpy_s, time.perf_counter() - start)
        baseline = CopyBaseline("host memcpy", weights_bytes, memcpy_s, memcpy_s)
        for layout in LAYOUTS:
            sizes = tensor_sizes(weights_bytes, layout, small_bytes)
            case = f"{size_gib:g} GiB {layout}"
            addresses, offset = [], 0
            for n in sizes:
                address = alloc.allocate(n, tag="weights")
                fake.write(address, src[offset : offset + n].tobytes())
                addresses.append((address, n))
                offset += n
            kv = alloc.allocate(kv_bytes, tag="kv_cache") if kv_bytes else None
            digest = hashlib.sha256(src[:offset].tobytes()).hexdigest()  # the bytes the tensors hold
            for level in levels:
                if level == 1:
                    report = alloc.reserve_host_memory()
                    if report.bytes_newly_pinned:
                        result.host_pin.append(HostPinCost(case, report.bytes_newly_pinned, report.pin_seconds))
                _C.reset_driver_counters()
                used_awake = fake.used_bytes(0)
                start = time.perf_counter()
                sleep_report = alloc.sleep(level=level)
                sleep_s = time.perf_counter() - start
                freed = used_awake - fake.used_bytes(0)
                if level == 2:
                    result.driver_costs += driver_costs(case, "sleep(level=2)", weights_bytes + kv_bytes)
                    _C.reset_driver_counters()
                start = time.perf_counter()
                wake_report = alloc.wake_up()
                wake_s = time.perf_counter() - start
                if level == 2:
                    result.driver_costs += driver_costs(case, "wake_up() after level 2", weights_bytes + kv_bytes)
                else:
                    result.verify += [
                        VerifyCost(
                            case,
                            "sleep(level=1)",
                            sleep_report.bytes_hashed,
                            sleep_report.verify_seconds,
                            sleep_report.copy_seconds,
                            sleep_report.bytes_offloaded,
                        ),
                        VerifyCost(
                            case,
                            "wake_up()",
                            wake_report.bytes_verified,
                            wake_report.verify_seconds,
                            wake_report.copy_seconds,
                            wake_report.bytes_restored,
                        ),
                    ]
                bit_exact = None
                if level == 1:
                    data = b"".join(fake.read(a, n) for a, n in addresses)
                    bit_exact = hashlib.sha256(data).hexdigest() == digest
                result.rows.append(
                    row(
                        result.system,
                        size_gib,
                        layout,
                        len(sizes),
                        kv_gib,
                        level,
                        sleep_s,
                        wake_s,
                        freed,
                        bit_exact,
                        baseline,
                        weights_bytes,
                    )
                )
            for address, _ in addresses:
                alloc.free(address)
            if kv is not None:
                alloc.free(kv)
            alloc.release_host_memory()
    anchor = alloc.allocate(MiB, tag="pinning")  # a context for the pinning below
    result.pinning = measure_pinning(alloc, int((max(sizes_gib) if pin_gib is None else pin_gib) * GiB))
    alloc.free(anchor)
    alloc.close()
    return result


# ------------------------------------------------------------------------------------------ report
ROW_COLUMNS = [
    ("system", "system", ""),
    ("GiB", "weights_gib", "g"),
    ("layout", "layout", ""),
    ("tensors", "tensors", "d"),
    ("lvl", "level", "d"),
    ("sleep s", "sleep_seconds", ".3f"),
    ("wake s", "wake_seconds", ".3f"),
    ("sleep GB/s", "sleep_gbps", ".1f"),
    ("wake GB/s", "wake_gbps", ".1f"),
    ("copy D2H", "baseline_d2h_gbps", ".1f"),
    ("copy H2D", "baseline_h2d_gbps", ".1f"),
    ("sleep/copy", "sleep_vs_copy", ".2f"),
    ("wake/copy", "wake_vs_copy", ".2f"),
    ("freed GiB", "freed_gib", ".2f"),
    ("bit-exact", "bit_exact", ""),
]
VERIFY_COLUMNS = [
    ("system", "system", ""),
    ("case", "case", ""),
    ("phase", "phase", ""),
    ("GiB hashed", "gib_hashed", ".2f"),
    ("verify s", "verify_seconds", ".4f"),
    ("GiB copied", "gib_copied", ".2f"),
    ("copy s", "copy_seconds", ".3f"),
    ("verify/copy", "share_of_copy", ".1%"),
]
PINNING_COLUMNS = [
    ("path", "path", ""),
    ("GiB", "gib", ".2f"),
    ("seconds", "seconds", ".3f"),
    ("GB/s", "gbps", ".2f"),
    ("node", "numa_node", "d"),
    ("threads", "threads", "d"),
    ("on huge pages", "huge_page_share", ".0%"),
]
COST_COLUMNS = [
    ("case", "case", ""),
    ("phase", "phase", ""),
    ("entry point", "entry_point", ""),
    ("calls", "calls", "d"),
    ("µs/call", "us_per_call", ".1f"),
    ("µs/GiB", "us_per_gib", ".1f"),
]


@dataclass(frozen=True)
class _VerifyLine:
    """A VerifyCost with its system, for the table."""

    system: str
    cost: VerifyCost

    def __getattr__(self, name: str) -> Any:
        if name == "gib_hashed":
            return self.cost.bytes_hashed / GiB
        if name == "gib_copied":
            return self.cost.bytes_copied / GiB
        return getattr(self.cost, name)


def render(results: Sequence[SystemResult], info: dict) -> str:
    out = [f"bench_sleep_wake on {info['card']}, {info['date']} ({info['command']})", ""]
    rows = [r for res in results for r in res.rows]
    out.append(format_table(rows, ROW_COLUMNS) if rows else "(no rows)")
    costs = [c for res in results for c in res.driver_costs]
    if costs:
        out += ["", "Driver call cost, level 2 (gpusleep):", format_table(costs, COST_COLUMNS)]
    verify = [_VerifyLine(res.system, v) for res in results for v in res.verify]
    if verify:
        out += [
            "",
            "Verified wakes (docs/verified-wakes.md): hashing at the sleep, proving at the wake, against the copies:",
            format_table(verify, VERIFY_COLUMNS),
        ]
    pins = [p for res in results for p in res.host_pin]
    if pins:
        out += [
            "",
            "Host pinning (reserve_host_memory): "
            + ", ".join(
                f"{p.case}: {p.num_bytes / GiB:.2f} GiB in {p.seconds:.3f} s ({p.gbps:.1f} GB/s)" for p in pins
            ),
        ]
    pinning = [p for res in results for p in res.pinning]
    if pinning:
        out += [
            "",
            "Pinning paths (reserve_host_memory, fastest of the repeats; Note [Parallel pinning]):",
            format_table(pinning, PINNING_COLUMNS),
        ]
    for res in results:
        for note in res.skipped:
            out.append(f"skipped ({res.system}): {note}")
        if res.error:
            out.append(f"error ({res.system}): {res.error}")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes-gib",
        type=float,
        nargs="+",
        default=None,
        help="weights sizes in GiB (default 1 4 16 64; --fake: 0.0625 0.25)",
    )
    parser.add_argument("--kv-gib", type=float, default=None, help="KV cache size in GiB (default 1; --fake: 1/32)")
    parser.add_argument("--small-tensor-mib", type=float, default=2.0, help="tensor size of the many-small layout")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["gpusleep", "gpusleep verify=off", "gpusleep kept copy", "gpusleep changed pieces", *PEERS],
        choices=list(SYSTEMS),
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--tiers",
        action="store_true",
        help="GB/s of each host tier (pinned, pageable, file) beside memcpy and disk (docs/host-tiers.md)",
    )
    parser.add_argument("--tier-dir", type=Path, help="--tiers: directory of the file tier (default: a temp dir)")
    parser.add_argument("--fake", action="store_true", help="through the CPU driver double (host-side costs only)")
    parser.add_argument(
        "--pin-gib",
        type=float,
        default=None,
        help="GiB pinned along each pinning path (parallel pieces, single registration, cuMemHostAlloc); "
        "default: the largest size; 0: skip",
    )
    parser.add_argument("--worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--timeout-s", type=int, default=1800, help="per system")
    return parser.parse_args(argv)


def medium_baselines(num_bytes: int, directory: str) -> dict[str, float]:
    """The media's own limits, in the same run as the tiers: a host memcpy, and a disk write (with fsync) and
    read (after dropping the file's page cache) of the same bytes in ``directory``, in GB/s."""
    import numpy as np

    src = np.random.default_rng(1).integers(0, 256, num_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    start = time.perf_counter()
    np.copyto(dst, src)
    memcpy_s = time.perf_counter() - start
    path = os.path.join(directory, f"bench-baseline-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        os.write(fd, memoryview(src))
        os.fsync(fd)
        write_s = time.perf_counter() - start
        os.posix_fadvise(fd, 0, num_bytes, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        os.preadv(fd, [memoryview(dst)], 0)
        read_s = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)
    return {
        "memcpy": num_bytes / memcpy_s / 1e9,
        "disk write": num_bytes / write_s / 1e9,
        "disk read": num_bytes / read_s / 1e9,
    }


def measure_tiers(num_bytes: int, directory: str, fake: bool) -> dict[str, Any]:
    """Sleep and wake GB/s of each host tier (docs/host-tiers.md) for one tag of ``num_bytes``, beside the
    media's own limits measured in the same run. Through the driver double with ``fake`` (host-side costs)."""
    if fake:
        start_driver_double(int(2 * num_bytes) + 256 * MiB)
    import gpusleep

    out: dict[str, Any] = {"bytes": num_bytes, "tiers": {}, "baselines": medium_baselines(num_bytes, directory)}
    for tier in ("pinned", "pageable", "file"):
        alloc = gpusleep.Allocator(log_transitions=False, file_dir=directory, verify="off")
        try:
            alloc.set_policy("weights", "offload", host_tier=tier)
            alloc.allocate(num_bytes, tag="weights")
            if tier == "pinned":
                alloc.reserve_host_memory(
                    num_bytes
                )  # pinning is not part of the sleep (docs/design.md, performance targets)
            sleep = alloc.sleep(level=1)
            wake = alloc.wake_up()
            out["tiers"][tier] = {
                "sleep_gbps": num_bytes / sleep.seconds / 1e9,
                "wake_gbps": num_bytes / wake.seconds / 1e9,
            }
        finally:
            alloc.close()
    return out


def render_tiers(result: dict[str, Any], card: str) -> str:
    lines = [f"host tiers, {result['bytes'] / GiB:g} GiB, {card}", "tier      sleep GB/s  wake GB/s"]
    for tier, figures in result["tiers"].items():
        lines.append(f"{tier:<9} {figures['sleep_gbps']:>10.2f} {figures['wake_gbps']:>10.2f}")
    lines.append("media: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in result["baselines"].items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiers:
        import tempfile

        num_bytes = int((args.sizes_gib or [0.25])[0] * GiB)
        directory = str(args.tier_dir or tempfile.mkdtemp(prefix="gpusleep-bench-tiers-"))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not args.fake and not cuda_available():
            print(needs_cuda_message("bench_sleep_wake"))
            return 0
        result = measure_tiers(num_bytes, directory, args.fake)
        if args.fake:
            card = "driver double (CPU, no GPU)"
        else:
            import torch

            card = torch.cuda.get_device_name(0)
        print(render_tiers(result, card))
        if args.json:
            args.json.write_text(json.dumps({"card": card, "host_tiers": result}, indent=2))
        return 0
    small_bytes = int(args.small_tensor_mib * MiB)
    if args.worker:
        emit(measure_gpu(args.worker, args.sizes_gib, args.kv_gib, small_bytes, args.levels, args.pin_gib))
        return 0
    if args.fake:
        sizes, kv = args.sizes_gib or [0.0625, 0.25], 1 / 32 if args.kv_gib is None else args.kv_gib
        results = [measure_fake(sizes, kv, small_bytes, args.levels, args.pin_gib)]
        info = machine(results[0].card)
    else:
        if not cuda_available():
            print(needs_cuda_message("bench_sleep_wake"))
            return 0
        sizes, kv = args.sizes_gib or [1, 4, 16, 64], 1.0 if args.kv_gib is None else args.kv_gib
        results = []
        for name in args.systems:
            module = PEERS.get(name)
            if module and importlib.util.find_spec(module) is None:
                results.append(SystemResult(name, skipped=[f"{module} is not installed"]))
                continue
            worker_args = [
                "--worker",
                name,
                "--sizes-gib",
                *map(str, sizes),
                "--kv-gib",
                str(kv),
                "--small-tensor-mib",
                str(args.small_tensor_mib),
                "--levels",
                *map(str, args.levels),
                *(["--pin-gib", str(args.pin_gib)] if args.pin_gib is not None else []),
            ]
            payload, error = run_worker(Path(__file__), worker_args, args.timeout_s)
            results.append(from_payload(payload) if payload else SystemResult(name, error=error))
        info = machine(next((r.card for r in results if r.card), "unknown card"))
    print(render(results, info))
    write_json(args.json, {"machine": info, "results": results}, chart(results, info, simulated=args.fake))
    return 0


def chart(results: Sequence[SystemResult], info: dict[str, Any], simulated: bool) -> Chart:
    """Sleep and wake GB/s of every level-1 row, per system, size and layout."""
    bars = []
    for result in results:
        for row in result.rows:
            if row.level == 1:
                case = f"{row.system} {row.weights_gib:g} GiB {row.layout}"
                bars += [(f"{case} sleep", row.sleep_gbps), (f"{case} wake", row.wake_gbps)]
    return Chart(f"bench_sleep_wake: level-1 sleep and wake on {info.get('card', '?')}", "GB/s", bars, simulated)


def from_payload(payload: dict[str, Any]) -> SystemResult:
    return SystemResult(
        system=payload["system"],
        card=payload["card"],
        rows=[SleepWakeRow(**r) for r in payload["rows"]],
        driver_costs=[DriverCallCost(**c) for c in payload["driver_costs"]],
        host_pin=[HostPinCost(**p) for p in payload["host_pin"]],
        pinning=[PinningRow(**p) for p in payload.get("pinning", [])],
        verify=[VerifyCost(**v) for v in payload.get("verify", [])],
        skipped=payload["skipped"],
        error=payload["error"],
    )


if __name__ == "__main__":
    sys.exit(main())
