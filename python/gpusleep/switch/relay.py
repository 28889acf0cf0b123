"""Relaying a backend's answer to the client of ``gpusleep switch``.

Note [The lease ends with the backend's answer]
    A request's lease on its backend (Note [Switches are serialized] in router.py) protects the backend's
    work, not the client's download. So the relay reads the backend's answer as fast as the backend sends
    it, into a buffer of at most ``response_buffer_bytes``, and gives the lease back as soon as the
    backend's answer is complete; the client gets the buffer at its own pace. A client that reads slowly,
    or not at all, then cannot keep its model awake and every other model's requests waiting behind it.
    The buffer is bounded: past it the relay stops reading the backend until the client catches up (the
    backend waits, as it would without a switch, and so does a switch away from it). A client that leaves
    ends the relay: the backend's connection is closed (the backend sees the disconnect) and the lease is
    given back. A backend that breaks off its answer breaks off the client's too (the connection is
    dropped after what arrived), as a direct connection would.

Note [The answer names the model that was asked for]
    A backend with ``served_model`` answers with its own name in ``"model"``; the client asked for the alias,
    and gets it back: a JSON answer's top-level ``"model"`` and each server-sent event's (``data: {...}``) are
    rewritten from the served name to the alias. Only uncompressed answers are rewritten; a JSON answer larger
    than :data:`REWRITE_MAX_BYTES` and any other content type are relayed as they came.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["BufferedRelay", "ModelRenamer", "REWRITE_MAX_BYTES"]

#: Largest JSON answer whose ``"model"`` is rewritten (Note [The answer names the model that was asked for]).
REWRITE_MAX_BYTES = 16 << 20


class ModelRenamer:
    """Rewrites ``"model": served`` to ``"model": alias`` in a JSON answer or in server-sent events, chunk by
    chunk (:meth:`feed`, then :meth:`end`)."""

    def __init__(self, served: str, alias: str, content_type: str) -> None:
        self.served, self.alias = served, alias
        self.events = content_type.lower().startswith("text/event-stream")
        self._pending = bytearray()
        self._passing = False  # a JSON answer too large to rewrite: passed through from then on

    @classmethod
    def for_answer(cls, served: str | None, alias: str, headers: httpx.Headers) -> ModelRenamer | None:
        if served is None or served == alias:
            return None
        if headers.get("content-encoding", "identity").strip().lower() != "identity":
            return None
        content_type = headers.get("content-type", "").lower()
        if not (content_type.startswith("application/json") or content_type.startswith("text/event-stream")):
            return None
        return cls(served, alias, content_type)

    def _rename(self, document: bytes) -> bytes:
        try:
            value = json.loads(document)
        except (ValueError, RecursionError):
            return document
        if not (isinstance(value, dict) and value.get("model") == self.served):
            return document
        try:
            return json.dumps({**value, "model": self.alias}, ensure_ascii=False).encode()
        except (ValueError, RecursionError):
            return document

    def feed(self, chunk: bytes) -> bytes:
        if self._passing:
            return chunk
        self._pending += chunk
        if not self.events:
            if len(self._pending) > REWRITE_MAX_BYTES:
                self._passing = True
                out, self._pending = bytes(self._pending), bytearray()
                return out
            return b""
        cut = self._pending.rfind(b"\n") + 1
        if cut == 0:
            return b""
        lines, self._pending = bytes(self._pending[:cut]), self._pending[cut:]
        return b"".join(self._line(line) for line in lines.splitlines(keepends=True))

    def _line(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        body = line[5:].strip()
        if not body.startswith(b"{"):
            return line
        ending = line[len(line.rstrip(b"\r\n")) :]
        return b"data: " + self._rename(body) + ending

    def end(self) -> bytes:
        rest, self._pending = bytes(self._pending), bytearray()
        if self._passing or self.events:
            return rest
        return self._rename(rest)


class BufferedRelay(Response):
    """The answer of ``upstream`` (an httpx response opened with ``stream=True``), relayed as it comes
    through a buffer of at most ``limit_bytes``. ``on_backend_done`` runs once, when the backend's answer
    is complete, has failed, or the client has left, after the backend's connection is closed."""

    def __init__(
        self,
        upstream: httpx.Response,
        on_backend_done: Callable[[], None],
        limit_bytes: int,
        status_code: int,
        raw_headers: list[tuple[bytes, bytes]],
        renamer: ModelRenamer | None = None,
    ) -> None:
        # As StreamingResponse does: no body attribute, so no Content-Length is made up (the answer is chunked).
        # The headers are bytes as the backend sent them (Starlette would only encode str headers as Latin-1).
        self.status_code = status_code
        self.background = None
        self.raw_headers = list(raw_headers)
        self.upstream = upstream
        self.on_backend_done = on_backend_done
        self.limit_bytes = limit_bytes
        self.renamer = renamer
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered_bytes = 0
        self._backend_done = False
        self._backend_error: BaseException | None = None
        self._changed = anyio.Condition()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._read_backend)
                tasks.start_soon(self._cancel_when_the_client_leaves, receive, tasks.cancel_scope)
                await self._send_to_client(send)
                tasks.cancel_scope.cancel()
        finally:
            await self._finish_backend()
        if self._backend_error is not None:
            raise self._backend_error  # the server drops the connection: the client sees a cut-off answer

    async def _read_backend(self) -> None:
        try:
            async for chunk in self.upstream.aiter_raw():
                await self._put(self.renamer.feed(chunk) if self.renamer is not None else chunk)
            if self.renamer is not None:
                await self._put(self.renamer.end())
        except httpx.HTTPError as exc:
            self._backend_error = exc
        finally:
            await self._finish_backend()
            async with self._changed:
                self._changed.notify_all()

    async def _put(self, chunk: bytes) -> None:
        if not chunk:
            return
        async with self._changed:
            while self._buffered_bytes >= self.limit_bytes:
                await self._changed.wait()
            self._chunks.append(chunk)
            self._buffered_bytes += len(chunk)
            self._changed.notify_all()

    async def _finish_backend(self) -> None:
        if self._backend_done:
            return
        self._backend_done = True
        with anyio.CancelScope(shield=True):
            await self.upstream.aclose()
        self.on_backend_done()

    async def _send_to_client(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        while True:
            async with self._changed:
                while not self._chunks and not self._backend_done:
                    await self._changed.wait()
                if not self._chunks:
                    break
                chunk = self._chunks.popleft()
                self._buffered_bytes -= len(chunk)
                self._changed.notify_all()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self._backend_error is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _cancel_when_the_client_leaves(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()
