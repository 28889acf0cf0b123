"""``gpusleep switch`` against hostile or careless clients and failing backends: headers the switch cannot
re-encode, bodies it cannot parse, compressed answers, answers cut off or stalled, a backend that hangs,
clients that give up while they wait for a switch, and many requests for a model that cannot wake.

What must hold: every answer is a proper one (the backend's, or the switch's own error in the one shape,
never a 500 and never a clean end to a cut-off answer), and no lease is left behind: afterwards the switch
can still put every backend to sleep and serve every other model (docs/switching.md, "Hostile clients and
failing backends")."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest
from _server_testkit import serve_in_thread, wait_until
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.gzip import GZipMiddleware
from test_switch_router import Backend, Monitor, backend_app, complete, switch_over

from gpusleep.server import install
from gpusleep.switch import create_switch_app, parse_config

pytestmark = pytest.mark.timeout(90)


def backend_status(client: httpx.Client) -> dict:
    return {s["model"]: s for s in client.get("/switch/status").json()["backends"]}


def assert_no_lease_left(client: httpx.Client) -> None:
    status = backend_status(client)
    assert all(s["requests_in_flight"] == 0 for s in status.values()), status


@contextlib.contextmanager
def switch_in_front_of(apps: dict, **switch_config) -> Iterator[httpx.Client]:
    """The switch in front of ``apps`` (model -> ASGI app of its backend); yields a client of the switch."""
    with contextlib.ExitStack() as stack:
        urls = {m: stack.enter_context(serve_in_thread(app)) for m, app in apps.items()}
        raw = {"backends": [{"model": m, "url": u} for m, u in urls.items()], "switch_timeout_s": 30, **switch_config}
        switch_url = stack.enter_context(serve_in_thread(create_switch_app(parse_config(raw))))
        yield stack.enter_context(httpx.Client(base_url=switch_url, timeout=60))


def silent_backend() -> socket.socket:
    """A "backend" whose process hangs: the kernel accepts connections on its port, nothing ever answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


# ------------------------------------------------------------------------------------------ clients


def test_a_header_the_switch_cannot_encode_as_ascii_is_forwarded_as_it_came_and_leaves_no_lease():
    """A User-Agent with a Latin-1 byte is legal HTTP; it must neither fail the request (it was a 500) nor
    leave a lease on the backend (the switch could then never put it to sleep again)."""
    with switch_over({"alpha": 1, "beta": 1}, switch_timeout_s=5) as (client, backends, _):
        answer = client.post(
            "/v1/completions", json={"model": "alpha", "prompt": "abc"}, headers={"user-agent": b"caf\xe9-client/1.0"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"model": "alpha", "text": "cba"}
        assert_no_lease_left(client)
        assert complete(client, "beta", "abc") == "cba"  # alpha could be put to sleep for it
        assert backends["alpha"].sleep_calls == [1]


def test_a_backend_header_in_utf_8_reaches_the_client_as_it_came():
    """Starlette encodes str headers as Latin-1 only: a UTF-8 header from a backend made the relay fail (500)
    after the lease was taken."""
    backend = Backend("alpha", Monitor({"alpha": 1}))
    app = backend_app(backend)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        answer = JSONResponse({"model": "alpha", "data": []})
        answer.raw_headers.append((b"x-served-by", "模型-1".encode()))
        return answer

    with switch_in_front_of(
        {"alpha": app, "beta": backend_app(Backend("beta", Monitor({"beta": 1})))}, switch_timeout_s=5
    ) as client:
        answer = client.post("/v1/embeddings", json={"model": "alpha", "input": "x"})
        assert answer.status_code == 200, answer.text
        assert (b"x-served-by", "模型-1".encode()) in answer.headers.raw
        assert_no_lease_left(client)
        assert complete(client, "beta", "abc") == "cba"


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "alpha", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    ],
    ids=["nested-array", "nested-prompt", "nested-model"],
)
def test_a_body_nested_too_deeply_to_parse_is_refused_with_400_not_500(body):
    with switch_over({"alpha": 1}) as (client, backends, _):
        answer = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text[:500]
        error = answer.json()["error"]
        assert error["type"] == "BadRequestError" and error["param"] == "model"
        assert backends["alpha"].wake_calls == []
        assert complete(client, "alpha", "abc") == "cba"


