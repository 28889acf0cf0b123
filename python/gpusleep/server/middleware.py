"""ASGI middleware that refuses protected requests with the spec's 503 while the model sleeps."""

from __future__ import annotations

from typing import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .gate import SleepGate
from .responses import model_sleeping_response

__all__ = ["SleepGateMiddleware"]


class SleepGateMiddleware:
    """Counts protected requests in flight (until their response is fully sent, streaming included)
    and answers 503 ``ModelSleepingError`` with ``Retry-After`` when the gate is closed.

    Pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses and background work are untouched.
    Thread safety: runs on the server's event loop, like the gate it calls.
    """

    def __init__(self, app: ASGIApp, gate: SleepGate, protected_paths: Iterable[str], retry_after_s: int) -> None:
        self.app = app
        self.gate = gate
        self.protected_paths = frozenset(p.rstrip("/") or "/" for p in protected_paths)
        self.retry_after_s = retry_after_s

    def is_protected(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":  # CORS preflight needs no model
            return False
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path):]
        return (path.rstrip("/") or "/") in self.protected_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.is_protected(scope):
            await self.app(scope, receive, send)
            return
        if not self.gate.try_admit():
            if self.gate.metrics is not None:
                self.gate.metrics.record_rejected()
            await model_sleeping_response(self.retry_after_s)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.release()
