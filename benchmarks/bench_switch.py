"""Model switch time on one GPU: two demo servers behind ``gpusleep switch``, against a restart and the copy floor.

Each system is two ``gpusleep serve --device cuda --extra-weights-gib G`` servers (the embedded model plus
G GiB of seeded weights, checked after every wake) behind ``gpusleep switch`` with one model awake at a
time. Requests alternate between the two models, so each one is a switch: a level-1 sleep of one server
and the wake-up of the other. Each switch's time, and its sleep and wake-up parts, come from the switch's
``GET /switch/status`` (``recent_switches``); every answer must equal that model's first answer.

Systems: ``kept host copy`` (``--keep-host-copy``: a sleep of unchanged weights only unmaps them; it is an
error if its steady switches did not reuse the copies) and ``copying`` (every sleep copies the weights to
host memory). The servers pin their host memory at start (``--reserve-host-memory``). The first switch is
shown apart (it still copies both ways in either system); the steady state is the median of the others.
``request s`` is the time the client saw for a request that made a switch, the answer included.

Per backend kind (``--kinds``, or name them in ``--systems``): ``vllm dialect`` and ``sglang dialect`` are the
copying system driven in those dialects (``gpusleep serve`` speaks both: docs/switching-reference.md), and
``process`` is the swapper's way for engines without a sleep API: the switch launches the servers itself
and stops one and starts the other at each switch (the ``sleep s`` column is the stop, ``wake s`` the
start and readiness).

Baselines measured in the same run:
  * copy floor: a plain ``Tensor.copy_`` of G GiB to a pinned host buffer and back (``/copy floor`` divides
    a copying switch by both copies, a kept-copy switch by the host-to-device one only), the least such a
    switch can take over PCIe;
  * cold start: one server started alone (without pinning at start), from process start to its first
    answer, what a switch replaces (a lower bound of a real restart: the demo reads no weights from disk).

The table and the JSON are written again after each step (a run cut short keeps what it measured) and the
servers' logs go to ``--logs DIR`` (default: a temporary folder, deleted). Without CUDA it says so and exits 0.
    python benchmarks/bench_switch.py [--weights-gib 8] [--switches 8] [--json out.json] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Chart,
    CopyBaseline,
    GiB,
    cuda_available,
    format_table,
    host_bytes_available,
    machine,
    pinned_copy_baseline,
    write_json,
)

SYSTEMS = {
    "kept host copy": ["--keep-host-copy"],
    "copying": [],  # the headline first: a run cut short keeps it
    "vllm dialect": [],
    "sglang dialect": [],
    "process": [],
}
DEFAULT_SYSTEMS = ["kept host copy", "copying"]
#: The backend kind each system's switch configuration names (gpusleep where not listed).
KINDS = {"vllm dialect": "vllm", "sglang dialect": "sglang", "process": "process"}
GOAL_SECONDS = 1.0  # issue 13: a full switch of two 8 GB models under 1 s on an H200
PROMPT = {"prompt": "Two models share one GPU and", "max_tokens": 8, "temperature": 0.0}


@dataclass
class Server:
    """A process that answers HTTP on ``url``; ``log`` holds its stderr."""

    name: str
    proc: subprocess.Popen
    url: str
    log: Path
    started_monotonic: float
    ready_seconds: float | None = None  #: process start to GET /health 200

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@dataclass(frozen=True)
class ColdStart:
    ready_seconds: float  #: process start to GET /health 200
    first_answer_seconds: float  #: process start to the first completion answered


@dataclass
class SystemResult:
    system: str
    weights_gib: float
    records: list[dict] = field(default_factory=list)  #: the switch's records (``SwitchRecord`` as JSON)
    request_seconds: list[float] = field(default_factory=list)  #: what the client saw, one per record
    answers_ok: bool | None = None
    error: str = ""

    def steady(self) -> list[dict]:
        return self.records[1:]


@dataclass(frozen=True)
class Row:
    system: str
    gib: float
    switches: int
    first_s: float
    median_s: float
    request_s: float  #: median time the client saw for a steady switch's request
    min_s: float
    max_s: float
    sleep_s: float  #: median of the steady switches' sleep parts
    wake_s: float
    copied_gib: float  #: per steady switch, both directions
    reused_gib: float  #: per steady switch, offloaded without a copy
    vs_copy_floor: float | None  #: median switch time / copy floor time
    speedup_vs_cold_start: float | None
    under_goal: bool
    answers_ok: bool | None


COLUMNS = [
    ("system", "system", ""),
    ("GiB", "gib", ".1f"),
    ("switches", "switches", "d"),
    ("first s", "first_s", ".3f"),
    ("median s", "median_s", ".3f"),
    ("request s", "request_s", ".3f"),
    ("min s", "min_s", ".3f"),
    ("max s", "max_s", ".3f"),
    ("sleep s", "sleep_s", ".3f"),
    ("wake s", "wake_s", ".3f"),
    ("copied GiB", "copied_gib", ".2f"),
    ("reused GiB", "reused_gib", ".2f"),
    ("/copy floor", "vs_copy_floor", ".2f"),
    ("x faster than cold start", "speedup_vs_cold_start", ".1f"),
    ("< 1 s", "under_goal", ""),
    ("answers ok", "answers_ok", ""),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpusleep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpusleep.cli", *args]


def serve_command(weights_gib: float, system: str, seed: int, reserve_host_memory: bool = True) -> list[str]:
    """The command of one of ``system``'s demo servers (``--port`` is added by :func:`launch`)."""
    return gpusleep_command(
        "serve",
        "--device",
        "cuda",
        "--seed",
        str(seed),
        "--extra-weights-gib",
        str(weights_gib),
        "--log-level",
        "info",
        *SYSTEMS[system],
        *(["--reserve-host-memory"] if reserve_host_memory else []),
    )


