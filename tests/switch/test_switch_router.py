"""``gpusleep switch`` in front of several model servers (issue 13, part 2): real uvicorn servers on
loopback, each with ``gpusleep.server`` installed over a fake controller, and the switch app in front.
A shared monitor checks, at every wake-up a backend sees, that the awake backends fit the budget."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest
from _server_testkit import FakeController, serve_in_thread, wait_until
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from gpusleep.server import install
from gpusleep.switch import create_switch_app, parse_config

pytestmark = pytest.mark.timeout(90)


class Monitor:
    """What the backends saw, across all of them: which are awake, and the most GPU memory ever awake."""

    def __init__(self, memory_bytes: dict[str, int]) -> None:
        self.memory_bytes = memory_bytes
        self.controllers: dict[str, Backend] = {}
        self.max_awake_bytes = 0
        self.max_awake_count = 0
        self.lock = threading.Lock()

    def after_wake(self) -> None:
        with self.lock:
            awake = [m for m, c in self.controllers.items() if not c.is_sleeping]
            self.max_awake_count = max(self.max_awake_count, len(awake))
            self.max_awake_bytes = max(self.max_awake_bytes, sum(self.memory_bytes[m] for m in awake))


class Backend(FakeController):
    def __init__(self, model: str, monitor: Monitor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.monitor = monitor
        self.asleep = set(self.TAGS)  # every backend starts asleep
        self.served = 0
        self.big_responses_started = 0
        self.big_responses_sent = 0
        monitor.controllers[model] = self

    def wake_up(self, tags):
        report = super().wake_up(tags)
        self.monitor.after_wake()
        return report


def big_body(num_bytes: int) -> bytes:
    pattern = bytes(range(256)) * 256
    return (pattern * (num_bytes // len(pattern) + 1))[:num_bytes]


def backend_app(backend: Backend) -> FastAPI:
    """A model server: completions answer with the model that ran and the prompt, streamed on request;
    with ``"big_bytes": N`` the answer is N patterned bytes in 64 KiB chunks (``big_body``)."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        with backend.request_running("/v1/completions"):
            backend.served += 1
            if body.get("model") != backend.model:
                return {"error": f"{backend.model} got a request for {body.get('model')}"}
            if body.get("big_bytes"):
                data = big_body(body["big_bytes"])

                async def chunks():
                    with backend.request_running("/v1/completions big"):
                        backend.big_responses_started += 1
                        for start in range(0, len(data), 1 << 16):
                            yield data[start : start + (1 << 16)]
                        backend.big_responses_sent += 1

                return StreamingResponse(chunks(), media_type="application/octet-stream")
            if not body.get("stream"):
                return {"model": backend.model, "text": body["prompt"][::-1]}

        async def events():
            with backend.request_running("/v1/completions stream"):
                for ch in body["prompt"][::-1]:
                    yield f"data: {json.dumps({'model': backend.model, 'text': ch})}\n\n"
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    install(app, backend)
    return app


@contextlib.contextmanager
def switch_over(
    memory_bytes: dict[str, int], budget: int | None = None, backend_kwargs: dict | None = None, **switch_config
) -> Iterator[tuple]:
    """Backends for ``memory_bytes``'s models and a switch in front (``switch_config``: more of its
    configuration); yields (switch client, backends, monitor)."""
    monitor = Monitor(memory_bytes)
    backends = {m: Backend(m, monitor, **(backend_kwargs or {}).get(m, {})) for m in memory_bytes}
    with contextlib.ExitStack() as stack:
        urls = {m: stack.enter_context(serve_in_thread(backend_app(b))) for m, b in backends.items()}
        raw = {
            "backends": [{"model": m, "url": urls[m], "gpu_memory_bytes": memory_bytes[m]} for m in memory_bytes],
            "switch_timeout_s": 30,
            **switch_config,
        }
        if budget is not None:
            raw["gpu_memory_budget_bytes"] = budget
        switch_url = stack.enter_context(serve_in_thread(create_switch_app(parse_config(raw))))
        client = stack.enter_context(httpx.Client(base_url=switch_url, timeout=30))
        yield client, backends, monitor


