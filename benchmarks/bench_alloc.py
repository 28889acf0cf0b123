"""Global-mode allocation cost against PyTorch's native caching allocator, on the same allocation traces.

Traces: (1) the allocations of a transformer forward pass, recorded with the native allocator
(``torch.cuda.memory._record_memory_history``; the model is gpusleep.demo.model's), and (2) a seeded
synthetic mix of sizes (512 B to 64 MiB, log-uniform) with random lifetimes on 2 streams. Each allocator
replays each trace in a fresh process (global mode must be installed before any CUDA allocation) through
the same path, ``torch.cuda.caching_allocator_alloc`` / ``caching_allocator_delete``: a warm-up pass,
then timed passes; every malloc and free is timed on its own and a pair's cost is the sum of its malloc
and its free. Reports median and p99 ns per malloc/free pair.

``--fake``: the host-side cost per pair of ``_C.torch_malloc`` / ``_C.torch_free`` through the CPU driver
double (synthetic trace, plus one size repeated); no GPU, no torch CUDA. Without CUDA and without
``--fake`` it says so and exits 0.

``--free-during-sleep``: how long each ``torch_free`` of another thread takes while a level-1 sleep of 1 GiB
runs (Note [Frees never wait] in csrc/allocator.h): through ``_C`` only, on the GPU or, with ``--fake``, the
double.

Usage: python benchmarks/bench_alloc.py [--json out.json] [--passes 5] [--fake] [--free-during-sleep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Chart,
    MiB,
    cuda_available,
    emit,
    format_table,
    machine,
    needs_cuda_message,
    run_worker,
    start_driver_double,
    write_json,
)

# One trace operation: ("a", id, size_bytes, stream_index) or ("f", id, 0, stream_index).
Op = tuple[str, int, int, int]


@dataclass(frozen=True)
class PairCost:
    allocator: str
    trace: str
    pairs: int  #: malloc/free pairs timed (over all passes)
    median_ns: float
    p99_ns: float
    mean_ns: float
    #: gpusleep only: the stream-capture query global mode makes per malloc (issue: no cheaper signal
    #: exists without building against libtorch), as the core's driver-call counters timed it
    capture_query_ns_per_malloc: float = 0.0


def synthetic_trace(num_allocs: int = 4000, seed: int = 0) -> list[Op]:
    rng = random.Random(seed)
    ops: list[Op] = []
    live: list[tuple[int, int]] = []
    for i in range(num_allocs):
        size = int(2 ** rng.uniform(9, 26)) // 512 * 512 or 512
        stream = rng.randrange(2)
        ops.append(("a", i, size, stream))
        live.append((i, stream))
        while live and (rng.random() < 0.5 or len(live) > 64):
            j, s = live.pop(rng.randrange(len(live)))
            ops.append(("f", j, 0, s))
    ops += [("f", j, 0, s) for j, s in live]
    return ops


def repeated_trace(size: int = MiB, count: int = 2000) -> list[Op]:
    ops: list[Op] = []
    for i in range(count):
        ops += [("a", i, size, 0), ("f", i, 0, 0)]
    return ops


def replay(
    ops: Sequence[Op], malloc: Callable[[int, int], int], free: Callable[[int, int, int], None], passes: int
) -> list[int]:
    """One warm-up pass, then ``passes`` timed ones; returns the ns of every malloc+free pair."""
    clock = time.perf_counter_ns
    pair_ns: list[int] = []
    for p in range(passes + 1):
        live: dict[int, tuple[int, int, int]] = {}  # id -> (ptr, size, malloc ns)
        for kind, op_id, size, stream in ops:
            if kind == "a":
                t0 = clock()
                ptr = malloc(size, stream)
                t1 = clock()
                if not ptr:
                    raise MemoryError(f"replay: malloc({size}) returned NULL")
                live[op_id] = (ptr, size, t1 - t0)
            else:
                ptr, size, malloc_ns = live.pop(op_id)
                t0 = clock()
                free(ptr, size, stream)
                t1 = clock()
                if p:
                    pair_ns.append(malloc_ns + t1 - t0)
    return pair_ns


def summarize(allocator: str, trace: str, pair_ns: Sequence[int]) -> PairCost:
    ordered = sorted(pair_ns)
    return PairCost(
        allocator,
        trace,
        len(ordered),
        float(statistics.median(ordered)),
        float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]),
        float(statistics.fmean(ordered)),
    )


# ------------------------------------------------------------------------------------------- GPU
def record_forward_trace() -> list[Op]:
    """The allocations of one transformer forward pass (after a warm-up), native allocator."""
    import torch

    from gpusleep.demo.model import KVCache, TinyTransformer, TinyTransformerConfig

    cfg = TinyTransformerConfig(d_model=512, n_layers=8, n_heads=8, d_ff=2048, max_seq_len=1024)
    model = TinyTransformer(cfg).cuda()
    cache = KVCache(cfg, torch.device("cuda"))
    ids = torch.randint(cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        model.logits(model(ids, cache, 0))
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        model.logits(model(ids, cache, 0))
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    ops: list[Op] = []
    live: dict[int, int] = {}
    streams: dict[int, int] = {}
    for entry in snapshot["device_traces"][0]:
        stream = streams.setdefault(entry.get("stream", 0), len(streams) % 2)
        if entry["action"] == "alloc":
            live[entry["addr"]] = len(ops)
            ops.append(("a", len(ops), entry["size"], stream))
        elif entry["action"] == "free_requested" and entry["addr"] in live:
            ops.append(("f", live.pop(entry["addr"]), 0, stream))
    ops += [("f", i, 0, 0) for i in live.values()]
    return ops


def capture_query_ns(mallocs: int) -> float:
    """Mean ns the core spent in cuStreamGetCaptureInfo per malloc since the last counter reset."""
    from gpusleep import _C

    counters = _C.driver_counters()
    ns = sum(
        nanoseconds
        for name, (calls, nanoseconds) in counters.items()
        if name.startswith("cuStreamGetCaptureInfo") or name == "cuStreamIsCapturing"
    )
    return ns / mallocs if mallocs else 0.0


def replay_with_capture_cost(allocator: str, name: str, ops: Sequence[Op], malloc, free, passes: int) -> PairCost:
    """summarize(replay(...)), plus the capture query's cost per malloc for gpusleep."""
    if allocator.startswith("gpusleep"):
        from gpusleep import _C

        _C.reset_driver_counters()
    cost = summarize(allocator, name, replay(ops, malloc, free, passes))
    if not allocator.startswith("gpusleep"):
        return cost
    mallocs = sum(1 for op in ops if op[0] == "a") * (passes + 1)  # timed passes plus the warm-up
    return dataclasses.replace(cost, capture_query_ns_per_malloc=capture_query_ns(mallocs))