def gpu_facts() -> tuple[str, int]:
    """The card's name and its free memory, bytes."""
    import torch

    return torch.cuda.get_device_name(), torch.cuda.mem_get_info()[0]


def launch(name: str, command: Sequence[str], logs: Path) -> Server:
    """``COMMAND --port P`` on a free port, with the real driver (never the test double)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GPUSLEEP_CUDA_DRIVER", "GPUSLEEP_TOKEN")}
    log = logs / f"{name.replace(' ', '_')}.log"
    started = time.monotonic()
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    return Server(name, proc, f"http://127.0.0.1:{port}", log, started)


def wait_ready(server: Server, timeout_s: float) -> None:
    deadline = server.started_monotonic + timeout_s
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}: {server.tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                server.ready_seconds = time.monotonic() - server.started_monotonic
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not answer GET /health within {timeout_s:g} s: {server.tail()}")
        time.sleep(0.1)


def stop(servers: Sequence[Server]) -> None:
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


def complete(client: httpx.Client, url: str, model: str) -> str:
    answer = client.post(f"{url}/v1/completions", json={**PROMPT, "model": model})
    if answer.status_code != 200:
        raise RuntimeError(f"POST {url}/v1/completions for {model!r}: HTTP {answer.status_code}: {answer.text[:1000]}")
    return answer.json()["choices"][0]["text"]


def drive_switches(
    switch_url: str,
    models: Sequence[str],
    switches: int,
    result: SystemResult,
    on_switch: Callable[[], None] = lambda: None,
    timeout_s: float = 120,
) -> None:
    """Alternate requests between ``models`` through the switch at ``switch_url`` until ``switches``
    switches are recorded in ``result`` (the switch's records and the time each request took, calling
    ``on_switch`` after each), with ``result.answers_ok``: whether every model always answered as the first
    time. Each request after the first must be exactly one switch."""
    with httpx.Client(timeout=timeout_s) as client:

        def last_record() -> dict | None:
            recent = client.get(f"{switch_url}/switch/status").json()["recent_switches"]
            return recent[-1] if recent else None

        first: dict[str, str] = {}
        result.answers_ok = True
        previous = last_record()
        for i in range(switches + 1):
            model = models[i % len(models)]
            started = time.perf_counter()
            text = complete(client, switch_url, model)
            seconds = time.perf_counter() - started
            result.answers_ok &= first.setdefault(model, text) == text
            record = last_record()
            if i > 0:
                if record is None or record == previous or record["model"] != model:
                    raise RuntimeError(f"request {i} for {model!r} went through without a switch: {record}")
                result.records.append(record)
                result.request_seconds.append(seconds)
                on_switch()
            previous = record


def summarize(result: SystemResult, floor: CopyBaseline | None, cold: ColdStart | None) -> Row | None:
    steady = result.steady()
    if not steady:
        return None
    times = [r["seconds"] for r in steady]
    median = statistics.median(times)

    def per_switch(values: list[int | None]) -> float:
        return sum(v or 0 for v in values) / len(steady) / GiB

    floor_seconds = None
    if floor is not None:
        floor_seconds = floor.h2d_seconds if result.system == "kept host copy" else floor.seconds
    return Row(
        system=result.system,
        gib=result.weights_gib,
        switches=len(result.records),
        first_s=result.records[0]["seconds"],
        median_s=median,
        request_s=statistics.median(result.request_seconds[1:]) if len(result.request_seconds) > 1 else median,
        min_s=min(times),
        max_s=max(times),
        sleep_s=statistics.median(sum(s["seconds"] for s in r["sleeps"]) for r in steady),
        wake_s=statistics.median(r["wake"]["seconds"] for r in steady),
        copied_gib=per_switch(
            [s["bytes_copied"] for r in steady for s in r["sleeps"]] + [r["wake"]["bytes_copied"] for r in steady]
        ),
        reused_gib=per_switch([s["bytes_reused"] for r in steady for s in r["sleeps"]]),
        vs_copy_floor=median / floor_seconds if floor_seconds else None,
        speedup_vs_cold_start=cold.first_answer_seconds / median if cold else None,
        under_goal=median < GOAL_SECONDS,
        answers_ok=result.answers_ok,
    )


def measure_copy_floor(num_bytes: int) -> CopyBaseline:
    """The pinned-copy baseline of ``num_bytes`` of GPU memory, out and back."""
    import torch

    device = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    floor = pinned_copy_baseline([device])
    del device
    torch.cuda.empty_cache()
    return floor


def start_backends(
    system: str, weights_gib: float, logs: Path, running: list[Server], first: Server | None = None
) -> list[Server]:
    """Launch ``system``'s two demo servers (``first``, already running, may be one); not waited for."""
    backends = [first] if first else []
    if KINDS.get(system) == "process":
        return []  # launched by the switch
    for seed in range(len(backends) + 1, 3):
        backends.append(launch(f"{system} seed {seed}", serve_command(weights_gib, system, seed), logs))
        running.append(backends[-1])
    return backends