def test_a_body_nested_as_deep_as_the_switch_can_read_is_refused_or_forwarded_never_a_500_and_leaves_no_lease():
    """With served_model the switch writes the body again; JSON it could just read, it could not write (a
    RecursionError after the lease was taken: the connection was reset, and the backend could never be put
    to sleep again). At every depth around the limit: the switch's 400, the backend's own answer, or 502
    when the backend breaks down over it."""
    monitor = Monitor({"tiny": 1, "other": 1})
    tiny, other = Backend("tiny", monitor), Backend("other", monitor)
    with serve_in_thread(backend_app(tiny)) as tiny_url, serve_in_thread(backend_app(other)) as other_url:
        config = parse_config(
            {
                "backends": [
                    {"model": "tiny-1", "url": tiny_url, "served_model": "tiny"},
                    {"model": "other", "url": other_url},
                ],
                "switch_timeout_s": 5,
            }
        )
        with (
            serve_in_thread(create_switch_app(config)) as switch_url,
            httpx.Client(base_url=switch_url, timeout=30) as client,
        ):

            def send(depth: int) -> httpx.Response:
                body = b'{"model": "tiny-1", "prompt": "x", "extra": ' + b"[" * depth + b"]" * depth + b"}"
                return client.post("/v1/completions", content=body, headers={"content-type": "application/json"})

            def refused(depth: int) -> bool:
                try:
                    return send(depth).status_code == 400
                except httpx.TransportError:
                    return False

            readable, unreadable = 1, 20_000  # bisect the deepest nesting the switch does not refuse
            while unreadable - readable > 1:
                middle = (readable + unreadable) // 2
                readable, unreadable = (readable, middle) if refused(middle) else (middle, unreadable)
            for depth in range(readable - 16, readable + 2):
                answer = send(depth)
                if answer.status_code == 400:
                    assert answer.json()["error"]["type"] == "BadRequestError", answer.text
                elif answer.status_code == 502:  # forwarded, and the backend broke down over it
                    assert answer.json()["error"]["backend"] == "tiny-1", answer.text
            assert_no_lease_left(client)
            assert complete(client, "other", "abc") == "cba"


def test_a_very_long_model_name_is_not_echoed_back_in_full():
    """The 404 names the model asked for, cut to a readable length: a client cannot make the switch send its
    whole body back."""
    with switch_over({"alpha": 1}) as (client, _, _):
        answer = client.post("/v1/completions", json={"model": "m" * 1_000_000, "prompt": "x"})
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "NotFoundError"
        assert len(answer.content) < 4096 and "alpha" in answer.json()["error"]["message"]


def send_completion(sock: socket.socket, body: dict) -> None:
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: switch\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )


def read_chunked_answer(reader) -> bytes:
    """One 200 answer with a chunked body from ``reader`` (a socket's file), de-chunked."""
    status = reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    headers = {}
    for line in iter(reader.readline, b"\r\n"):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked", headers
    body = b""
    while (size := int(reader.readline(), 16)) > 0:
        body += reader.read(size)
        reader.readline()
    reader.readline()
    return body


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-after-the-other", "pipelined"])
def test_requests_of_one_keep_alive_connection_are_served_by_each_model_in_turn_across_switches(pipelined):
    """Requests for different models on one connection, one after the other or all sent at once (HTTP/1.1
    pipelining): each answer comes from its model, in order, across the switches between them."""
    models = ["alpha", "beta", "alpha", "alpha", "beta"]
    with switch_over({"alpha": 1, "beta": 1}) as (client, backends, _):
        parts = urllib.parse.urlsplit(str(client.base_url))
        with socket.create_connection((parts.hostname, parts.port)) as sock, sock.makefile("rb") as reader:
            if pipelined:
                for i, model in enumerate(models):
                    send_completion(sock, {"model": model, "prompt": f"p{i}"})
            for i, model in enumerate(models):
                if not pipelined:
                    send_completion(sock, {"model": model, "prompt": f"p{i}"})
                assert json.loads(read_chunked_answer(reader)) == {"model": model, "text": f"p{i}"[::-1]}
        assert len(backends["alpha"].wake_calls) == 2 and len(backends["beta"].wake_calls) == 2
        assert_no_lease_left(client)


