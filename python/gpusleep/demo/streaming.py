"""Server-sent events (SSE) for the demo's streamed answers, as the OpenAI API sends them: one
``data: {json}`` event per chunk, then ``data: [DONE]``.

Note [A stream never outlives its model work]
    The engine runs one request at a time in a worker thread, and sends each chunk to the event loop as
    soon as it is generated (``anyio.from_thread``). The response waits for that thread before it
    returns, also when the client went away or a ``mode=abort`` sleep cancelled it: the worker sees
    the stop flag at its next chunk and ends. Since the sleep gate counts a request until its response
    returns, no model work of a stream can still run when a sleep takes the memory away. An error raised
    once the stream has started (headers sent) becomes an ``{"error": {...}}`` event, which OpenAI's
    clients raise as an error; no ``[DONE]`` follows it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.to_thread
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import GpusleepError
from ..server.responses import error_body, model_sleeping_body
from .engine import GenerationAbortedError

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["EventStream", "Emit", "Producer"]

log = logging.getLogger("gpusleep.demo")

Emit = Callable[[dict], None]  #: sends one chunk to the client (from the worker thread)
#: The work of a stream: ``produce(emit, client_gone)`` runs in a worker thread, calls ``emit`` per chunk and
#: stops early (any exception will do) once ``client_gone()`` is True.
Producer = Callable[[Emit, Callable[[], bool]], None]

DONE = b"data: [DONE]\n\n"


class _ClientGone(GpusleepError):
    """The response ended before the producer did: nobody reads its chunks any more."""


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response whose chunks come from ``produce`` running in a worker thread
    (Note [A stream never outlives its model work]). ``what`` names the request in error events and logs.
    One response serves one request: not reusable."""

    def __init__(self, produce: Producer, what: str) -> None:
        self._produce = produce
        self._what = what
        self._stopped = threading.Event()
        self._send_chunk: MemoryObjectSendStream[bytes]
        self._chunks: MemoryObjectReceiveStream[bytes]
        self._send_chunk, self._chunks = anyio.create_memory_object_stream(math.inf)
        super().__init__(
            self._events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._run_producer)
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._stopped.set()  # the worker ends at its next chunk; the task group waits for it
                self._chunks.close()

    async def _run_producer(self) -> None:
        await anyio.to_thread.run_sync(self._work)  # not abandoned on cancellation: waited for

    async def _events(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    def _put(self, data: bytes) -> None:
        if self._stopped.is_set():
            raise _ClientGone()
        anyio.from_thread.run_sync(self._send_chunk.send_nowait, data)

    def _work(self) -> None:
        try:
            self._produce(lambda chunk: self._put(_event(chunk)), self._stopped.is_set)
            self._put(DONE)
        except (_ClientGone, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        except Exception as exc:  # after the headers: the error travels as an event
            if self._stopped.is_set():
                return
            try:
                self._put(_event(self._error(exc)))
            except (_ClientGone, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
        finally:
            try:
                anyio.from_thread.run_sync(self._send_chunk.close)
            except RuntimeError:  # the event loop is gone (server shutdown)
                pass

    def _error(self, exc: Exception) -> dict:
        if isinstance(exc, GenerationAbortedError):
            return model_sleeping_body()
        if isinstance(exc, ValueError):
            return error_body(400, "BadRequestError", f"{self._what}: {exc}")
        log.error("%s failed while streaming", self._what, exc_info=(type(exc), exc, exc.__traceback__))
        return error_body(
            500,
            "InternalServerError",
            f"{self._what} failed on the server ({type(exc).__name__}). "
            "This is a bug: the server log has the traceback.",
        )


def _event(chunk: Any) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