def start_switch(
    system: str,
    backends: Sequence[Server],
    logs: Path,
    running: list[Server],
    ready_timeout_seconds: float = 180,
    weights_gib: float = 0.0,
) -> tuple[Server, list[str]]:
    """Wait for ``backends``, then put a switch in front of them; returns it and the two models' names."""
    for server in backends:
        wait_ready(server, ready_timeout_seconds)
    served = [httpx.get(f"{s.url}/v1/models", timeout=10).json()["data"][0]["id"] for s in backends]
    models = [f"{system.replace(' ', '-')}-{i}" for i in (1, 2)]
    config = logs / f"{system.replace(' ', '_')}.toml"
    kind = KINDS.get(system, "gpusleep")
    if kind == "process":  # the switch starts and stops them (Note [Launched backends] in gpusleep/switch)
        ports = [free_port() for _ in models]
        config.write_text(
            f'log_dir = "{logs}"\n'
            + "".join(
                f'[[backends]]\nmodel = "{m}"\nkind = "process"\nurl = "http://127.0.0.1:{port}"\n'
                f"ready_timeout_seconds = {ready_timeout_seconds}\ncommand = {_toml_list([*serve_command(weights_gib, system, seed), '--served-model-name', m, '--port', str(port)])}\n"  # noqa: E501
                for seed, (m, port) in enumerate(zip(models, ports, strict=False), start=1)
            )
        )
    else:
        config.write_text(
            "".join(
                f'[[backends]]\nmodel = "{m}"\nkind = "{kind}"\nurl = "{s.url}"\nserved_model = "{n}"\n'
                for m, s, n in zip(models, backends, served, strict=False)
            )
        )
    switch = launch(
        f"{system} switch", gpusleep_command("switch", "--config", str(config), "--log-level", "warning"), logs
    )
    running.append(switch)
    wait_ready(switch, 60)
    return switch, models


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"  # JSON's string escapes are TOML's


def measure_cold_start(weights_gib: float, logs: Path, ready_timeout_seconds: float = 180) -> tuple[ColdStart, Server]:
    """Start the copying system's first server alone; it stays running for that system."""
    server = launch("copying seed 1", serve_command(weights_gib, "copying", 1, reserve_host_memory=False), logs)
    try:
        wait_ready(server, ready_timeout_seconds)
        name = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        with httpx.Client(timeout=120) as client:
            complete(client, server.url, name)
        return ColdStart(server.ready_seconds or 0.0, time.monotonic() - server.started_monotonic), server
    except BaseException:
        stop([server])
        raise


def render(
    rows: Sequence[Row], results: Sequence[SystemResult], floor: CopyBaseline | None, cold: ColdStart | None, info: dict
) -> str:
    out = [f"bench_switch on {info['card']}, {info['date']} ({info['command']})", ""]
    out.append(format_table(rows, COLUMNS) if rows else "(no rows)")
    if floor:
        out.append(
            f"copy floor: {floor.num_bytes / GiB:.1f} GiB to pinned host memory and back in "
            f"{floor.seconds:.3f} s (D2H {floor.d2h_gbps:.1f} GB/s, H2D {floor.h2d_gbps:.1f} GB/s)"
        )
    if cold:
        out.append(
            f"cold start of one server: ready in {cold.ready_seconds:.1f} s, first answer after "
            f"{cold.first_answer_seconds:.1f} s"
        )
    out.append(
        f"goal (issue 13): median switch under {GOAL_SECONDS:g} s. The first switch is apart: it copies out "
        "in both systems, and the copying system's first server (the cold start) pins its host memory then"
    )
    out += [f"error ({r.system}): {r.error}" for r in results if r.error]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-gib", type=float, default=8.0, help="extra weights per server, GiB (default 8)")
    parser.add_argument("--switches", type=int, default=8, help="switches per system, at least 3 (default 8)")
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=list(SYSTEMS))
    parser.add_argument(
        "--kinds",
        action="store_true",
        help="also measure each backend kind: the vllm and sglang dialects, and process (stop and start)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--logs", type=Path, help="keep the servers' logs in this folder (default: deleted)")
    args = parser.parse_args(argv)
    if args.switches < 3 or not args.weights_gib > 0:
        parser.error("--switches must be at least 3 and --weights-gib greater than 0")
    return args