def test_a_query_string_reaches_the_backend_byte_for_byte():
    """Repeated parameters and bytes that are not UTF-8 are the client's business: the switch passes the query
    on as it came (it re-encoded it from a dict: the first of two ``tag`` was lost, ``%FF`` became ``%EF%BF%BD``)."""
    backend = Backend("alpha", Monitor({"alpha": 1}))
    app = backend_app(backend)

    @app.post("/v1/embeddings")
    async def echo_query(request: Request):
        return {"query": request.scope["query_string"].decode("latin-1")}

    with switch_in_front_of({"alpha": app}) as client:
        for query in ("tag=a&tag=b&x=%FF&empty=&flag", "q=a+b%20c&%C3%A9=1"):
            answer = client.post(f"/v1/embeddings?{query}", json={"model": "alpha", "input": "x"})
            assert answer.status_code == 200 and answer.json() == {"query": query}, answer.text


def test_other_methods_on_a_model_path_are_refused_in_the_error_shape_and_wake_nothing():
    with switch_over({"alpha": 1}) as (client, backends, _):
        for method in ("GET", "PUT", "DELETE"):
            answer = client.request(method, "/v1/completions", json={"model": "alpha", "prompt": "x"})
            assert answer.status_code == 405 and "POST" in answer.json()["error"]["message"], answer.text
        assert client.head("/v1/completions").status_code == 405
        assert backends["alpha"].wake_calls == []


# ------------------------------------------------------------------------- compressed answers


def gzipping_backend(backend: Backend) -> FastAPI:
    """``backend_app`` behind Starlette's GZipMiddleware: it compresses whatever the client accepts."""
    app = backend_app(backend)

    @app.post("/v1/embeddings")
    async def overloaded():
        return JSONResponse(
            {"error": {"message": "queue full " * 100, "type": "ServiceUnavailableError", "code": 503}}, status_code=503
        )

    app.add_middleware(GZipMiddleware, minimum_size=10)
    return app


def test_a_client_that_did_not_ask_for_compression_gets_a_plain_answer_from_a_compressing_backend():
    """curl without --compressed sends no Accept-Encoding: the answer must not come back gzip'd (the switch's
    own HTTP client used to ask the backend for gzip on the client's behalf)."""
    backend = Backend("alpha", Monitor({"alpha": 1}))
    with switch_in_front_of({"alpha": gzipping_backend(backend)}) as client:
        body = {"model": "alpha", "prompt": "hello " * 100}
        answer = client.post("/v1/completions", json=body, headers={"accept-encoding": "identity"})
        assert answer.status_code == 200
        assert "content-encoding" not in answer.headers
        assert json.loads(answer.content) == {"model": "alpha", "text": body["prompt"][::-1]}


def test_a_compressed_answer_reaches_a_client_that_asked_for_it_still_compressed_and_readable():
    backend = Backend("alpha", Monitor({"alpha": 1}))
    with switch_in_front_of({"alpha": gzipping_backend(backend)}) as client:
        body = {"model": "alpha", "prompt": "hello " * 100}
        with client.stream("POST", "/v1/completions", json=body, headers={"accept-encoding": "gzip"}) as answer:
            assert answer.status_code == 200 and answer.headers["content-encoding"] == "gzip"
            raw = b"".join(answer.iter_raw())
        assert json.loads(gzip.decompress(raw)) == {"model": "alpha", "text": body["prompt"][::-1]}
        # the backend's own 503 (not ModelSleepingError) is passed on: still readable, as the client asked
        overloaded = client.post(
            "/v1/embeddings", json={"model": "alpha", "input": "x"}, headers={"accept-encoding": "gzip"}
        )
        assert overloaded.status_code == 503
        assert overloaded.json()["error"]["type"] == "ServiceUnavailableError"
        assert_no_lease_left(client)