def complete(client: httpx.Client, model: str, prompt: str, stream: bool = False) -> str:
    """The completion's text through the switch; checks it came from ``model``."""
    body = {"model": model, "prompt": prompt, "stream": stream}
    if not stream:
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model, answer.json()
        return answer.json()["text"]
    text = []
    with client.stream("POST", "/v1/completions", json=body) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: ") :])
                assert event["model"] == model
                text.append(event["text"])
    return "".join(text)


def metric(client: httpx.Client, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_request_mix_forces_switches_every_answer_is_right_and_one_model_is_awake_at_a_time():
    models = {"alpha": 1, "beta": 1, "gamma": 1}
    with switch_over(models) as (client, backends, monitor):
        rng = random.Random(13)
        jobs = [(rng.choice(sorted(models)), f"prompt {i}", i % 3 == 0) for i in range(60)]
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(lambda job: complete(client, *job), jobs))
        assert texts == [prompt[::-1] for _, prompt, _ in jobs]
        assert monitor.max_awake_count == 1
        switches = metric(client, "gpusleep_switch_switches_total")
        assert switches >= 3 and switches == sum(len(b.wake_calls) for b in backends.values())
        assert metric(client, "gpusleep_switch_duration_seconds_count") == switches
        assert metric(client, "gpusleep_switch_requests_total") == 60
    for backend in backends.values():
        assert backend.violations == [], backend.violations
        assert set(backend.in_flight_at_sleep) <= {0}, "a backend was put to sleep under a request"
        assert backend.max_concurrent_calls == 1


def test_a_budget_keeps_what_fits_awake_and_puts_the_least_recently_used_to_sleep():
    with switch_over({"a": 4, "b": 4, "c": 6}, budget=10) as (client, backends, monitor):
        complete(client, "a", "x")
        complete(client, "b", "x")  # a and b fit together: no sleep
        assert backends["a"].sleep_calls == [] and not backends["a"].is_sleeping
        complete(client, "a", "y")  # b is now the least recently used
        complete(client, "c", "x")  # 4 + 6 fits once b sleeps
        assert backends["b"].sleep_calls == [1] and backends["a"].sleep_calls == []
        assert not backends["a"].is_sleeping and not backends["c"].is_sleeping
        status = {s["model"]: s["awake"] for s in client.get("/switch/status").json()["backends"]}
        assert status == {"a": True, "b": False, "c": True}
        assert monitor.max_awake_bytes <= 10
        assert metric(client, "gpusleep_switch_awake_gpu_memory_bytes") == 10


def test_a_backend_that_fails_to_wake_is_reported_with_its_error_and_the_others_stay_usable():
    error = MemoryError("8 GiB needed, 1 GiB free on the GPU")
    with switch_over({"good": 1, "bad": 1}, backend_kwargs={"bad": {"wake_error": error}}) as (client, backends, _):
        assert complete(client, "good", "abc") == "cba"
        answer = client.post("/v1/completions", json={"model": "bad", "prompt": "abc"})
        assert answer.status_code == 502
        body = answer.json()["error"]
        assert body["type"] == "BackendError" and body["backend"] == "bad" and body["backend_action"] == "wake_up"
        assert "8 GiB needed" in body["message"]
        assert complete(client, "good", "def") == "fed"
        assert metric(client, 'gpusleep_switch_failures_total{action="wake_up",model="bad"}') == 1
        bad = next(s for s in client.get("/switch/status").json()["backends"] if s["model"] == "bad")
        assert "8 GiB needed" in bad["last_error"]


def test_requests_for_a_model_that_is_waking_wait_for_it_instead_of_failing():
    with switch_over({"slow": 1, "other": 1}, backend_kwargs={"slow": {"call_seconds": 0.3}}) as (client, backends, _):
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda i: complete(client, "slow", str(i)), range(8)))
        assert texts == [str(i) for i in range(8)]
        assert len(backends["slow"].wake_calls) == 1


