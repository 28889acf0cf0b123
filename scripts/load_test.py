#!/usr/bin/env python3
"""Bounded load test of the HTTP control plane: N clients send completions while one client puts the
model to sleep and wakes it up, a prober polls /health and /is_sleeping, and a few slow clients send
their bodies a byte at a time. Prints a table and writes JSON.

    python scripts/load_test.py                      # starts the demo on the CPU (simulated sleep)
    python scripts/load_test.py --url http://127.0.0.1:8000 --token T   # a running `gpusleep serve`

Without ``--url`` the demo app runs in a child process on the CPU with the embedded model and a
*simulated* sleep controller (it only flips its state after ``--sleep-call-ms``), because the CPU has
no GPU memory to release: the figures measure the HTTP control plane (admission, drain, probes), not
the allocator. Against a GPU server started with ``gpusleep serve`` the same run measures both.

What it reports: completions per second and p50/p99 latency of the answered ones; answers by status
(503 while the model sleeps is expected: these clients do not wake it); sleep and wake-up calls by
status with their latency; probe latency p50/p99/max (the control plane promises probes answer within
a second under load); and whether every sleep succeeded although slow clients were sending.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

PROMPTS = ("Once upon a time", "The GPU went to sleep and", "def main():", "Sleep mode frees")


# --------------------------------------------------------------------------- the served side (child)
class SimulatedSleepController:
    """Sleeps and wakes by flipping its state after a fixed delay (the CPU has no GPU memory to free)."""

    TAGS = ("weights", "kv_cache")

    def __init__(self, call_seconds: float) -> None:
        self.call_seconds = call_seconds
        self._asleep: set = set()

    @property
    def is_sleeping(self) -> bool:
        return bool(self._asleep)

    @property
    def known_tags(self) -> frozenset:
        return frozenset(self.TAGS)

    def sleep(self, level: int) -> None:
        time.sleep(self.call_seconds)
        self._asleep = set(self.TAGS)

    def wake_up(self, tags) -> None:
        time.sleep(self.call_seconds)
        self._asleep -= set(tags or self.TAGS)


def serve(port: int, call_seconds: float, drain_timeout_seconds: float, torch_threads: int) -> None:
    import torch
    import uvicorn

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    from gpusleep.demo import TinyEngine, create_app
    from gpusleep.server import SleepModeOptions

    app = create_app(
        TinyEngine(),
        SimulatedSleepController(call_seconds),
        SleepModeOptions(drain_timeout_seconds=drain_timeout_seconds),
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ------------------------------------------------------------------------------ the clients (parent)
@dataclass
class Figures:
    clients: int
    slow_clients: int
    duration_s: float
    mode: str
    completions_per_s: float = 0.0
    completion_p50_s: float = 0.0
    completion_p99_s: float = 0.0
    completions_by_status: dict[str, int] = field(default_factory=dict)
    sleeps_by_status: dict[str, int] = field(default_factory=dict)
    wakes_by_status: dict[str, int] = field(default_factory=dict)
    sleep_p50_s: float = 0.0
    sleep_max_s: float = 0.0
    wake_p50_s: float = 0.0
    probes: int = 0
    probe_failures: int = 0
    probe_p50_s: float = 0.0
    probe_p99_s: float = 0.0
    probe_max_s: float = 0.0
    slow_clients_by_status: dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def probe(url: str, until_epoch_s: float, every_s: float) -> tuple[list[float], int]:
    """GET /health and /is_sleeping until ``until_epoch_s``; returns the latencies and the failures."""
    import httpx

    latencies: list[float] = []
    failures = 0
    with httpx.Client(base_url=url, timeout=5.0) as http:
        while time.time() < until_epoch_s:
            for path in ("/health", "/is_sleeping"):
                t0 = time.perf_counter()
                try:
                    ok = http.get(path).status_code == 200
                except httpx.TransportError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                failures += 0 if ok else 1
            time.sleep(every_s)
    return latencies, failures


async def run_load(args: argparse.Namespace, url: str) -> Figures:
    import httpx

    figures = Figures(args.clients, args.slow_clients, args.duration_s, args.mode)
    deadline = time.monotonic() + args.duration_s
    auth = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    completion_latencies: list[float] = []
    statuses: Counter = Counter()
    sleeps: Counter = Counter()
    wakes: Counter = Counter()
    sleep_latencies: list[float] = []
    wake_latencies: list[float] = []
    probe_latencies: list[float] = []  # filled by the prober process
    slow_statuses: Counter = Counter()
    errors = 0
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)

    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as http:

        async def completer(index: int) -> None:
            nonlocal errors
            i = 0
            while time.monotonic() < deadline:
                body = {"prompt": PROMPTS[(index + i) % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0}
                i += 1
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/completions", json=body)
                except httpx.TransportError:
                    errors += 1
                    continue
                statuses[str(r.status_code)] += 1
                if r.status_code == 200:
                    completion_latencies.append(time.perf_counter() - t0)
                elif r.status_code == 503:
                    await asyncio.sleep(0.05)  # asleep: a polite client backs off a little

        async def sleeper() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                await asyncio.sleep(args.sleep_every_s)
                t0 = time.perf_counter()
                try:
                    r = await http.post("/sleep", params={"level": "1", "mode": args.mode}, headers=auth)
                except httpx.TransportError:
                    errors += 1
                    continue
                sleeps[str(r.status_code)] += 1
                sleep_latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(args.asleep_s)
                t0 = time.perf_counter()
                try:
                    r = await http.post("/wake_up", headers=auth)
                except httpx.TransportError:
                    errors += 1
                    continue
                wakes[str(r.status_code)] += 1
                wake_latencies.append(time.perf_counter() - t0)

        async def slow_client() -> None:
            parts = urlsplit(url)
            while time.monotonic() < deadline:
                body = json.dumps({"prompt": "slow", "max_tokens": 2}).encode()
                try:
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                except OSError:
                    return
                try:
                    writer.write(
                        (
                            f"POST /v1/completions HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: "
                            f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                        ).encode()
                    )
                    for byte in body:  # a byte every slow_byte_s: the drain must not wait for it
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(args.slow_byte_s)
                    head = await asyncio.wait_for(reader.readline(), args.timeout_s)
                    slow_statuses[head.split(b" ")[1].decode() if head else "none"] += 1
                except (OSError, asyncio.TimeoutError) as exc:
                    slow_statuses[f"error {type(exc).__name__}"] += 1
                finally:
                    writer.close()

        tasks = [completer(i) for i in range(args.clients)] + [sleeper()]
        tasks += [slow_client() for _ in range(args.slow_clients)]
        # The prober runs in its own process, so that its figures are the server's, not this loop's.
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            probing = asyncio.get_running_loop().run_in_executor(
                pool, probe, url, time.time() + args.duration_s, args.probe_every_s
            )
            await asyncio.gather(*tasks)
            probe_latencies, figures.probe_failures = await probing

    answered = statuses.get("200", 0)
    figures.completions_per_s = answered / args.duration_s
    figures.completion_p50_s = _quantile(completion_latencies, 0.50)
    figures.completion_p99_s = _quantile(completion_latencies, 0.99)
    figures.completions_by_status = dict(statuses)
    figures.sleeps_by_status = dict(sleeps)
    figures.wakes_by_status = dict(wakes)
    figures.sleep_p50_s = _quantile(sleep_latencies, 0.50)
    figures.sleep_max_s = max(sleep_latencies, default=0.0)
    figures.wake_p50_s = _quantile(wake_latencies, 0.50)
    figures.probes = len(probe_latencies)
    figures.probe_p50_s = _quantile(probe_latencies, 0.50)
    figures.probe_p99_s = _quantile(probe_latencies, 0.99)
    figures.probe_max_s = max(probe_latencies, default=0.0)
    figures.slow_clients_by_status = dict(slow_statuses)
    figures.transport_errors = errors
    return figures


def print_table(f: Figures) -> None:
    rows = [
        ("clients / slow clients / seconds / mode", f"{f.clients} / {f.slow_clients} / {f.duration_s:g} / {f.mode}"),
        ("completions answered per second", f"{f.completions_per_s:.1f}"),
        ("completion latency p50 / p99", f"{f.completion_p50_s * 1e3:.0f} ms / {f.completion_p99_s * 1e3:.0f} ms"),
        ("completions by status", json.dumps(f.completions_by_status, sort_keys=True)),
        ("sleeps by status / wakes by status", f"{json.dumps(f.sleeps_by_status)} / {json.dumps(f.wakes_by_status)}"),
        (
            "sleep call p50 / max, wake call p50",
            f"{f.sleep_p50_s * 1e3:.0f} ms / {f.sleep_max_s * 1e3:.0f} ms, {f.wake_p50_s * 1e3:.0f} ms",
        ),
        ("probes (failed)", f"{f.probes} ({f.probe_failures})"),
        (
            "probe latency p50 / p99 / max",
            f"{f.probe_p50_s * 1e3:.1f} ms / {f.probe_p99_s * 1e3:.1f} ms / {f.probe_max_s * 1e3:.1f} ms",
        ),
        ("slow clients by status", json.dumps(f.slow_clients_by_status, sort_keys=True)),
        ("transport errors", str(f.transport_errors)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_child(args: argparse.Namespace) -> tuple:
    import httpx

    port = _free_port()
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--serve",
        "--port",
        str(port),
        "--sleep-call-ms",
        str(args.sleep_call_ms),
        "--drain-timeout-seconds",
        str(args.drain_timeout_seconds),
        "--torch-threads",
        str(args.torch_threads),
    ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the demo server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("the demo server did not answer /health within 60 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="a running server (default: start the demo on the CPU with simulated sleep)")
    p.add_argument("--token", help="control-plane bearer token of that server")
    p.add_argument("--clients", type=int, default=32, help="concurrent completion clients (default 32)")
    p.add_argument(
        "--slow-clients", type=int, default=2, help="clients that send their body a byte at a time (default 2)"
    )
    p.add_argument(
        "--slow-byte-s", type=float, default=0.05, help="seconds between the slow clients' bytes (default 0.05)"
    )
    p.add_argument(
        "--duration-s", type=float, default=20.0, help="length of the run (default 20 s; the run is bounded)"
    )
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per completion (default 8)")
    p.add_argument("--sleep-every-s", type=float, default=1.0, help="pause between sleep/wake cycles (default 1 s)")
    p.add_argument("--asleep-s", type=float, default=0.2, help="how long each sleep lasts (default 0.2 s)")
    p.add_argument(
        "--mode", choices=("wait", "abort"), default="wait", help="sleep mode for running requests (default wait)"
    )
    p.add_argument("--probe-every-s", type=float, default=0.05, help="pause between probe rounds (default 0.05 s)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="client timeout per request (default 60 s)")
    p.add_argument("--json", default="load_test.json", help="where to write the figures (default load_test.json)")
    p.add_argument(
        "--sleep-call-ms", type=float, default=20.0, help="simulated controller: duration of sleep/wake (ms)"
    )
    p.add_argument(
        "--drain-timeout-seconds",
        "--drain-timeout-s",
        type=float,
        default=30.0,
        help="started demo: drain timeout (default 30 s)",
    )
    p.add_argument("--torch-threads", type=int, default=0, help="started demo: torch threads (default: torch's choice)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.port, args.sleep_call_ms / 1e3, args.drain_timeout_seconds, args.torch_threads)
        return 0
    proc = None
    url = args.url
    if url is None:
        proc, url = _start_child(args)
    try:
        figures = asyncio.run(run_load(args, url.rstrip("/")))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print_table(figures)
    with open(args.json, "w") as out:
        json.dump({"url": args.url or "demo on the CPU, simulated sleep", **asdict(figures)}, out, indent=2)
    print(f"figures written to {args.json}")
    healthy = figures.probe_max_s < 1.0 and figures.probe_failures == 0 and figures.transport_errors == 0
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
