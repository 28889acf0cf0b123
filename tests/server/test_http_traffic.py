"""The control plane under real traffic, on a real uvicorn server on loopback: slow clients cannot hold
a sleep, a sleep that cannot happen turns nobody away, mode=abort, one transition at a time, the real
sleep depth, and probes that answer while hundreds of requests hold every model thread."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from _server_testkit import SPEC_503_BODY, WAIT_S, FakeController, loopback_server, make_model_app, wait_until

from gpusleep.errors import CaptureInProgressError, DriverUnavailableError, HostOutOfMemoryError, OutOfMemoryError
from gpusleep.server import SleepModeOptions


@pytest.fixture(scope="module")
def server():
    with loopback_server() as srv:
        yield srv


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(" ")[0] == name]
    assert len(values) == 1, f"{name} not found once in /metrics"
    return values[0]


class SlowClient:
    """A raw HTTP/1.1 client that sends the headers and part of a JSON body, and the rest when told."""

    def __init__(self, url: str, path: str, body: bytes, first_part: int) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=WAIT_S)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.rest = body[first_part:]
        self.sock.sendall(head + body[:first_part])

    def finish(self) -> tuple:
        """Send the rest of the body; return (status, JSON body) of the answer."""
        self.sock.sendall(self.rest)
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(payload)


def test_a_client_still_sending_its_body_does_not_hold_the_sleep(server):
    controller = FakeController()
    app = make_model_app(controller, SleepModeOptions(drain_timeout_seconds=2))
    gate = app.state.gpusleep_gate
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        slow = SlowClient(url, "/v1/completions", json.dumps({"prompt": "x" * 100}).encode(), first_part=10)
        try:
            r = http.post("/sleep")  # on the old gate: the slow request held the drain, then 409
            assert r.status_code == 200, r.text
            assert r.json()["is_sleeping"] is True and r.json()["drain_seconds"] >= 0
            assert controller.in_flight_at_sleep == [0]
            status, body = slow.finish()  # its body arrives while the model sleeps: the spec's 503
            assert status == 503 and body == SPEC_503_BODY
        finally:
            slow.sock.close()
        assert gate.in_flight == 0
    assert controller.violations == []


def test_a_client_sending_slowly_while_awake_is_served(server):
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url:
        slow = SlowClient(url, "/v1/embeddings", b'{"input": "abc"}', first_part=3)
        status, body = slow.finish()
    assert status == 200 and body["body"] == '{"input": "abc"}' and body["model_ran"] is True


def test_a_sleep_that_cannot_happen_turns_nobody_away(server):
    controller = FakeController(check_error=DriverUnavailableError("sleep mode needs a CUDA device"))
    app = make_model_app(controller, SleepModeOptions(drain_timeout_seconds=WAIT_S))
    gate = app.state.gpusleep_gate
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http, ThreadPoolExecutor(1) as pool:
        running = pool.submit(http.post, "/v1/completions?hold=1")
        wait_until(lambda: gate.in_flight == 1, "the held request to be admitted")
        try:
            # On the old gate this closed admission and waited for the held request (then 409).
            r = http.post("/sleep?level=1")
            assert r.status_code == 501 and r.json()["error"]["type"] == "SleepModeUnavailableError"
            assert gate.admitting and gate.in_flight == 1
            assert http.post("/v1/chat/completions").status_code == 200  # nobody turned away
        finally:
            controller.hold.set()
        assert running.result(WAIT_S).status_code == 200
    assert controller.check_calls == [1] and controller.sleep_calls == []
    assert controller.in_flight_at_sleep == []


def test_sleep_mode_abort_cancels_the_running_requests_with_503(server):
    controller = FakeController()
    app = make_model_app(controller, SleepModeOptions(drain_timeout_seconds=WAIT_S))
    gate = app.state.gpusleep_gate
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http, ThreadPoolExecutor(3) as pool:
        running = [pool.submit(http.post, p) for p in ("/v1/completions?hold=1", "/v1/embeddings?hold=1")]
        wait_until(lambda: gate.in_flight == 2, "two held requests to be admitted")
        r = http.post("/sleep?level=2&mode=abort")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["mode"] == "abort" and body["aborted_requests"] == 2 and body["level"] == 2
        for future in running:
            aborted = future.result(WAIT_S)
            assert aborted.status_code == 503 and aborted.json() == SPEC_503_BODY
        assert not gate.aborting and gate.in_flight == 0
    assert controller.in_flight_at_sleep == [0] and controller.violations == []


@pytest.mark.parametrize("query", ["?mode=later", "?mode=wait&mode=abort", "?mode="])
def test_bad_sleep_mode_is_400(server, query):
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        r = http.post(f"/sleep{query}")
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "mode" and "'wait'" in r.json()["error"]["message"]
    assert controller.sleep_calls == []


@pytest.mark.parametrize(
    "path, query, param",
    [("/sleep", "?LEVEL=2", "LEVEL"), ("/sleep", "?level=2&force=1", "force"), ("/wake_up", "?tag=weights", "tag")],
)
def test_unknown_query_parameters_are_refused(server, path, query, param):
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        r = http.post(f"{path}{query}")
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "BadRequestError" and error["param"] == param and repr(param) in error["message"]
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert controller.sleep_calls == [] and controller.wake_calls == []


def test_a_transition_under_way_refuses_a_conflicting_one_with_the_state(server):
    controller = FakeController()
    app = make_model_app(controller)
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http, ThreadPoolExecutor(1) as pool:
        controller.calls_blocked = True
        sleeping = pool.submit(http.post, "/sleep?level=2")
        wait_until(lambda: controller.calls_started == 1, "controller.sleep to start")
        try:
            r = http.post("/wake_up")
            assert r.status_code == 409 and r.headers["retry-after"] == "1"
            error = r.json()["error"]
            assert error["type"] == "TransitionInProgressError" and error["running"] == "sleep"
            assert error["is_sleeping"] is False and error["level"] == 0
        finally:
            controller.release_calls.set()
        assert sleeping.result(WAIT_S).status_code == 200
    assert controller.sleep_calls == [2] and controller.wake_calls == []


def test_a_sleep_during_a_sleep_waits_for_it_and_answers_200(server):
    """As vLLM does: a second POST /sleep is not a conflict; it waits for the running sleep, then finds
    the model asleep (at level 2, deeper than the level 1 it asked for) and changes nothing."""
    controller = FakeController()
    app = make_model_app(controller)
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http, ThreadPoolExecutor(2) as pool:
        controller.calls_blocked = True
        first = pool.submit(http.post, "/sleep?level=2")
        wait_until(lambda: controller.calls_started == 1, "controller.sleep to start")
        try:
            second = pool.submit(http.post, "/sleep?level=1")
            wait_until(lambda: app.state.gpusleep_gate._transition_ended is not None, "the second sleep to wait")
            assert not second.done(), "the second sleep answered while the first was still running"
        finally:
            controller.release_calls.set()
        assert first.result(WAIT_S).status_code == 200
        r = second.result(WAIT_S)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["already_sleeping"] is True and body["level"] == 2 and body["tags"] == []
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    assert controller.sleep_calls == [2], "the second sleep did not call the controller again"


def test_sleep_reports_the_real_depth(server):
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        first = http.post("/sleep?level=2").json()
        assert first["level"] == 2 and first["already_sleeping"] is False
        assert first["tags"] == ["weights", "kv_cache"] and first["bytes_freed"] == 8192
        again = http.post("/sleep?level=1").json()  # shallower: a no-op that says level 2
        assert again["level"] == 2 and again["requested_level"] == 1 and again["already_sleeping"] is True
        assert again["tags"] == [] and again["bytes_freed"] == 0 and again["is_sleeping"] is True
        assert _metric(http.get("/metrics").text, "gpusleep_sleep_level") == 2
        assert http.post("/sleep?level=2").json()["already_sleeping"] is True
        assert controller.sleep_calls == [2]
        woke = http.post("/wake_up").json()
        assert woke["already_awake"] is False and woke["level"] == 0
        assert woke["tags_woken"] == ["weights", "kv_cache"] and woke["bytes_mapped"] == 8192
        assert _metric(http.get("/metrics").text, "gpusleep_sleep_level") == 0
        http.post("/sleep?level=1")
        deeper = http.post("/sleep?level=2").json()  # deeper: the controller drops the host copies
        assert deeper["level"] == 2 and deeper["already_sleeping"] is True
        assert controller.sleep_calls == [2, 1, 2]


def test_sleep_after_a_staged_wake_puts_the_woken_tags_back(server):
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        http.post("/sleep?level=1")
        assert http.post("/wake_up?tags=weights").json()["is_sleeping"] is True
        r = http.post("/sleep?level=1").json()
        assert r["already_sleeping"] is True and r["tags"] == ["weights"] and r["level"] == 1
    assert controller.sleep_calls == [1, 1]


def test_wake_up_of_an_awake_model_says_so_and_keeps_serving(server):
    controller = FakeController()
    app = make_model_app(controller)
    gate = app.state.gpusleep_gate
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/v1/completions?hold=1")
        wait_until(lambda: gate.in_flight == 1, "the held request to be admitted")
        controller.calls_blocked = True
        waking = pool.submit(http.post, "/wake_up")
        wait_until(lambda: controller.calls_started == 1, "controller.wake_up to start")
        try:
            assert http.post("/v1/completions").status_code == 200  # an awake model stays open
        finally:
            controller.release_calls.set()
            controller.hold.set()
        body = waking.result(WAIT_S).json()
        assert body["already_awake"] is True and body["is_sleeping"] is False and body["tags_woken"] == []
        assert running.result(WAIT_S).status_code == 200


@pytest.mark.parametrize(
    "error, status, error_type",
    [
        (
            HostOutOfMemoryError("cuMemHostAlloc refused", 5 << 30, 1 << 30, "cgroup"),
            507,
            "InsufficientHostMemoryError",
        ),
        (CaptureInProgressError("stream 7 is capturing"), 409, "CaptureInProgressError"),
        (OutOfMemoryError("cuMemCreate failed", 3 << 30, 1 << 30, 0), 409, "InsufficientMemoryError"),
    ],
)
def test_memory_and_capture_errors_have_their_own_answer(server, error, status, error_type):
    controller = FakeController(sleep_error=error)
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        r = http.post("/sleep?level=1")
        assert r.status_code == status
        body = r.json()["error"]
        assert body["type"] == error_type and body["code"] == status and "param" in body
        if isinstance(error, HostOutOfMemoryError):
            assert "host memory" in body["message"] and "GPU" not in body["message"]
            assert body["bytes_needed"] == 5 << 30 and body["bytes_available"] == 1 << 30
            assert body["limited_by"] == "cgroup"
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}
        assert http.post("/v1/completions").status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_over_the_cap_are_413_and_never_echoed(server, chunked):
    controller = FakeController()
    app = make_model_app(controller, SleepModeOptions(max_body_bytes=1000))
    big = b'{"input": "' + b"x" * 5000 + b'"}'
    content = (part for part in (big[:2000], big[2000:])) if chunked else big
    with server.mount(app) as url, httpx.Client(base_url=url) as http:
        for path in ("/v1/embeddings", "/tokenize"):
            r = http.post(path, content=content if not chunked else (p for p in (big[:2000], big[2000:])))
            assert r.status_code == 413
            error = r.json()["error"]
            assert error["type"] == "RequestTooLargeError" and error["max_body_bytes"] == 1000
            assert len(r.content) < 1000
        assert http.post("/v1/embeddings", content=b'{"input": "ok"}').status_code == 200
    assert controller.requests_running == 0


def test_probes_answer_while_hundreds_of_requests_hold_every_model_thread(server):
    controller = FakeController(with_stats=True)
    app = make_model_app(controller)
    gate = app.state.gpusleep_gate
    held = 200  # more than the worker threads that run model work (40)

    async def scenario(url: str) -> dict:
        limits = httpx.Limits(max_connections=held + 10)
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S * 3, limits=limits) as http:
            tasks = [asyncio.create_task(http.post("/v1/completions?hold=1")) for _ in range(held)]
            while gate.in_flight < held:
                await asyncio.sleep(0.01)
            answers = {}
            # The model threads are all busy and 160 more requests queue for them: the probes must
            # still answer now, before any of them is released (on the old server they waited).
            answers["is_sleeping"] = await http.get("/is_sleeping", timeout=WAIT_S)
            answers["metrics"] = await http.get("/metrics", timeout=WAIT_S)
            answers["still_held"] = gate.in_flight
            controller.hold.set()
            answers["completions"] = await asyncio.gather(*tasks)
            return answers

    with server.mount(app) as url:
        answers = asyncio.run(scenario(url))
    assert answers["still_held"] == held
    assert answers["is_sleeping"].json() == {"is_sleeping": False}
    assert _metric(answers["metrics"].text, "gpusleep_in_flight_requests") == held
    assert [r.status_code for r in answers["completions"]] == [200] * held


def test_body_cap_option_is_validated():
    with pytest.raises(ValueError, match="max_body_bytes"):
        SleepModeOptions(max_body_bytes=0)
    assert SleepModeOptions(max_body_bytes=None).max_body_bytes is None


def test_gate_admission_counts_only_admitted_requests():
    from gpusleep.server import SleepGate

    gate = SleepGate(FakeController())
    first, second = gate.admit(), gate.admit()
    assert gate.in_flight == 2
    gate.release(first)
    gate.release(second)
    assert gate.in_flight == 0 and gate.admitting


def test_demo_probes_answer_while_hundreds_of_completions_wait_for_the_model(server):
    """The demo's /health, /v1/models and /is_sleeping answer while 200 completions hold or wait for
    every model thread (the old /health was a thread-pool function and waited behind them)."""
    pytest.importorskip("torch")
    from gpusleep.demo import TinyEngine, TinyTransformerConfig, create_app

    release = threading.Event()

    class HeldEngine(TinyEngine):
        """The demo engine, except that each generation first waits for ``release``."""

        def generate(self, prompt_ids, params, should_abort=None):
            assert release.wait(WAIT_S * 3), "held generation never released"
            return super().generate(prompt_ids, params, should_abort)

    controller = FakeController()
    app = create_app(HeldEngine(TinyTransformerConfig(d_model=16, n_heads=2, d_ff=32, max_seq_len=32)), controller)
    gate = app.state.gpusleep_gate
    held = 200

    async def scenario(url: str) -> dict:
        limits = httpx.Limits(max_connections=held + 10)
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S * 3, limits=limits) as http:
            body = {"prompt": "hi", "max_tokens": 1}
            tasks = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(held)]
            while gate.in_flight < held:
                await asyncio.sleep(0.01)
            answers = {path: await http.get(path, timeout=WAIT_S) for path in ("/health", "/v1/models", "/is_sleeping")}
            answers["still_held"] = gate.in_flight
            release.set()
            answers["completions"] = await asyncio.gather(*tasks)
            return answers

    with server.mount(app) as url:
        try:
            answers = asyncio.run(scenario(url))
        finally:
            release.set()
    assert answers["still_held"] == held
    assert answers["/health"].json() == {"status": "ok"}
    assert answers["/v1/models"].status_code == 200
    assert answers["/is_sleeping"].json() == {"is_sleeping": False}
    assert [r.status_code for r in answers["completions"]] == [200] * held


def test_demo_sleep_mode_abort_stops_the_running_generation(server):
    """The demo passes the gate's abort signal to its engine: a generation running when
    ``POST /sleep?mode=abort`` arrives stops at its next check and its client gets the spec's 503."""
    pytest.importorskip("torch")
    from gpusleep.demo import TinyEngine, TinyTransformerConfig, create_app

    started = threading.Event()

    class SlowEngine(TinyEngine):
        """Each token takes until the model is told to abort (or WAIT_S)."""

        def generate(self, prompt_ids, params, should_abort=None):
            started.set()

            def stalling_abort() -> bool:
                for _ in range(int(WAIT_S / 0.005)):
                    if should_abort():
                        return True
                    time.sleep(0.005)
                return False

            return super().generate(prompt_ids, params, stalling_abort)

    controller = FakeController()
    app = create_app(SlowEngine(TinyTransformerConfig(d_model=16, n_heads=2, d_ff=32, max_seq_len=32)), controller)
    with (
        server.mount(app) as url,
        httpx.Client(base_url=url, timeout=WAIT_S * 3) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        running = pool.submit(http.post, "/v1/completions", json={"prompt": "hi", "max_tokens": 20})
        assert started.wait(WAIT_S)
        r = http.post("/sleep?mode=abort")
        assert r.status_code == 200 and r.json()["aborted_requests"] == 1
        aborted = running.result(WAIT_S)
        assert aborted.status_code == 503 and aborted.json() == SPEC_503_BODY
    assert controller.in_flight_at_sleep == [0]