def test_the_front_door_lists_every_model_and_refuses_what_it_cannot_route():
    with switch_over({"alpha": 1, "beta": 1}) as (client, backends, _):
        listed = client.get("/v1/models").json()
        assert [m["id"] for m in listed["data"]] == ["alpha", "beta"]
        unknown = client.post("/v1/completions", json={"model": "gamma", "prompt": "x"})
        assert unknown.status_code == 404 and "alpha" in unknown.json()["error"]["message"]
        no_model = client.post("/v1/chat/completions", json={"messages": []})
        assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
        not_json = client.post("/v1/completions", content=b"\xff", headers={"content-type": "application/json"})
        assert not_json.status_code == 400
        assert all(not b.wake_calls for b in backends.values()), "a refused request woke a backend"


def test_a_backend_put_to_sleep_behind_the_switch_is_woken_again_for_the_next_request():
    with switch_over({"alpha": 1, "beta": 1}) as (client, backends, _):
        assert complete(client, "alpha", "abc") == "cba"
        alpha_url = next(s["url"] for s in client.get("/switch/status").json()["backends"] if s["model"] == "alpha")
        assert httpx.post(f"{alpha_url}/sleep").status_code == 200  # an operator, not the switch
        assert complete(client, "alpha", "def") == "fed"
        assert len(backends["alpha"].wake_calls) == 2


def test_two_backends_that_serve_the_same_name_are_told_apart_by_the_switch():
    monitor = Monitor({"tiny": 1})
    first, second = Backend("tiny", monitor), Backend("tiny", Monitor({"tiny": 1}))
    with serve_in_thread(backend_app(first)) as url1, serve_in_thread(backend_app(second)) as url2:
        config = parse_config(
            {
                "backends": [
                    {"model": "tiny-1", "url": url1, "served_model": "tiny"},
                    {"model": "tiny-2", "url": url2, "served_model": "tiny"},
                ]
            }
        )
        with serve_in_thread(create_switch_app(config)) as switch_url, httpx.Client(base_url=switch_url) as client:
            for model, backend in (("tiny-1", first), ("tiny-2", second), ("tiny-1", first)):
                served_before = backend.served
                answer = client.post("/v1/completions", json={"model": model, "prompt": "ab"})
                assert answer.json() == {"model": model, "text": "ba"}  # the alias the client asked for
                assert backend.served == served_before + 1


def test_a_client_that_leaves_in_the_middle_of_a_stream_does_not_hold_its_backend_awake():
    monitor = Monitor({"slow": 1, "other": 1})
    slow, other = Backend("slow", monitor), Backend("other", monitor)
    release_stream = threading.Event()
    app = FastAPI()

    @app.post("/v1/completions")
    async def endless(request: Request):
        async def events():
            for i in range(1000):
                yield f"data: {i}\n\n"
                if release_stream.is_set():
                    return
                await anyio.sleep(0.01)

        return StreamingResponse(events(), media_type="text/event-stream")

    install(app, slow)
    with serve_in_thread(app) as slow_url, serve_in_thread(backend_app(other)) as other_url:
        config = parse_config(
            {
                "backends": [{"model": "slow", "url": slow_url}, {"model": "other", "url": other_url}],
                "switch_timeout_s": 20,
            }
        )
        with serve_in_thread(create_switch_app(config)) as switch_url, httpx.Client(base_url=switch_url) as client:
            with client.stream("POST", "/v1/completions", json={"model": "slow"}) as answer:
                assert next(answer.iter_lines()) == "data: 0"
            # the client left; the next request for the other model must be able to put "slow" to sleep
            assert complete(client, "other", "ab") == "ba"
            release_stream.set()
            assert slow.sleep_calls == [1]
            status = {s["model"]: s["requests_in_flight"] for s in client.get("/switch/status").json()["backends"]}
            assert status == {"slow": 0, "other": 0}


