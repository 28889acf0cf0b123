"""The ``gpusleep switch`` app: an OpenAI-compatible front door for several model servers on one GPU.

``POST /v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings`` (and the other model endpoints of
the sleep-mode spec) are routed by the request's ``"model"``: the router wakes that backend, putting
others to sleep as needed (Note [Switches are serialized] in router.py), and the request is forwarded
as it came, its response streamed back as it comes (server-sent events included). ``GET /v1/models``
lists every backend's model, ``GET /switch/status`` the state of each backend and the recent switches
(their time split into sleeps and wake-up: records.py), ``GET /metrics`` the
switch metrics, ``GET /health`` answers 200.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import gpusleep

from ..server import SPEC_PROTECTED_PATHS, install_error_handlers
from ..server.responses import (
    MODEL_SLEEPING_TYPE,
    error_response,
    model_sleeping_response,
    request_too_large_response,
)
from .config import SwitchConfig
from .relay import BufferedRelay, ModelRenamer
from .router import BackendError, BackendState, SwitchRouter, SwitchTimeoutError, UnknownModelError

__all__ = ["create_switch_app"]

log = logging.getLogger("gpusleep.switch")

#: Request headers passed on to a backend (the others, hop-by-hop ones and ``host`` first, are not).
_FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "authorization", "user-agent", "openai-organization")
_DROPPED_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


def create_switch_app(config: SwitchConfig, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The switch for ``config``. Its idle sleep of backends (``config.idle_sleep_seconds``) runs while the
    app's lifespan runs (uvicorn's default). ``transport``: for httpx's own test transports."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(router.run)
                try:
                    yield
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            await router.aclose()  # every process the switch started (launcher.py)
            await client.aclose()

    app = FastAPI(title="gpusleep switch", version=gpusleep.__version__, lifespan=lifespan)
    install_error_handlers(app)
    client = httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(config.request_timeout_seconds, connect=10.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
    )
    router = SwitchRouter(config, client)
    app.state.switch_router = router
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {"id": b.model, "object": "model", "created": created, "owned_by": "gpusleep-switch"}
                for b in config.backends
            ],
        }

    @app.get("/switch/status")
    async def status() -> dict:
        return {
            "backends": router.status(),
            "gpu_memory_budget_bytes": config.gpu_memory_budget_bytes,
            "gpu_memory_held_bytes": router.gpu_bytes_held(),
            "host_memory_budget_bytes": config.host_memory_budget_bytes,
            "host_memory_held_bytes": router.host_bytes_held(),
            "log_dir": router.log_dir,
            "recent_switches": [dataclasses.asdict(r) for r in router.recent_switches],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def forward(request: Request) -> Response:
        what = f"{request.method} {request.url.path}"
        body = await _read_body(request, config.max_body_bytes)
        if body is None:
            return request_too_large_response(config.max_body_bytes, what)
        try:
            parsed = json.loads(body) if body else None
            unreadable = ""
        except ValueError:
            parsed, unreadable = None, " (the body is not JSON)"
        except RecursionError:
            parsed, unreadable = None, " (the body's JSON is nested too deeply to read)"
        model = parsed.get("model") if isinstance(parsed, dict) else None
        if not isinstance(model, str):
            return error_response(
                400,
                "BadRequestError",
                f'{what}: the switch routes by the JSON body\'s "model", which is missing or not a string'
                f"{unreadable}; give one of {sorted(router.backends)}",
                param="model",
            )
        # The body for the backend, made before any lease is taken (nothing may fail between the lease and the relay).
        backend = config.backend(model)
        forwarded = body
        if backend is not None and backend.served_model not in (None, model):
            try:
                forwarded = json.dumps({**parsed, "model": backend.served_model}).encode()
            except RecursionError:  # read at the edge of the parser's depth, the body cannot be written again
                return error_response(
                    400,
                    "BadRequestError",
                    f"{what}: the body's JSON is nested too deeply for the switch to write it again with model "
                    f"{backend.served_model!r}",
                    param="body",
                )

        async def forward_once() -> Response | None:
            try:
                state = await router.acquire(model)
            except UnknownModelError as exc:
                return error_response(404, "NotFoundError", f"{what}: {exc}", param="model")
            except SwitchTimeoutError as exc:
                return error_response(503, "SwitchTimeoutError", f"{what}: {exc}", headers={"Retry-After": "5"})
            except BackendError as exc:
                return _backend_error_response(what, model, exc)
            return await _stream_from(client, router, state, request, forwarded)

        for attempt in (1, 2):
            client_left, response = await _unless_the_client_leaves(request, forward_once)
            if client_left:
                log.info("%s: the client left before its answer began; its request was dropped", what)
                return error_response(499, "ClientClosedRequest", f"{what}: the client left before its answer")
            if response is not None:
                return response
            # The backend was put to sleep behind the switch's back: read its state again and wake it.
            log.warning("%s: backend %r answered ModelSleepingError; waking it (attempt %d)", what, model, attempt)
        return model_sleeping_response(5)

    # The spec's paths only: they name their model in the body (SGLang's /generate does not).
    for path in SPEC_PROTECTED_PATHS:
        app.add_api_route(path, forward, methods=["POST"], include_in_schema=False)
    return app


async def _read_body(request: Request, max_bytes: int) -> bytes | None:
    """The request's body, or ``None`` as soon as it is known to be over ``max_bytes`` (from its
    Content-Length, else while it arrives): a client cannot make the switch hold an unbounded body."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            return None
    return bytes(body)