def worker(allocator: str, traces: dict[str, list[Op]], passes: int) -> list[PairCost]:
    import torch

    if allocator == "gpusleep":
        import gpusleep

        alloc = gpusleep.Allocator(log_transitions=False)
        torch.cuda.memory.change_current_allocator(alloc.pluggable())
    torch.cuda.init()
    streams = [torch.cuda.current_stream(), torch.cuda.Stream()]
    malloc = lambda size, s: torch.cuda.caching_allocator_alloc(size, 0, streams[s])  # noqa: E731
    free = lambda ptr, size, s: torch.cuda.caching_allocator_delete(ptr)  # noqa: E731
    return [replay_with_capture_cost(allocator, name, ops, malloc, free, passes) for name, ops in traces.items()]


def measure_gpu(passes: int, timeout_s: int, trace_path: Path) -> tuple[list[PairCost], list[str]]:
    errors: list[str] = []
    payload, error = run_worker(Path(__file__), ["--record-trace", str(trace_path)], timeout_s)
    traces = {"synthetic 2 streams": synthetic_trace()}
    if payload:
        traces["transformer forward"] = payload
    else:
        errors.append(f"recording the forward trace failed: {error}")
    trace_path.write_text(json.dumps(traces))
    costs: list[PairCost] = []
    for allocator in ("native", "gpusleep"):
        payload, error = run_worker(
            Path(__file__), ["--worker", allocator, "--traces", str(trace_path), "--passes", str(passes)], timeout_s
        )
        if payload:
            costs += [PairCost(**c) for c in payload]
        else:
            errors.append(f"{allocator}: {error}")
    return costs, errors


# ---------------------------------------------------------------------------------- driver double
def measure_fake(passes: int) -> list[PairCost]:
    start_driver_double(capacity_bytes=4 << 30)
    import gpusleep
    from gpusleep import _C

    alloc = gpusleep.Allocator(log_transitions=False)
    alloc._core.set_mode("global")
    streams = [0, 2]  # the legacy stream and CU_STREAM_PER_THREAD
    malloc = lambda size, s: _C.torch_malloc(size, 0, streams[s])  # noqa: E731
    free = lambda ptr, size, s: _C.torch_free(ptr, size, 0, streams[s])  # noqa: E731
    traces = {"synthetic 2 streams": synthetic_trace(), "1 MiB repeated": repeated_trace()}
    costs = [
        replay_with_capture_cost("gpusleep _C (driver double)", name, ops, malloc, free, passes)
        for name, ops in traces.items()
    ]
    noop = lambda size, s: 1  # noqa: E731
    costs.append(
        summarize(
            "Python replay loop only",
            "1 MiB repeated",
            replay(traces["1 MiB repeated"], noop, lambda p, n, s: None, passes),
        )
    )
    alloc.close()
    return costs


@dataclass
class FreeDuringSleep:
    sleep_gib: float
    sleep_s: float
    frees: int
    frees_during_sleep: int
    queued: int
    median_free_us: float
    max_free_us: float