# ----------------------------------------------------------------- backends that break off or stall


def breaking_backend(backend: Backend, status_code: int, stall: bool = False) -> FastAPI:
    """A backend whose completions answer ``status_code`` with the start of a body, then break off the
    connection (or, with ``stall``, send nothing more until the switch hangs up)."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        await request.body()

        async def broken():
            yield b'{"error": {"message": "the start of an answer'
            if stall:
                await anyio.sleep(3600)  # cancelled when the switch hangs up
            raise RuntimeError("the backend process died mid-answer")

        return StreamingResponse(broken(), status_code=status_code, media_type="application/json")

    install(app, backend)
    return app


@pytest.mark.parametrize("status_code", [200, 503])
def test_an_answer_the_backend_breaks_off_is_never_a_clean_answer_and_leaves_no_lease(status_code):
    monitor = Monitor({"broken": 1, "good": 1})
    broken, good = Backend("broken", monitor), Backend("good", monitor)
    apps = {"broken": breaking_backend(broken, status_code), "good": backend_app(good)}
    with switch_in_front_of(apps, switch_timeout_s=5) as client:
        try:
            answer = client.post("/v1/completions", json={"model": "broken", "prompt": "x"})
        except httpx.RemoteProtocolError:
            pass  # the answer was cut off, as the backend's was
        else:  # the switch answered for the backend: never a 500, never what looks like the backend's answer
            assert answer.status_code == 502, answer.text
            error = answer.json()["error"]
            assert error["type"] == "BackendError" and error["backend"] == "broken", error
        assert_no_lease_left(client)
        assert complete(client, "good", "abc") == "cba"  # "broken" could be put to sleep
        assert broken.sleep_calls == [1]


def test_an_answer_that_stalls_past_request_timeout_is_cut_off_and_the_backend_freed():
    monitor = Monitor({"stalling": 1, "good": 1})
    stalling, good = Backend("stalling", monitor), Backend("good", monitor)
    apps = {"stalling": breaking_backend(stalling, 200, stall=True), "good": backend_app(good)}
    with switch_in_front_of(apps, request_timeout_s=1) as client:
        with client.stream("POST", "/v1/completions", json={"model": "stalling"}) as answer:
            assert answer.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                answer.read()
        assert_no_lease_left(client)
        assert complete(client, "good", "abc") == "cba"
        assert stalling.sleep_calls == [1]


class OddControlAnswers:
    """A model server (ASGI app) whose control answers are odd but successful: GET /is_sleeping answers a text
    the switch cannot read, POST /wake_up JSON nested too deeply to parse, POST /sleep an empty body."""

    NESTED = b'{"report": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path not in ("/is_sleeping", "/wake_up", "/sleep"):
            return await self.app(scope, receive, send)
        if path == "/is_sleeping":
            return await Response(b"maybe", media_type="text/plain")(scope, receive, send)
        body = self.NESTED if path == "/wake_up" else b""

        async def replaced(message) -> None:  # the real call's status, another body
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message["headers"] if k.lower() != b"content-length"]
                await send({**message, "headers": headers + [(b"content-length", b"%d" % len(body))]})
            elif not message.get("more_body"):
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, replaced)


def test_a_backend_with_odd_control_answers_is_still_switched_and_served():
    """Its state reads as unknown (docs/switching.md); a wake-up answered 200 with JSON nested too deeply to
    read is still a wake-up that succeeded (the switch failed with a 500 and forgot it had woken it)."""
    monitor = Monitor({"odd": 1, "plain": 1})
    odd, plain = Backend("odd", monitor), Backend("plain", monitor)
    apps = {"odd": OddControlAnswers(backend_app(odd)), "plain": backend_app(plain)}
    with switch_in_front_of(apps, switch_timeout_s=5) as client:
        for model in ("odd", "plain", "odd", "plain"):
            assert complete(client, model, "abc") == "cba"
        assert len(odd.wake_calls) == 2 and odd.sleep_calls == [1, 1]
        assert_no_lease_left(client)
        assert backend_status(client)["odd"]["awake"] is False  # the switch's own sleep: known


def test_a_long_503_that_is_not_model_sleeping_is_relayed_as_it_comes_not_held_whole():
    """The switch reads a 503 to tell the spec's ModelSleepingError (a short JSON) from other 503s; a long or
    streamed 503 (an overloaded server's error page, a stream) was read whole into memory before the client
    got a byte. Now it is relayed like any answer, through the bounded buffer."""
    monitor = Monitor({"busy": 1})
    busy = Backend("busy", monitor)
    go_on = threading.Event()
    app = FastAPI()

    @app.post("/v1/completions")
    async def overloaded(request: Request):
        async def page():
            yield b"<html>the server is overloaded, "
            while not go_on.is_set():
                await anyio.sleep(0.01)
            yield b"try again later</html>"

        return StreamingResponse(page(), status_code=503, media_type="text/html")

    install(app, busy)
    try:
        with switch_in_front_of({"busy": app}) as client:
            sock = raw_request(str(client.base_url), {"model": "busy", "prompt": "x"})
            sock.settimeout(30)
            received = b""
            while b"overloaded, " not in received:  # before the backend has finished its answer
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 503")
            go_on.set()
            while not received.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
            assert b"try again later</html>" in received
            sock.close()
            assert_no_lease_left(client)
    finally:
        go_on.set()


def test_a_backend_that_hangs_does_not_hold_up_requests_for_a_model_that_is_awake():
    """ "hung" accepts connections and never answers (a stopped process, a stuck driver): its state cannot be
    read. Requests for the awake model must not wait for that read (they waited until switch_timeout_s,
    then got 503, for as long as the backend hung)."""
    hung = silent_backend()
    monitor = Monitor({"alpha": 1})
    alpha = Backend("alpha", monitor)
    alpha.asleep = set()  # awake at start
    try:
        with serve_in_thread(backend_app(alpha)) as alpha_url:
            config = parse_config(
                {
                    "backends": [
                        {"model": "alpha", "url": alpha_url},
                        {"model": "hung", "url": f"http://127.0.0.1:{hung.getsockname()[1]}"},
                    ],
                    "switch_timeout_s": 20,
                    "request_timeout_s": 60,
                }
            )
            with (
                serve_in_thread(create_switch_app(config)) as switch_url,
                httpx.Client(base_url=switch_url, timeout=60) as client,
            ):
                for prompt in ("abc", "def", "ghi"):
                    assert complete(client, "alpha", prompt) == prompt[::-1]
                status = backend_status(client)
                assert status["alpha"]["awake"] is True and status["hung"]["awake"] is None
                assert "is_sleeping" in status["hung"]["last_error"]
    finally:
        hung.close()


# ------------------------------------------------------------------- clients and switches that wait


def held_stream_backend(backend: Backend, release: threading.Event) -> FastAPI:
    """A backend whose completions stream one event, then nothing more until ``release`` is set."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def held(request: Request):
        await request.body()

        async def events():
            with backend.request_running("/v1/completions held"):
                yield "data: 0\n\n"
                while not release.is_set():
                    await anyio.sleep(0.01)
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    install(app, backend)
    return app


def raw_request(base_url: str, body: dict) -> socket.socket:
    """A client that sends ``body`` to /v1/completions and waits (the caller reads, or hangs up)."""
    parts = urllib.parse.urlsplit(base_url)
    sock = socket.create_connection((parts.hostname, parts.port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: switch\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    return sock


def test_a_client_that_gives_up_while_waiting_for_a_switch_causes_no_switch():
    """beta's request waits while alpha streams; its client hangs up. Nobody is left to serve: alpha must not be
    put to sleep and beta woken for it (each such client cost a whole switch, and a queue of them many)."""
    monitor = Monitor({"alpha": 1, "beta": 1})
    alpha, beta = Backend("alpha", monitor), Backend("beta", monitor)
    release = threading.Event()
    apps = {"alpha": held_stream_backend(alpha, release), "beta": backend_app(beta)}
    try:
        with switch_in_front_of(apps) as client:
            with client.stream("POST", "/v1/completions", json={"model": "alpha"}) as stream:
                lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
                assert next(lines) == "data: 0"  # alpha is busy: a switch away must wait
                for _ in range(3):
                    gives_up = raw_request(str(client.base_url), {"model": "beta", "prompt": "x"})
                    wait_until(
                        lambda: backend_status(client)["beta"]["requests_waiting"] == 1, "beta's request to wait"
                    )
                    gives_up.close()
                    wait_until(
                        lambda: backend_status(client)["beta"]["requests_waiting"] == 0,
                        "the switch to drop the request of the client that left",
                    )
                release.set()
                assert "data: [DONE]" in list(lines)
            assert alpha.sleep_calls == [] and beta.wake_calls == []
            assert_no_lease_left(client)
            assert complete(client, "beta", "abc") == "cba"  # a client that stays is served as before
    finally:
        release.set()


def test_requests_waiting_for_a_wake_up_that_fails_all_get_its_502_at_once():
    """Eight requests wait for "bad", whose wake-up runs out of GPU memory: one wake-up is tried, and every
    waiting request gets its error (each used to try again in turn: eight failed wake-ups in a row)."""
    error = MemoryError("8 GiB needed, 1 GiB free on the GPU")
    with switch_over({"good": 1, "bad": 1}, backend_kwargs={"bad": {"wake_error": error}}) as (client, backends, _):
        bad = backends["bad"]
        bad.calls_blocked = True
        with ThreadPoolExecutor(8) as pool:
            answers = [
                pool.submit(client.post, "/v1/completions", json={"model": "bad", "prompt": str(i)}) for i in range(8)
            ]
            wait_until(
                lambda: bad.calls_started == 1 and backend_status(client)["bad"]["requests_waiting"] == 8,
                "a wake-up of bad under way with eight requests waiting for it",
            )
            bad.release_calls.set()
            answers = [a.result() for a in answers]
        for answer in answers:
            assert answer.status_code == 502, answer.text
            error_body = answer.json()["error"]
            assert (error_body["backend"], error_body["backend_action"]) == ("bad", "wake_up")
            assert "8 GiB needed" in error_body["message"]
        assert len(bad.wake_calls) == 1
        again = client.post("/v1/completions", json={"model": "bad", "prompt": "later"})
        assert again.status_code == 502 and len(bad.wake_calls) == 2  # a request after the failure tries again
        assert complete(client, "good", "abc") == "cba"
        assert_no_lease_left(client)


def test_a_switch_timeout_while_a_wake_up_is_in_flight_leaves_the_backend_awake_known_and_unleased():
    """A second request for alpha gives up (503) while alpha's wake-up is still in flight: the wake-up is not
    abandoned half-way, the request that started it is served, the switch knows alpha is awake, and no lease
    is left behind."""
    with switch_over({"alpha": 1, "beta": 1}, switch_timeout_s=1) as (client, backends, _):
        alpha = backends["alpha"]
        alpha.calls_blocked = True
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/completions", json={"model": "alpha", "prompt": "abc"})
            wait_until(lambda: alpha.calls_started == 1, "alpha's wake-up to start")
            second = client.post("/v1/completions", json={"model": "alpha", "prompt": "def"})
            assert second.status_code == 503 and second.json()["error"]["type"] == "SwitchTimeoutError"
            alpha.release_calls.set()
            first = first.result()  # its request waits for the wake-up it started (docs/switching.md): 200 or 503
            assert (
                first.status_code == 200
                and first.json()["text"] == "cba"
                or first.status_code == 503
                and first.json()["error"]["type"] == "SwitchTimeoutError"
            ), first.text
        assert backend_status(client)["alpha"]["awake"] is True
        assert_no_lease_left(client)
        assert complete(client, "alpha", "ghi") == "ihg" and len(alpha.wake_calls) == 1
        assert complete(client, "beta", "abc") == "cba" and alpha.sleep_calls == [1]


def test_a_short_request_timeout_does_not_cut_a_slow_wake_up_short():
    """request_timeout_s bounds a forwarded request (a stream: between two chunks); it also bounded sleeps and
    wake-ups, so an operator who cut stalled streams at 1 s made every wake-up longer than that a 502. Those
    calls have their own bound, backend_call_timeout_s."""
    slow = {"call_seconds": 1.5}  # a wake-up (and a sleep) longer than request_timeout_s
    with switch_over({"alpha": 1, "beta": 1}, request_timeout_s=1, backend_kwargs={"alpha": slow, "beta": slow}) as (
        client,
        backends,
        _,
    ):
        assert complete(client, "alpha", "abc") == "cba"
        assert complete(client, "beta", "abc") == "cba"
        assert backends["alpha"].sleep_calls == [1] and len(backends["beta"].wake_calls) == 1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_hundreds_of_aborted_requests_leave_no_connection_or_lease_behind():
    """Clients that hang up at every stage (while waiting for a switch, mid-stream, before reading anything):
    afterwards the process running the switch holds no more descriptors than a few warm connections."""
    with switch_over({"alpha": 1, "beta": 1}) as (client, backends, _):
        for model in ("alpha", "beta", "alpha"):
            complete(client, model, "warm")
        before = open_fds()
        for i in range(300):
            model = ("alpha", "beta")[i % 2]
            sock = raw_request(str(client.base_url), {"model": model, "prompt": "p" * 200, "stream": i % 3 == 0})
            if i % 5 == 0:
                sock.recv(1)  # the answer began
            sock.close()
        for model in ("beta", "alpha"):  # everything the aborted requests started is over before these are served
            assert complete(client, model, "after") == "retfa"
        assert_no_lease_left(client)
        wait_until(lambda: open_fds() <= before + 8, f"descriptors back near {before} (now {open_fds()})")


def test_a_sleep_whose_connection_drops_without_an_answer_is_sent_again_on_a_fresh_connection():
    """A backend that drops the connection of a sleep before answering it (a pooled keep-alive connection it
    had closed, or its worker restarting) must not leave the switch unable to serve another model: control
    calls are idempotent transitions, so the switch sends the sleep once more."""
    monitor = Monitor({"tiny": 1, "other": 1})
    tiny, other = Backend("tiny", monitor), Backend("other", monitor)
    inner, drops = backend_app(tiny), []

    async def drops_its_first_sleep(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/sleep" and not drops:
            drops.append(scope["path"])
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
            raise ConnectionResetError("the worker went away mid-answer")  # uvicorn drops the connection
        await inner(scope, receive, send)

    with serve_in_thread(drops_its_first_sleep) as tiny_url, serve_in_thread(backend_app(other)) as other_url:
        config = parse_config(
            {
                "backends": [{"model": "tiny", "url": tiny_url}, {"model": "other", "url": other_url}],
                "switch_timeout_s": 30,
            }
        )
        with (
            serve_in_thread(create_switch_app(config)) as switch_url,
            httpx.Client(base_url=switch_url, timeout=30) as client,
        ):
            assert complete(client, "tiny", "abc") == "cba"
            assert complete(client, "other", "abc") == "cba", "tiny was put to sleep on the second try"
            assert drops == ["/sleep"] and tiny.sleep_calls, "the first sleep was dropped, the second one arrived"
            assert_no_lease_left(client)
