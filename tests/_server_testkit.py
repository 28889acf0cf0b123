"""Test support for the HTTP control plane: a real uvicorn server on loopback in a thread, a fake sleep
controller that checks the gate's promises, and a model-server app with every endpoint of the spec.
(A helper module, not a test file: no tests are collected from it.)"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import anyio
import anyio.to_thread
import httpx
import uvicorn
from fastapi import FastAPI, Request

from gpusleep.server import DEFAULT_PROTECTED_PATHS, SleepModeOptions, install
from gpusleep.stats import AllocatorStats, HostMemoryReport, SleepReport, TagStats, WakeReport

SPEC_503_BODY = {
    "error": {
        "message": "Model is currently in sleep mode. Please wake it up first with a POST request to /wake_up",
        "type": "ModelSleepingError",
        "code": 503,
    }
}
UNPROTECTED_PATHS = (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"), ("GET", "/health"))
WAIT_S = 10.0  # bound of every wait loop in the tests


def report(cls, **values):
    """A stats dataclass from the fields the tests care about; fields added later default to zero."""
    missing = {
        f.name: 0
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return cls(**values, **missing)


def wait_until(predicate, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


@contextlib.contextmanager
def serve_in_thread(app, lifespan: str = "off") -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL; always stops.
    ``lifespan="on"`` runs the app's startup and shutdown (idle sleep needs it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP proto: asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


class SwitchableApp:
    """An ASGI app that forwards to ``self.app``: one uvicorn server per test module, a fresh app per test."""

    def __init__(self) -> None:
        self.app = None

    async def __call__(self, scope, receive, send) -> None:
        assert self.app is not None, "no app mounted on the loopback server"
        await self.app(scope, receive, send)


class LoopbackServer:
    """A uvicorn server on 127.0.0.1 that serves whichever app :meth:`mount` gave it last."""

    def __init__(self, base_url: str, switch: SwitchableApp) -> None:
        self.base_url = base_url
        self._switch = switch

    @contextlib.contextmanager
    def mount(self, app) -> Iterator[str]:
        self._switch.app = app
        try:
            yield self.base_url
        finally:
            self._switch.app = None


@contextlib.contextmanager
def loopback_server() -> Iterator[LoopbackServer]:
    switch = SwitchableApp()
    with serve_in_thread(switch) as base_url:
        yield LoopbackServer(base_url, switch)


class FakeController:
    """A sleep controller with two tags that records what the gate did to it.

    ``requests_running`` is maintained by the app's model endpoints; ``sleep`` records it in
    ``in_flight_at_sleep`` (the gate promises 0). ``violations`` lists any model endpoint that ran
    while asleep. ``max_concurrent_calls`` checks that sleep and wake are serialized."""

    TAGS = ("weights", "kv_cache")

    def __init__(
        self,
        *,
        with_stats: bool = False,
        wake_error: BaseException | None = None,
        sleep_error: BaseException | None = None,
        call_seconds: float = 0.0,
        check_error: BaseException | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.asleep: set = set()
        self.requests_running = 0
        self.in_flight_at_sleep: list[int] = []
        self.violations: list[str] = []
        self.sleep_calls: list[int] = []
        self.wake_calls: list[list[str] | None] = []
        self.wake_error = wake_error
        self.sleep_error = sleep_error
        self.call_seconds = call_seconds
        self._calls_now = 0
        self.max_concurrent_calls = 0
        self.hold = threading.Event()  # model endpoints called with ?hold=1 wait for it
        self.release_calls = threading.Event()  # sleep/wake wait for it while calls_blocked
        self.calls_blocked = False
        self.calls_started = 0
        self.last_level = 0
        self.check_calls: list[int] = []
        if check_error is not None:  # a controller that knows in advance it cannot sleep
            self.check_error = check_error
            self.check_sleep = self._check_sleep
        if with_stats:
            self.stats = self._stats  # only some controllers have stats()

    @property
    def is_sleeping(self) -> bool:
        with self._lock:
            return bool(self.asleep)

    @property
    def known_tags(self) -> frozenset:
        return frozenset(self.TAGS)

    def _check_sleep(self, level: int) -> None:
        self.check_calls.append(level)
        raise self.check_error

    @contextlib.contextmanager
    def _call(self):
        with self._lock:
            self._calls_now += 1
            self.calls_started += 1
            self.max_concurrent_calls = max(self.max_concurrent_calls, self._calls_now)
        try:
            if self.call_seconds:
                time.sleep(self.call_seconds)
            if self.calls_blocked:
                assert self.release_calls.wait(WAIT_S), "blocked controller call never released"
            yield
        finally:
            with self._lock:
                self._calls_now -= 1

    def sleep(self, level: int) -> SleepReport:
        with self._call():
            with self._lock:
                self.in_flight_at_sleep.append(self.requests_running)
                self.sleep_calls.append(level)
            if self.sleep_error is not None:
                raise self.sleep_error
            with self._lock:
                deepened = tuple(t for t in self.TAGS if t not in self.asleep or level > self.last_level)
                freed = sum(4096 for t in deepened if t not in self.asleep)
                self.asleep = set(self.TAGS)
                self.last_level = max(level, self.last_level) if freed == 0 else level
            offloaded = 4096 if level == 1 and "weights" in deepened and freed else 0
            return report(
                SleepReport,
                level=level,
                tags=deepened,
                bytes_offloaded=offloaded,
                bytes_discarded=freed - offloaded,
                bytes_freed=freed,
                bytes_freed_measured=freed - 1024 if freed else 0,
                seconds=0.001,
                copy_seconds=0.0005,
            )

    def wake_up(self, tags: Sequence[str] | None) -> WakeReport:
        with self._call():
            with self._lock:
                self.wake_calls.append(None if tags is None else list(tags))
            if self.wake_error is not None:
                raise self.wake_error
            with self._lock:
                woken = tuple(t for t in (self.TAGS if tags is None else tags) if t in self.asleep)
                self.asleep -= set(woken)
                restored = 4096 if "weights" in woken and self.last_level == 1 else 0
            return report(
                WakeReport,
                tags=woken,
                bytes_restored=restored,
                bytes_zeroed=4096 * len(woken) - restored,
                bytes_mapped=4096 * len(woken),
                seconds=0.002,
                copy_seconds=0.001,
            )

    def _stats(self) -> AllocatorStats:
        tags = {
            t: TagStats(
                t,
                "offload" if t == "weights" else "discard",
                t in self.asleep,
                1,
                4096,
                0 if t in self.asleep else 4096,
                4096 if t in self.asleep else 0,
                4096 if (t == "weights" and t in self.asleep and self.last_level == 1) else 0,
                0.001,
                0.002,
            )
            for t in self.TAGS
        }
        return AllocatorStats(tags, bool(self.asleep), HostMemoryReport(65536, 0, 0, 0.0), 0)

    # used by the model endpoints
    @contextlib.contextmanager
    def request_running(self, path: str):
        with self._lock:
            self.requests_running += 1
            if self.asleep:
                self.violations.append(f"{path} started while asleep")
        try:
            yield
        finally:
            with self._lock:
                if self.asleep:
                    self.violations.append(f"{path} ended while asleep")
                self.requests_running -= 1


class ModelWorkAborted(RuntimeError):
    """Raised by the held model work of :func:`make_model_app` when a sleep aborts it."""


def make_model_app(
    controller: FakeController,
    options: SleepModeOptions | None = None,
    protected_paths: Sequence[str] = DEFAULT_PROTECTED_PATHS,
) -> FastAPI:
    """A model server with every endpoint of the spec: the protected ones count themselves as running
    in ``controller`` (``?hold=1`` waits for ``controller.hold``) and echo their JSON body."""
    app = FastAPI()

    def hold_until_released(gate) -> None:
        """Model work that stops at its next check when a ``mode=abort`` sleep cancels it."""
        deadline = time.monotonic() + WAIT_S
        while not controller.hold.wait(0.005):
            if gate.aborting:
                raise ModelWorkAborted("the model is going to sleep")
            assert time.monotonic() < deadline, "held request never released"

    async def model_endpoint(request: Request) -> dict:
        path = request.url.path
        body = (await request.body()).decode()
        with controller.request_running(path):
            if request.query_params.get("hold"):
                await anyio.to_thread.run_sync(hold_until_released, app.state.gpusleep_gate)
            elif request.query_params.get("work"):
                await anyio.sleep(0.001)
        return {"path": path, "body": body, "model_ran": True}

    def unprotected_endpoint() -> dict:
        return {"ok": True}

    for path in protected_paths:
        app.add_api_route(path, model_endpoint, methods=["POST", "GET"])
    for method, path in UNPROTECTED_PATHS:
        app.add_api_route(path, unprotected_endpoint, methods=[method])
    install(app, controller, options)
    return app


# ------------------------------------------------------------------ gpusleep serve as a real process
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server(*args: str, startup_timeout_s: float = 60.0):
    """``python -m gpusleep.cli serve --port P ...`` on 127.0.0.1; returns (process, base URL) once healthy."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpusleep.cli", "serve", "--port", str(port), "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"gpusleep serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_cli_server(proc)
            raise AssertionError(f"gpusleep serve did not answer /health within {startup_timeout_s} s")
        time.sleep(0.1)


def stop_cli_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(WAIT_S)