def measure_free_during_sleep(
    fake: bool, sleep_gib: float = 1.0, small_bytes: int = 64 << 10, frees: int = 2000
) -> FreeDuringSleep:
    """One thread frees `frees` small tensors one by one while another sleeps `sleep_gib` of weights."""
    import threading

    if fake:
        start_driver_double(capacity_bytes=4 << 30)
    import gpusleep
    from gpusleep import _C

    alloc = gpusleep.Allocator(log_transitions=False)
    alloc._core.set_mode("global")
    previous = _C.set_current_tag("weights")
    weights = [_C.torch_malloc(64 * MiB, 0, 0) for _ in range(int(sleep_gib * 1024) // 64)]
    _C.set_current_tag("default")
    small = [_C.torch_malloc(small_bytes, 0, 0) for _ in range(frees)]
    _C.set_current_tag(previous)
    assert all(weights) and all(small), _C.last_torch_error()
    started, window = threading.Event(), {}

    def sleeper() -> None:
        started.set()
        t0 = time.perf_counter()
        alloc._core.sleep(1, None)
        window["sleep"] = (t0, time.perf_counter())

    thread = threading.Thread(target=sleeper)
    thread.start()
    started.wait()
    time.sleep(0.002)  # the sleep holds the allocator's lock now
    stamps = []
    for ptr in small:
        t0 = time.perf_counter()
        _C.torch_free(ptr, small_bytes, 0, 0)
        stamps.append((t0, time.perf_counter()))
    thread.join()
    begin, end = window["sleep"]
    queued = dict(alloc._core.stats().counters).get("frees_queued_during_transition", 0)
    alloc._core.wake_up(None, False)
    for ptr in weights:
        _C.torch_free(ptr, 64 * MiB, 0, 0)
    alloc.close()
    took_us = sorted((b - a) * 1e6 for a, b in stamps)
    return FreeDuringSleep(
        sleep_gib,
        end - begin,
        frees,
        sum(1 for a, b in stamps if b <= end),
        int(queued),
        statistics.median(took_us),
        took_us[-1],
    )


FREE_COLUMNS = [
    ("sleep GiB", "sleep_gib", ".2f"),
    ("sleep s", "sleep_s", ".3f"),
    ("frees", "frees", "d"),
    ("frees done during the sleep", "frees_during_sleep", "d"),
    ("queued", "queued", "d"),
    ("median µs/free", "median_free_us", ".1f"),
    ("max µs/free", "max_free_us", ".1f"),
]


COLUMNS = [
    ("allocator", "allocator", ""),
    ("trace", "trace", ""),
    ("pairs", "pairs", "d"),
    ("median ns/pair", "median_ns", ".0f"),
    ("p99 ns/pair", "p99_ns", ".0f"),
    ("mean ns/pair", "mean_ns", ".0f"),
    ("capture query ns/malloc", "capture_query_ns_per_malloc", ".0f"),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5, help="timed passes over each trace")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--fake", action="store_true", help="host-side cost through the CPU driver double")
    parser.add_argument("--timeout-s", type=int, default=600)
    parser.add_argument("--worker", choices=["native", "gpusleep"], help=argparse.SUPPRESS)
    parser.add_argument("--traces", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--record-trace", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--free-during-sleep", action="store_true", help="time torch_free on one thread while another sleeps 1 GiB"
    )
    args = parser.parse_args(argv)
    if args.free_during_sleep:
        if not args.fake and not cuda_available():
            print(needs_cuda_message("bench_alloc"))
            return 0
        result = measure_free_during_sleep(args.fake)
        info = machine("driver double (CPU, no GPU)" if args.fake else _card_name())
        print(f"bench_alloc --free-during-sleep on {info['card']}, {info['date']} ({info['command']})\n")
        print(format_table([result], FREE_COLUMNS))
        write_json(args.json, {"machine": info, "free_during_sleep": result})
        return 0
    if args.record_trace:
        emit(record_forward_trace())
        return 0
    if args.worker:
        traces = {k: [tuple(op) for op in v] for k, v in json.loads(args.traces.read_text()).items()}
        emit(worker(args.worker, traces, args.passes))
        return 0
    errors: list[str] = []
    if args.fake:
        costs, card = measure_fake(args.passes), "driver double (CPU, no GPU)"
    elif not cuda_available():
        print(needs_cuda_message("bench_alloc"))
        return 0
    else:
        import tempfile

        card = _card_name()
        with tempfile.TemporaryDirectory() as tmp:
            costs, errors = measure_gpu(args.passes, args.timeout_s, Path(tmp) / "traces.json")
    info = machine(card)
    print(f"bench_alloc on {info['card']}, {info['date']} ({info['command']})\n")
    print(format_table(costs, COLUMNS))
    for error in errors:
        print(f"error: {error}")
    bars = [(f"{c.allocator} {c.trace}", c.median_ns) for c in costs]
    write_json(
        args.json,
        {"machine": info, "costs": costs, "errors": errors},
        Chart(f"bench_alloc: malloc/free pair on {info['card']}", "median ns per pair", bars, args.fake),
    )
    return 0


def _card_name() -> str:
    """The card's name without creating a CUDA context in this (parent) process."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or "unknown card"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown card"


if __name__ == "__main__":
    sys.exit(main())
