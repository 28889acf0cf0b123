"""ASGI middleware that caps request bodies and admits protected requests only once their body is in.

Note [A slow client never holds a sleep]
    A protected request is admitted (counted in flight, see Note [Sleep never pulls memory from under
    a request] in gate.py) only after its whole body has arrived: the middleware reads the body first,
    while the request is not counted, then asks the gate. A client that sends its body at one byte a
    second therefore cannot delay a sleep; if the model went to sleep meanwhile it gets the 503 once its
    body is in. Reading the body first also enforces the body cap (413) before any endpoint sees it.
    A request refused while the model sleeps is refused after its body too: a client that is still
    sending when the server answers and closes would get a connection reset instead of the 503.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._renamed import renamed_attributes
from .gate import SleepGate
from .idle import IdleSleeper, wake_for_request
from .responses import model_sleeping_response, request_too_large_response

__all__ = ["SleepGateMiddleware"]

log = logging.getLogger("gpusleep.server")


@renamed_attributes(
    {"retry_after_s": "retry_after_seconds", "wake_on_request_timeout_s": "wake_on_request_timeout_seconds"}
)
class SleepGateMiddleware:
    """Answers 503 ``ModelSleepingError`` with ``Retry-After`` on the protected paths while the gate is
    closed, counts the admitted ones until their response is fully sent (streaming included), and
    answers 413 to any request whose body is over ``max_body_bytes`` (``None``: no cap).

    With ``wake_on_request`` a protected request that finds the model asleep wakes it and is served
    (Note [Wake on request] in idle.py); with an ``idle_sleeper`` the model sleeps when idle, for as
    long as the app's ASGI lifespan runs (Note [Idle sleep]).

    Pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses and background work are untouched.
    A request cancelled by a ``mode="abort"`` sleep gets the 503 when its response had not started.
    Thread safety: runs on the server's event loop, like the gate it calls.
    """

    def __init__(
        self,
        app: ASGIApp,
        gate: SleepGate,
        protected_paths: Iterable[str],
        retry_after_seconds: int,
        max_body_bytes: int | None = None,
        wake_on_request: bool = False,
        wake_on_request_timeout_seconds: float = 120.0,
        idle_sleeper: IdleSleeper | None = None,
    ) -> None:
        self.app = app
        self.gate = gate
        self.protected_paths = frozenset(p.rstrip("/") or "/" for p in protected_paths)
        self.retry_after_seconds = retry_after_seconds
        self.max_body_bytes = max_body_bytes
        self.wake_on_request = wake_on_request
        self.wake_on_request_timeout_seconds = wake_on_request_timeout_seconds
        self.idle_sleeper = idle_sleeper

    def is_protected(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":  # CORS preflight needs no model
            return False
        return (self._path(scope).rstrip("/") or "/") in self.protected_paths

    @staticmethod
    def _path(scope: Scope) -> str:
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        return path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.idle_sleeper is not None:
            await self._lifespan_with_idle_sleep(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        protected = self.is_protected(scope)
        if not protected and self.max_body_bytes is None:
            await self.app(scope, receive, send)
            return
        what = f"{scope.get('method', '')} {self._path(scope)}"
        if self.max_body_bytes is not None and _content_length(scope) > self.max_body_bytes:
            await request_too_large_response(self.max_body_bytes, what)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:  # Note [A slow client never holds a sleep]: not counted while this runs
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.max_body_bytes is not None and size > self.max_body_bytes:
                chunks.clear()
                await request_too_large_response(self.max_body_bytes, what)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay = _Replay(b"".join(chunks), receive)
        chunks.clear()
        if not protected:
            await self.app(scope, replay, send)
            return
        await self._run_admitted(scope, replay, send)

    async def _lifespan_with_idle_sleep(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.idle_sleeper is not None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.idle_sleeper.run)
            try:
                await self.app(scope, receive, send)
            finally:
                tasks.cancel_scope.cancel()

    async def _run_admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        admission = self.gate.admit()
        woke = False
        if admission is None and self.wake_on_request:
            admission = await wake_for_request(self.gate, self.wake_on_request_timeout_seconds)
            woke = admission is not None
        if admission is None:  # the gate closed while the body was arriving
            await self._refuse(scope, receive, send)
            return
        started = False
        first_byte_seen = not woke

        async def tracking_send(message: Message) -> None:
            nonlocal started, first_byte_seen
            if message["type"] == "http.response.start":
                started = True
            elif (
                not first_byte_seen
                and message["type"] == "http.response.body"
                and (message.get("body") or not message.get("more_body", False))
            ):
                first_byte_seen = True
                seconds = time.perf_counter() - arrived
                log.info(
                    "%s %s: first byte %.3f s after arrival, model woken for it",
                    scope.get("method"),
                    self._path(scope),
                    seconds,
                )
                if self.gate.metrics is not None:
                    self.gate.metrics.record_wake_on_request_first_byte(seconds)
            await send(message)

        try:
            with anyio.CancelScope() as cancel_scope:
                admission.cancel_scope = cancel_scope
                if admission.aborted:
                    cancel_scope.cancel()
                try:
                    await self.app(scope, receive, tracking_send)
                except Exception:
                    if not admission.aborted or started:
                        raise
                    log.info("%s %s: aborted by a sleep (mode=abort)", scope.get("method"), scope["path"])
            if admission.aborted and not started:
                await self._refuse(scope, receive, send)
        finally:
            self.gate.release(admission)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.gate.metrics is not None:
            self.gate.metrics.record_rejected()
        await model_sleeping_response(self.retry_after_seconds)(scope, receive, send)


class _Replay:
    """An ASGI ``receive`` that hands the buffered body over once, then defers to the real one
    (which reports the client's disconnect)."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self._body: bytes | None = body
        self._receive = receive

    async def __call__(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self._receive()


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return -1