def test_each_switch_is_recorded_with_its_sleeps_and_wake_up_split_out():
    with switch_over({"a": 4, "b": 4, "c": 6}, budget=10) as (client, backends, _):
        for model in ("a", "b", "a", "c"):  # the last one puts b (least recently used) to sleep
            complete(client, model, "x")
        records = client.get("/switch/status").json()["recent_switches"]
        assert [r["model"] for r in records] == ["a", "b", "c"]  # every backend starts asleep
        assert [r["sleeps"] for r in records[:2]] == [[], []]
        last = records[-1]
        assert [s["model"] for s in last["sleeps"]] == ["b"] and last["wake"]["model"] == "c"
        assert last["sleeps"][0]["action"] == "sleep" and last["wake"]["action"] == "wake_up"
        for call in (*last["sleeps"], last["wake"]):
            assert 0 < call["seconds"] <= last["seconds"]
            assert call["backend_seconds"] is not None and 0 <= call["backend_seconds"] <= call["seconds"]
        assert last["seconds"] >= last["sleeps"][0]["seconds"] + last["wake"]["seconds"]
        assert metric(client, 'gpusleep_switch_backend_call_seconds_count{action="sleep",model="b"}') == 1
        assert metric(client, 'gpusleep_switch_backend_call_seconds_count{action="wake_up",model="c"}') == 1
        assert metric(client, "gpusleep_switch_backend_call_seconds_count") == 4  # 3 wake-ups, 1 sleep


