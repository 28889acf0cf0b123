"""The control endpoints: ``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping`` and ``GET /metrics``.

Plain Starlette routes, so that they work in a FastAPI app and in a Starlette app alike.
"""

from __future__ import annotations

import dataclasses
import hmac
from typing import Any, List, Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .gate import SleepGate
from .responses import controller_error_response, error_response

__all__ = ["control_routes"]

SLEEP_LEVELS = ("1", "2")


def control_routes(gate: SleepGate, *, control_token: Optional[str], metrics_path: Optional[str]) -> List[Route]:
    """The routes of the control plane for ``gate``. ``control_token``: bearer token required by the
    two state-changing endpoints (``None``: open)."""

    def check_token(request: Request) -> Optional[Response]:
        if control_token is None:
            return None
        action = f"{request.method} {request.url.path}"
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return error_response(
                401,
                "AuthenticationError",
                f"{action} needs a bearer token: send 'Authorization: Bearer <token>' with the token the "
                "server was started with (--token or the GPUSLEEP_TOKEN environment variable).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(presented.strip().encode(), control_token.encode()):
            return error_response(
                401,
                "AuthenticationError",
                f"{action}: the bearer token is not the one this server was started with.",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return None

    async def sleep(request: Request) -> Response:
        denied = check_token(request)
        if denied is not None:
            return denied
        levels = request.query_params.getlist("level")
        if len(levels) > 1 or (levels and levels[0].strip() not in SLEEP_LEVELS):
            return error_response(
                400,
                "InvalidSleepLevelError",
                f"POST /sleep: level must be 1 (weights kept in host memory, KV cache discarded) or 2 "
                f"(everything discarded), got {', '.join(repr(v) for v in levels)}. Example: POST /sleep?level=1",
                {"param": "level"},
            )
        level = int(levels[0]) if levels else 1
        try:
            outcome = await gate.sleep(level)
        except Exception as exc:
            return controller_error_response(exc, f"POST /sleep?level={level}")
        return JSONResponse(
            {
                "is_sleeping": outcome.is_sleeping,
                "level": outcome.level,
                "drain_seconds": outcome.drain_seconds,
                "sleep_seconds": outcome.sleep_seconds,
                "report": _report_json(outcome.report),
            }
        )

    async def wake_up(request: Request) -> Response:
        denied = check_token(request)
        if denied is not None:
            return denied
        tags = request.query_params.getlist("tags")
        action = "POST /wake_up" + (f"?tags={'&tags='.join(tags)}" if tags else "")
        if any(not t.strip() for t in tags):
            return error_response(
                400, "BadRequestError", f"{action}: tags must not be empty; omit tags to wake everything.",
                {"param": "tags"},
            )
        try:
            outcome = await gate.wake_up([t.strip() for t in tags] if tags else None)
        except Exception as exc:
            return controller_error_response(exc, action)
        return JSONResponse(
            {
                "is_sleeping": outcome.is_sleeping,
                "tags": list(outcome.tags) if outcome.tags is not None else None,
                "wake_seconds": outcome.wake_seconds,
                "report": _report_json(outcome.report),
            }
        )

    async def is_sleeping(request: Request) -> Response:
        try:
            sleeping = await gate.refresh()
        except Exception as exc:
            return controller_error_response(exc, "GET /is_sleeping")
        return JSONResponse({"is_sleeping": sleeping})

    routes = [
        Route("/sleep", sleep, methods=["POST"], name="gpusleep_sleep"),
        Route("/wake_up", wake_up, methods=["POST"], name="gpusleep_wake_up"),
        Route("/is_sleeping", is_sleeping, methods=["GET"], name="gpusleep_is_sleeping"),
    ]
    if metrics_path is not None and gate.metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        registry = gate.metrics.registry

        async def metrics(request: Request) -> Response:
            body = await run_in_threadpool(generate_latest, registry)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        routes.append(Route(metrics_path, metrics, methods=["GET"], name="gpusleep_metrics"))
    return routes


def _report_json(report: Any) -> Any:
    """A controller's report as JSON: dataclasses as dicts, plain JSON values as they are, else ``None``."""
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    if report is None or isinstance(report, (dict, list, str, int, float, bool)):
        return report
    return None