def check_reuse(result: SystemResult) -> None:
    """A kept-host-copy system whose steady sleeps still copied measures the wrong thing: say so."""
    if result.system != "kept host copy" or not result.steady():
        return
    sleeps = [s for r in result.steady() for s in r["sleeps"]]
    reused = sum(s["bytes_reused"] or 0 for s in sleeps)
    wanted = len(sleeps) * result.weights_gib * GiB * 0.99
    if reused < wanted:
        result.error = (
            f"kept host copies were not reused: the steady sleeps reused {reused / GiB:.2f} GiB, "
            f"expected about {wanted / GiB:.2f} GiB; their switch times are those of copying"
        )


def switch_chart(rows: Sequence[Row], floor: CopyBaseline | None, info: dict) -> Chart:
    """The median steady switch per system beside the copy floor measured in the same run (bench_switch runs on
    a real GPU only, so the chart is never a simulated one)."""
    bars = [(row.system, row.median_s) for row in rows]
    if floor is not None:
        bars.append(("copy floor (pinned, both ways)", floor.seconds))
    return Chart(
        f"bench_switch: one model switch of {rows[0].gib:g} GiB on {info.get('card', '?')}"
        if rows
        else f"bench_switch on {info.get('card', '?')}",
        "seconds",
        bars,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kinds:
        args.systems = list(dict.fromkeys([*args.systems, *KINDS]))
    if not cuda_available():
        print(
            "bench_switch: needs CUDA (no CUDA device or no CUDA build of torch here); nothing measured. "
            "Run it on a GPU machine; tests/switch/test_switch_processes.py drives its switches through the driver "
            "double."
        )
        return 0
    num_bytes = int(args.weights_gib * GiB) // 4 * 4
    card, free_bytes = gpu_facts()
    info = machine(card)
    results = [SystemResult(s, args.weights_gib) for s in args.systems]
    floor: CopyBaseline | None = None
    cold: ColdStart | None = None

    def report() -> None:
        """Print and write what is measured so far: a run cut short by a time limit still leaves it."""
        rows = [row for row in (summarize(r, floor, cold) for r in results) if row]
        print(render(rows, results, floor, cold, info), flush=True)
        write_json(
            args.json,
            {
                "machine": info,
                "weights_gib": args.weights_gib,
                "goal_seconds": GOAL_SECONDS,
                "copy_floor": floor,
                "cold_start": cold,
                "rows": rows,
                "results": results,
            },
            switch_chart(rows, floor, info),
        )

    needed = (2 * len(args.systems) + 1) * num_bytes
    if free_bytes < needed or host_bytes_available() < needed:
        for r in results:
            r.error = (
                f"needs about {needed / GiB:.0f} GiB free on the GPU and in host memory "
                f"({free_bytes / GiB:.0f} and {host_bytes_available() / GiB:.0f} here); lower --weights-gib"
            )
        report()
        return 1
    running: list[Server] = []
    with contextlib.ExitStack() as stack:
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            logs = args.logs
        else:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_switch_")))
        try:
            floor = measure_copy_floor(num_bytes)
            report()
            first = None
            if "copying" in args.systems:
                try:
                    cold, first = measure_cold_start(args.weights_gib, logs)
                    running.append(first)
                except Exception as exc:  # noqa: BLE001 - reported in the table; the other system still runs
                    results[args.systems.index("copying")].error = f"cold start: {exc}"
                report()
            backends = {
                r.system: start_backends(
                    r.system, args.weights_gib, logs, running, first if r.system == "copying" else None
                )
                for r in results
                if not r.error
            }  # all start at once: their start-up overlaps
            for result in results:
                if result.error:
                    continue
                try:
                    switch, models = start_switch(
                        result.system, backends[result.system], logs, running, weights_gib=args.weights_gib
                    )
                    drive_switches(switch.url, models, args.switches, result, on_switch=report)
                    check_reuse(result)
                except Exception as exc:  # noqa: BLE001
                    result.error = f"{type(exc).__name__}: {exc}"
                report()
        finally:
            stop(running)
            report()
    return 0 if all(not r.error and r.answers_ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