async def _unless_the_client_leaves(
    request: Request, work: Callable[[], Awaitable[Response | None]]
) -> tuple[bool, Response | None]:
    """``(False, await work())``, or ``(True, None)`` as soon as the client disconnects, ``work`` then cancelled:
    a client that gave up while its request waited for a switch (or for the backend's first byte) no longer
    makes the switch put models to sleep and wake its own for nobody."""
    outcome: list[Response | None] = []
    async with anyio.create_task_group() as tasks:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        outcome.append(await work())
        tasks.cancel_scope.cancel()
    return (False, outcome[0]) if outcome else (True, None)


def _backend_error_response(what: str, model: str, exc: BackendError) -> JSONResponse:
    return error_response(
        502,
        "BackendError",
        f"{what}: could not make model {model!r} ready: {exc}. The other models stay usable; see "
        "GET /switch/status and the backend's own log.",
        {
            "backend": exc.model,
            "backend_action": exc.action,
            "backend_status": exc.status_code,
            "backend_error": exc.body,
        },
    )


async def _stream_from(
    client: httpx.AsyncClient, router: SwitchRouter, state: BackendState, request: Request, body: bytes
) -> Response | None:
    """Forward the request to ``state``'s backend and relay its answer; the lease ends with the backend's
    answer (Note [The lease ends with the backend's answer] in relay.py), or here on any failure first.
    ``None`` (lease given back, state marked unknown) when the backend answers 503 ``ModelSleepingError``."""
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            router.release(state)

    what = f"{request.method} {request.url.path}"
    try:
        # The client's header bytes as they came: HTTP allows Latin-1 bytes that httpx would not encode from str.
        headers = [(k, v) for k, v in request.headers.raw if k.lower().decode("latin-1") in _FORWARDED_REQUEST_HEADERS]
        # The client's own Accept-Encoding, or none: httpx would otherwise ask for gzip on the client's behalf, and
        # the answer is relayed as it comes (compressed for a client that cannot read it: curl without --compressed).
        headers.append((b"accept-encoding", request.headers.get("accept-encoding", "identity").encode("latin-1")))
        # The query as it came (re-encoding it from a dict lost repeated parameters and bytes that are not UTF-8).
        url = httpx.URL(state.config.url + request.url.path, query=request.scope.get("query_string", b""))
        outgoing = client.build_request(request.method, url, content=body, headers=headers)
        upstream = await client.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        release()
        return _no_answer_response(what, state, exc)
    except BaseException:
        release()  # whatever failed, the lease must not outlive the request
        raise

    if upstream.status_code == 503 and _may_be_model_sleeping(upstream):
        try:
            answer = await upstream.aread()
        except httpx.HTTPError as exc:  # the backend broke off (or stalled in) its 503
            return _no_answer_response(what, state, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
            release()
        try:
            sleeping = json.loads(answer)["error"]["type"] == MODEL_SLEEPING_TYPE
        except (ValueError, KeyError, TypeError, RecursionError):
            sleeping = False
        if sleeping:
            state.awake = None
            return None
        passed_on = Response(answer, status_code=503)  # its own Content-Length
        passed_on.raw_headers += _passed_on_headers(upstream)
        return passed_on

    renamer = ModelRenamer.for_answer(state.config.served_model, state.model, upstream.headers)
    return BufferedRelay(
        upstream,
        release,
        router.config.response_buffer_bytes,
        upstream.status_code,
        _passed_on_headers(upstream),
        renamer,
    )


#: Longest 503 the switch reads to tell the spec's ModelSleepingError (a short JSON) from others, bytes.
_MODEL_SLEEPING_MAX_BYTES = 64 << 10


def _may_be_model_sleeping(upstream: httpx.Response) -> bool:
    """Whether a 503 is short enough to be read whole: a declared Content-Length of at most
    :data:`_MODEL_SLEEPING_MAX_BYTES`, uncompressed. Any other 503 (a long error page, a stream, a compressed
    body that could unpack to any size) is relayed as it comes, like any answer."""
    declared = upstream.headers.get("content-length", "")
    encoding = upstream.headers.get("content-encoding", "identity").strip().lower()
    return declared.isdigit() and int(declared) <= _MODEL_SLEEPING_MAX_BYTES and encoding == "identity"


def _passed_on_headers(upstream: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The backend's answer headers for the client, as the bytes that came (a backend may send UTF-8, which
    Starlette would not encode from str), less the hop-by-hop ones and those the switch sets itself."""
    return [(k, v) for k, v in upstream.headers.raw if k.lower().decode("latin-1") not in _DROPPED_RESPONSE_HEADERS]


def _no_answer_response(what: str, state: BackendState, exc: httpx.HTTPError) -> JSONResponse:
    return error_response(
        502,
        "BackendError",
        f"{what}: backend {state.model!r} ({state.config.url}) did not answer: {type(exc).__name__}: {exc}",
        {"backend": state.model},
    )