def slow_reader(url: str, body: dict) -> socket.socket:
    """A client that sends ``body`` to ``url``'s /v1/completions and then reads nothing: its receive
    window is tiny, so what is sent to it piles up in the switch (or blocks it)."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: switch\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    return sock


def read_http_body(sock: socket.socket) -> bytes:
    """Everything the server sends on ``sock`` until it closes or the chunked body ends, de-chunked."""
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    return body


BIG_RESPONSE_BYTES = 24 << 20  # more than the kernel's socket buffers on both sides hold


def test_a_client_that_reads_slowly_does_not_hold_its_backend_awake_once_the_backend_is_done():
    """The backend has sent its whole answer: the switch keeps it for the slow client, and a request for another
    model is served at once (before, it waited behind the slow client's download, then got 503)."""
    with switch_over({"alpha": 1, "beta": 1}, switch_timeout_s=5, response_buffer_bytes=32 << 20) as (
        client,
        backends,
        _,
    ):
        complete(client, "alpha", "warm")
        sock = slow_reader(str(client.base_url), {"model": "alpha", "big_bytes": BIG_RESPONSE_BYTES})
        try:
            wait_until(lambda: backends["alpha"].big_responses_sent == 1, "alpha to send its whole answer")
            assert complete(client, "beta", "abc") == "cba"  # alpha was put to sleep for it
            assert backends["alpha"].sleep_calls == [1]
            body = read_http_body(sock)
        finally:
            sock.close()
        assert body == big_body(BIG_RESPONSE_BYTES)  # the slow client still gets every byte


def test_past_the_response_buffer_a_slow_client_holds_its_backend_as_before():
    """What the switch keeps for a slow client is bounded (response_buffer_bytes); past it the backend waits for
    the client, and a switch away from it waits too (here until its switch_timeout_s: 503)."""
    with switch_over({"alpha": 1, "beta": 1}, switch_timeout_s=2, response_buffer_bytes=1 << 20) as (
        client,
        backends,
        _,
    ):
        complete(client, "alpha", "warm")
        sock = slow_reader(str(client.base_url), {"model": "alpha", "big_bytes": BIG_RESPONSE_BYTES})
        try:
            wait_until(lambda: backends["alpha"].big_responses_started == 1, "alpha to start its answer")
            answer = client.post("/v1/completions", json={"model": "beta", "prompt": "abc"})
            assert answer.status_code == 503 and answer.json()["error"]["type"] == "SwitchTimeoutError"
            assert backends["alpha"].sleep_calls == []
            assert read_http_body(sock) == big_body(BIG_RESPONSE_BYTES)
        finally:
            sock.close()
        assert complete(client, "beta", "abc") == "cba"  # once the client has it all, the switch goes on


def test_a_backend_that_went_away_does_not_stop_switches_to_the_others():
    """alpha's server is gone (crashed, killed) while the switch thinks it awake: a request for beta must not fail
    because alpha cannot be put to sleep (nothing listens: its GPU memory went with its process); alpha's own
    requests get 502 with the reason."""
    monitor = Monitor({"alpha": 1, "beta": 1})
    alpha, beta = Backend("alpha", monitor), Backend("beta", monitor)
    with contextlib.ExitStack() as stack:
        beta_url = stack.enter_context(serve_in_thread(backend_app(beta)))
        alpha_server = serve_in_thread(backend_app(alpha))
        alpha_url = alpha_server.__enter__()
        config = parse_config(
            {
                "backends": [{"model": "alpha", "url": alpha_url}, {"model": "beta", "url": beta_url}],
                "switch_timeout_s": 20,
            }
        )
        client = stack.enter_context(
            httpx.Client(base_url=stack.enter_context(serve_in_thread(create_switch_app(config))), timeout=30)
        )
        assert complete(client, "alpha", "abc") == "cba"
        alpha_server.__exit__(None, None, None)
        assert complete(client, "beta", "abc") == "cba"
        status = {s["model"]: s for s in client.get("/switch/status").json()["backends"]}
        assert status["alpha"]["awake"] is None and "sleep failed" in status["alpha"]["last_error"]
        answer = client.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
        assert answer.status_code == 502 and answer.json()["error"]["backend"] == "alpha"
        assert complete(client, "beta", "def") == "fed"
        assert metric(client, 'gpusleep_switch_failures_total{action="sleep",model="alpha"}') == 1


def test_a_backend_that_answers_but_cannot_sleep_stops_the_switch_and_the_error_names_both_models():
    """Unlike a backend that is gone, one that answers but fails to sleep may still hold its GPU memory: the
    switch does not wake another model over it."""
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    with switch_over({"alpha": 1, "beta": 1}, backend_kwargs={"alpha": {"sleep_error": error}}) as (
        client,
        backends,
        _,
    ):
        assert complete(client, "alpha", "abc") == "cba"
        answer = client.post("/v1/completions", json={"model": "beta", "prompt": "abc"})
        assert answer.status_code == 502
        body = answer.json()["error"]
        assert (body["backend"], body["backend_action"]) == ("alpha", "sleep")
        assert "model 'beta'" in body["message"] and "backend 'alpha': sleep failed" in body["message"]
        assert "illegal memory access" in body["message"]
        assert backends["beta"].wake_calls == []


def test_a_body_over_the_cap_is_refused_before_any_backend_is_woken():
    """A client cannot make the switch hold an unbounded body in memory, with or without Content-Length."""
    with switch_over({"alpha": 1, "beta": 1}, max_body_bytes=1 << 20) as (client, backends, _):
        big = json.dumps({"model": "alpha", "prompt": "x" * (2 << 20)}).encode()
        for headers, content in (
            ({"content-type": "application/json"}, big),  # with Content-Length
            ({"content-type": "application/json"}, iter([big[:1000], big[1000:]])),
        ):  # chunked
            answer = client.post("/v1/completions", content=content, headers=headers)
            assert answer.status_code == 413, answer.text
            error = answer.json()["error"]
            assert error["type"] == "RequestTooLargeError" and error["max_body_bytes"] == 1 << 20
            assert "xxxx" not in answer.text  # never echoed
        assert backends["alpha"].served == 0 and backends["alpha"].wake_calls == []
        assert complete(client, "alpha", "abc") == "cba"  # a body under the cap goes through


def test_the_switch_says_gpusleeps_version(monkeypatch):
    """One version source: the OpenAPI schema's version is the package's (pyproject.toml), whatever it is."""
    import gpusleep

    monkeypatch.setattr(gpusleep, "__version__", "9.8.7+test")
    app = create_switch_app(parse_config({"backends": [{"model": "m", "url": "http://127.0.0.1:9"}]}))
    assert app.version == "9.8.7+test"
    assert app.openapi()["info"]["version"] == "9.8.7+test"
