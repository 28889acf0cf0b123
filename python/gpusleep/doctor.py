"""``gpusleep doctor``: does this machine give gpusleep what it needs, and do sleep and wake work on it?

One command, under a minute, no model: it reads the driver and the GPU (version, VMM and its granularity,
RDMA and host-register support, the host NUMA node, peers), then puts a few GiB through a level-1 sleep and
wake (pinned copy GB/s each way, every byte compared after the wake, the GPU memory freed as measured by the
driver), a level-2 sleep (zero-filled after the wake), and, where PyTorch has CUDA, the same in pool and
global mode with a CUDA graph captured before the sleep and replayed after the wake (each in a fresh process:
global mode must be installed before PyTorch allocates). It prints a table, or JSON with ``--json``.

Exit status: 0 when every check holds, 1 when one failed, 3 when there is no GPU (no driver, or no device).
On the simulated GPU (the host-memory driver double) every line says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _C
from .errors import DriverUnavailableError
from .stats import format_bytes

__all__ = ["Check", "DoctorReport", "run", "main", "EXIT_OK", "EXIT_FAILED", "EXIT_NO_GPU"]

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3
OK, FAILED, SKIPPED, INFO = "ok", "failed", "skipped", "info"
MiB, GiB = 1 << 20, 1 << 30
#: the round trip uses at most this share of the device's free memory
ROUND_TRIP_SHARE_OF_FREE = 0.25
#: a sleep whose measured release falls below this share of what it released fails the check
MEASURED_RELEASE_MIN_SHARE = 0.75
PIECE_BYTES = 64 * MiB  # the unit the round trip writes, hashes and compares
TORCH_CHILD_TIMEOUT_SECONDS = 300
TORCH_CHILD_TIMEOUT_S = TORCH_CHILD_TIMEOUT_SECONDS  #: the former spelling
TORCH_CHECK_MAX_BYTES = 256 * MiB  # the PyTorch checks prove the modes and the graph, not bandwidth


@dataclass(frozen=True)
class Check:
    """One line of the table."""

    name: str
    status: str  #: "ok", "failed", "skipped" or "info"
    summary: str
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]
    no_gpu: bool = False
    simulated: bool = False  #: the driver is the host-memory double, not a GPU

    @property
    def verdict(self) -> str:
        if self.no_gpu:
            return "no GPU"
        return "failed" if any(c.status == FAILED for c in self.checks) else "ok"

    @property
    def exit_code(self) -> int:
        return {"no GPU": EXIT_NO_GPU, "failed": EXIT_FAILED}.get(self.verdict, EXIT_OK)

    def table(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        label = " (SIMULATED GPU: host-memory driver double, not a real GPU)" if self.simulated else ""
        lines = [f"gpusleep doctor{label}", f"{'check':<{width}}  status   result"]
        lines += [f"{c.name:<{width}}  {c.status:<7}  {c.summary}" for c in self.checks]
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "simulated": self.simulated,
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }


def _gbps(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / 1e9 if seconds > 0 else 0.0


def _piece(index: int, num_bytes: int, block: bytes) -> bytes:
    """The bytes of piece `index`: a random block with the piece's number in front, so a piece restored at
    another offset or swapped with another shows."""
    header = index.to_bytes(8, "little") * 8
    return (header + block)[:num_bytes]


def _check_driver() -> tuple[Check | None, int]:
    try:
        count = _C.device_count()
    except DriverUnavailableError as exc:
        return Check("driver", FAILED, f"no CUDA driver: {exc}"), 0
    info = _C.device_info(0) if count else None
    version = f"CUDA {info.driver_version // 1000}.{info.driver_version % 1000 // 10}" if info else "?"
    return Check(
        "driver",
        OK if count else FAILED,
        f"{_C.driver_library_path()}, {version}, {count} device(s)",
        {
            "library": _C.driver_library_path(),
            "driver_version": info.driver_version if info else None,
            "devices": count,
        },
    ), count


def _check_device(device: int) -> tuple[Check, Any]:
    info = _C.device_info(device)
    facts = {name: getattr(info, name) for name in dir(info) if not name.startswith("_")}
    facts["peers"] = list(info.peers)
    unknown = lambda v: "unknown" if v < 0 else ("yes" if v else "no")  # noqa: E731
    summary = (
        f"{info.name}, compute {info.compute_capability_major}.{info.compute_capability_minor}, "
        f"{format_bytes(info.free_bytes)} free of {format_bytes(info.total_bytes)}; VMM {unknown(info.vmm_supported)}"
        f" (granularity {format_bytes(info.granularity_minimum_bytes)}), RDMA with VMM "
        f"{unknown(info.rdma_with_vmm_supported)}, host register {unknown(info.host_register_supported)}, "
        f"host NUMA node {info.host_numa_node if info.host_numa_node >= 0 else 'none'}, "
        f"peers {list(info.peers) or 'none'}"
    )
    return Check(f"device {device}", OK if info.vmm_supported == 1 else FAILED, summary, facts), info


def _round_trip(device: int, size_bytes: int, progress: Callable[[str], None]) -> list[Check]:
    """Level 1 and level 2 through the low-level API: fill, sleep, wake, compare every piece."""
    from .allocator import Allocator

    checks: list[Check] = []
    alloc = Allocator(log_transitions=False, verify="full")  # what this machine can prove, whatever the setting
    try:
        block = os.urandom(PIECE_BYTES)
        weights = alloc.allocate(size_bytes, tag="weights", device=device)
        kv = alloc.allocate(size_bytes // 4, tag="kv_cache", device=device)
        pieces = [(offset, min(PIECE_BYTES, size_bytes - offset)) for offset in range(0, size_bytes, PIECE_BYTES)]
        digests = []
        for index, (offset, length) in enumerate(pieces):
            data = _piece(index, length, block)
            alloc.write_device(weights + offset, data)
            digests.append(hashlib.sha256(data).digest())
        alloc.write_device(kv, b"\xff" * min(size_bytes // 4, MiB))
        alloc.reserve_host_memory()
        progress(f"doctor: level-1 sleep of {format_bytes(size_bytes)} ...")
        sleep = alloc.sleep(level=1)
        wake = alloc.wake_up()
        wrong = [
            i
            for i, (offset, length) in enumerate(pieces)
            if hashlib.sha256(alloc.read_device(weights + offset, length)).digest() != digests[i]
        ]
        kv_zero = alloc.read_device(kv, min(size_bytes // 4, MiB)) == bytes(min(size_bytes // 4, MiB))
        down, up = _gbps(sleep.bytes_offloaded, sleep.copy_seconds), _gbps(wake.bytes_restored, wake.copy_seconds)
        checks.append(
            Check(
                "level-1 round trip",
                OK if not wrong and kv_zero else FAILED,
                (
                    f"{format_bytes(size_bytes)}: every byte back at the same address"
                    if not wrong
                    else f"{len(wrong)} of {len(pieces)} pieces of {format_bytes(PIECE_BYTES)} came back wrong "
                    f"(first at offset {pieces[wrong[0]][0]})"
                )
                + ("" if kv_zero else "; kv_cache not zeroed"),
                {"bytes": size_bytes, "pieces_wrong": wrong, "kv_cache_zero_filled": kv_zero},
            )
        )
        checks.append(_verified_wake_check(sleep, wake))
        checks.append(_damage_check(alloc, weights, progress, by_hash=wake.bytes_verified_by_read_back == 0))
        checks.append(
            Check(
                "pinned copy",
                INFO,
                f"device to host {down:.1f} GB/s, host to device {up:.1f} GB/s (sleep and wake copy phases)",
                {"d2h_gbps": down, "h2d_gbps": up},
            )
        )
        share = sleep.bytes_freed_measured / sleep.bytes_freed if sleep.bytes_freed else 0.0
        checks.append(
            Check(
                "memory freed",
                OK if share >= MEASURED_RELEASE_MIN_SHARE else FAILED,
                f"released {format_bytes(sleep.bytes_freed)}, the driver's free memory rose by "
                f"{format_bytes(sleep.bytes_freed_measured)} ({share:.0%})",
                {"bytes_freed": sleep.bytes_freed, "bytes_freed_measured": sleep.bytes_freed_measured},
            )
        )
        progress("doctor: level-2 sleep ...")
        alloc.sleep(level=2)
        alloc.wake_up()
        sample = min(size_bytes, MiB)
        zero = alloc.read_device(weights, sample) == bytes(sample)
        checks.append(
            Check(
                "level-2 round trip",
                OK if zero else FAILED,
                "weights discarded and zero-filled after the wake" if zero else "weights not zero-filled",
                {"zero_filled": zero},
            )
        )
    except Exception as exc:  # noqa: BLE001 - every failure is a line of the table, not a traceback
        checks.append(Check("round trip", FAILED, f"{type(exc).__name__}: {exc}"))
    finally:
        alloc.close()
    return checks


def _verified_wake_check(sleep: Any, wake: Any) -> Check:
    """How the wake proved its bytes (Note [Verified wakes]), and what that cost against the copies."""
    if wake.bytes_verified == 0:
        return Check(
            "verified wake",
            FAILED,
            "the wake verified nothing (verification is off: GPUSLEEP_VERIFY=off?)",
            {"bytes_verified": 0},
        )
    how = "chunk hash on the GPU" if wake.bytes_verified_by_read_back == 0 else "reading back (no hash kernel)"
    share = wake.verify_seconds / wake.copy_seconds if wake.copy_seconds else 0.0
    return Check(
        "verified wake",
        OK,
        f"{format_bytes(wake.bytes_verified)} proven by {how} in {wake.verify_seconds * 1e3:.1f} ms "
        f"({share:.1%} of the restore copies; hashing at the sleep took {sleep.verify_seconds * 1e3:.1f} ms)",
        {
            "bytes_verified_by_hash": wake.bytes_verified_by_hash,
            "bytes_verified_by_read_back": wake.bytes_verified_by_read_back,
            "verify_seconds": wake.verify_seconds,
            "copy_seconds": wake.copy_seconds,
            "sleep_verify_seconds": sleep.verify_seconds,
            "verify_share_of_restore": share,
        },
    )


def _damage_check(alloc: Any, weights: int, progress: Callable[[str], None], by_hash: bool) -> Check:
    """A flipped byte in the host copy must make the wake refuse, leave the tag asleep, and a repaired copy
    must wake: proof on this GPU that nothing restored wrongly is ever served."""
    from .errors import WakeVerificationError

    if not by_hash:
        return Check(
            "damaged copy refused",
            INFO,
            "not checkable here: without the hash kernel a wake compares the restored bytes with the host "
            "copy itself, which catches a bad copy but not a host copy damaged while asleep",
            {"checked": False},
        )

    progress("doctor: a damaged host copy must be refused ...")
    alloc.sleep(level=1, tags=["weights"])
    target = weights + 12345
    alloc._flip_host_backup_byte(target)
    try:
        alloc.wake_up(tags=["weights"])
    except WakeVerificationError as exc:
        refused, blocks = True, exc.blocks
    else:
        refused, blocks = False, []
    still_asleep = "weights" in alloc.sleeping_tags
    named = any(address <= target < address + size for _, address, size in blocks)
    if still_asleep:
        alloc._flip_host_backup_byte(target)  # repair, then the wake must succeed
        alloc.wake_up(tags=["weights"])
    good = refused and still_asleep and named
    return Check(
        "damaged copy refused",
        OK if good else FAILED,
        "a flipped byte in the host copy was refused, the tag stayed asleep, the repaired copy woke"
        if good
        else f"a flipped byte in the host copy was {'refused' if refused else 'SERVED'}"
        f"{'' if still_asleep else ' and the tag woke'}",
        {"refused": refused, "still_asleep": still_asleep, "block_named": named},
    )


def _torch_checks(device: int, size_bytes: int, progress: Callable[[str], None]) -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("pytorch", SKIPPED, "PyTorch is not installed (pip install 'gpusleep[torch]')")]
    if not torch.cuda.is_available():
        return [Check("pytorch", SKIPPED, f"PyTorch {torch.__version__} has no CUDA device here")]
    checks = []
    for mode in ("pool", "global"):
        progress(f"doctor: PyTorch {mode} mode with a CUDA graph ...")
        command = [
            sys.executable,
            "-m",
            "gpusleep.doctor",
            "--torch-child",
            mode,
            "--device",
            str(device),
            "--size-bytes",
            str(min(size_bytes, TORCH_CHECK_MAX_BYTES)),
        ]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=TORCH_CHILD_TIMEOUT_SECONDS)
            facts = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        except (subprocess.TimeoutExpired, ValueError) as exc:
            proc, facts = None, {"error": f"{type(exc).__name__}: {exc}"}
        if "error" in facts or proc is None or proc.returncode != 0:
            detail = facts.get("error") or (proc.stderr[-500:] if proc is not None else "")
            checks.append(
                Check(f"pytorch {mode} mode", FAILED, detail.strip().splitlines()[-1] if detail else "failed", facts)
            )
            continue
        good = facts["weights_equal"] and facts["graph_replay_equal"] and facts["same_address"]
        checks.append(
            Check(
                f"pytorch {mode} mode",
                OK if good else FAILED,
                f"{format_bytes(facts['bytes'])} slept and woke: weights "
                f"{'bit-exact' if facts['weights_equal'] else 'WRONG'}, CUDA graph replayed after the wake "
                f"{'correctly' if facts['graph_replay_equal'] else 'WRONG'}",
                facts,
            )
        )
    return checks


def _torch_child(mode: str, device: int, size_bytes: int) -> dict[str, Any]:
    """In a fresh process: tensors under a tag, a CUDA graph that reads them, sleep, wake, replay."""
    import torch

    from .allocator import Allocator

    torch.cuda.set_device(device)
    alloc = Allocator(log_transitions=False)
    if mode == "global":
        torch.cuda.memory.change_current_allocator(alloc.pluggable())
    else:
        alloc.use_mem_pools()
    generator = torch.Generator(device="cpu").manual_seed(1)
    numel = size_bytes // 4
    with alloc.tag("weights"):
        weights = torch.randint(-(2**31), 2**31 - 1, (numel,), dtype=torch.int32, generator=generator).to("cuda")
    expected = weights.cpu()
    static_out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as PyTorch asks
        static_out.copy_(weights[: 1 << 20] ^ 0x5A5A5A5A)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        static_out.copy_(weights[: 1 << 20] ^ 0x5A5A5A5A)
    address = weights.data_ptr()
    report = alloc.sleep(level=1)
    alloc.wake_up()
    graph.replay()
    torch.cuda.synchronize()
    return {
        "mode": mode,
        "bytes": numel * 4,
        "same_address": weights.data_ptr() == address,
        "weights_equal": bool(torch.equal(weights.cpu(), expected)),
        "graph_replay_equal": bool(torch.equal(static_out.cpu(), expected[: 1 << 20] ^ 0x5A5A5A5A)),
        "bytes_freed": report.bytes_freed,
        "bytes_freed_measured": report.bytes_freed_measured,
    }


def run(
    device: int = 0,
    size_gib: float = 2.0,
    torch_checks: bool = True,
    progress: Callable[[str], None] = lambda line: None,
) -> DoctorReport:
    """Run every check on ``device``; ``size_gib`` bounds the round trips (at most a quarter of the free
    memory is used)."""
    started = time.perf_counter()
    driver, count = _check_driver()
    if count == 0:
        return DoctorReport((driver,), no_gpu=True)
    if not 0 <= device < count:
        return DoctorReport((driver, Check(f"device {device}", FAILED, f"no such device ({count} present)")))
    device_check, info = _check_device(device)
    simulated = info.name.startswith("fakecuda")
    checks = [driver, device_check]
    if device_check.status == OK:
        size_bytes = min(int(size_gib * GiB), int(info.free_bytes * ROUND_TRIP_SHARE_OF_FREE))
        size_bytes = max(size_bytes // MiB * MiB, MiB)
        checks += _round_trip(device, size_bytes, progress)
        if torch_checks:
            checks += _torch_checks(device, size_bytes, progress)
    checks.append(Check("time", INFO, f"{time.perf_counter() - started:.1f} s"))
    return DoctorReport(tuple(checks), simulated=simulated)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="gpusleep doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json-out", help="also write the JSON to this file (the table still goes to stdout)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-child", choices=("pool", "global"), help=argparse.SUPPRESS)
    parser.add_argument("--size-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_child:
        try:
            facts = _torch_child(args.torch_child, args.device, args.size_bytes)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as a failed check
            facts = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(facts))
        return 0 if "error" not in facts else 1
    report = run(args.device, args.size_gib, not args.no_torch, progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as out:
            json.dump(report.as_dict(), out, indent=2)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
