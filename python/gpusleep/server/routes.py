"""The control endpoints: ``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping`` and ``GET /metrics``.

Plain Starlette routes, so that they work in a FastAPI app and in a Starlette app alike.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .gate import SLEEP_MODES, SleepGate, SleepOutcome, WakeOutcome
from .responses import controller_error_response, error_response

__all__ = ["control_routes", "token_refusal"]

SLEEP_LEVELS = ("1", "2")
SLEEP_PARAMETERS = ("level", "mode")
WAKE_PARAMETERS = ("tags",)


def unknown_parameters(request: Request, known: tuple) -> Response | None:
    """400 naming the first query parameter the endpoint does not take (``?LEVEL=2`` is not ``?level=2``)."""
    for name in request.query_params.keys():
        if name not in known:
            action = f"{request.method} {request.url.path}"
            return error_response(
                400,
                "BadRequestError",
                f"{action}: unknown query parameter {name!r}; this endpoint takes only "
                f"{', '.join(known)} (names are case-sensitive). Nothing was changed.",
                param=name,
            )
    return None


def token_refusal(request: Request, control_token: str | None) -> Response | None:
    """401 when the control token is in force and the request does not present it; ``None``: go ahead."""
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


def control_routes(gate: SleepGate, *, control_token: str | None, metrics_path: str | None) -> list[Route]:
    """The routes of the control plane for ``gate``. ``control_token``: bearer token required by the
    two state-changing endpoints (``None``: open)."""

    def check_token(request: Request) -> Response | None:
        return token_refusal(request, control_token)

    def refusal(request: Request, parameters: tuple) -> Response | None:
        """What a state-changing endpoint answers before it does anything: 401 for a missing or wrong
        token, else 400 for a query parameter it does not take; ``None``: go ahead."""
        denied = check_token(request)
        return denied if denied is not None else unknown_parameters(request, parameters)

    async def answer(action: str, call: Callable[[], Awaitable[Any]], body: Callable[[Any], dict]) -> Response:
        """Await ``call()`` (the gate's sleep, wake-up or refresh) and answer ``body(outcome)`` as JSON, or
        the controller's error as the response that names ``action``."""
        try:
            outcome = await call()
        except Exception as exc:
            return controller_error_response(exc, action)
        return JSONResponse(body(outcome))

    async def sleep(request: Request) -> Response:
        refused = refusal(request, SLEEP_PARAMETERS)
        if refused is not None:
            return refused
        levels = request.query_params.getlist("level")
        if len(levels) > 1 or (levels and levels[0].strip() not in SLEEP_LEVELS):
            return error_response(
                400,
                "InvalidSleepLevelError",
                f"POST /sleep: level must be 1 (weights kept in host memory, KV cache discarded) or 2 "
                f"(everything discarded), got {', '.join(repr(v) for v in levels)}. Example: POST /sleep?level=1",
                param="level",
            )
        modes = request.query_params.getlist("mode")
        if len(modes) > 1 or (modes and modes[0].strip() not in SLEEP_MODES):
            return error_response(
                400,
                "BadRequestError",
                f"POST /sleep: mode must be 'wait' (let the running requests finish, at most the drain "
                f"timeout) or 'abort' (cancel them; they are answered 503), got "
                f"{', '.join(repr(v) for v in modes)}. Example: POST /sleep?level=1&mode=abort",
                param="mode",
            )
        level = int(levels[0]) if levels else 1
        mode = modes[0].strip() if modes else "wait"
        action = f"POST /sleep?level={level}" + (f"&mode={mode}" if modes else "")
        return await answer(action, lambda: gate.sleep(level, mode), _sleep_json)

    async def wake_up(request: Request) -> Response:
        refused = refusal(request, WAKE_PARAMETERS)
        if refused is not None:
            return refused
        tags = request.query_params.getlist("tags")
        action = "POST /wake_up" + (f"?tags={'&tags='.join(tags)}" if tags else "")
        if any(not t.strip() for t in tags):
            return error_response(
                400,
                "BadRequestError",
                f"{action}: tags must not be empty; omit tags to wake everything.",
                param="tags",
            )
        return await answer(action, lambda: gate.wake_up([t.strip() for t in tags] if tags else None), _wake_json)

    async def is_sleeping(request: Request) -> Response:
        return await answer("GET /is_sleeping", gate.refresh, lambda sleeping: {"is_sleeping": sleeping})

    routes = [
        Route("/sleep", sleep, methods=["POST"], name="gpusleep_sleep"),
        Route("/wake_up", wake_up, methods=["POST"], name="gpusleep_wake_up"),
        Route("/is_sleeping", is_sleeping, methods=["GET"], name="gpusleep_is_sleeping"),
    ]
    if metrics_path is not None and gate.metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        registry = gate.metrics.registry

        async def metrics(request: Request) -> Response:
            body = await gate.run_control(generate_latest, registry)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        routes.append(Route(metrics_path, metrics, methods=["GET"], name="gpusleep_metrics"))
    return routes


def _sleep_json(outcome: SleepOutcome) -> dict:
    """The answer of ``POST /sleep``."""
    return {
        "is_sleeping": outcome.is_sleeping,
        "level": outcome.level,
        "requested_level": outcome.requested_level,
        "already_sleeping": outcome.already_sleeping,
        "mode": outcome.mode,
        "tags": list(outcome.tags),
        "bytes_offloaded": outcome.bytes_offloaded,
        "bytes_discarded": outcome.bytes_discarded,
        "bytes_freed": outcome.bytes_freed,
        "aborted_requests": outcome.aborted_requests,
        "drain_seconds": outcome.drain_seconds,
        "sleep_seconds": outcome.sleep_seconds,
        "report": _report_json(outcome.report),
    }


def _wake_json(outcome: WakeOutcome) -> dict:
    """The answer of ``POST /wake_up``."""
    return {
        "is_sleeping": outcome.is_sleeping,
        "already_awake": outcome.already_awake,
        "level": outcome.level,
        "tags": list(outcome.tags) if outcome.tags is not None else None,
        "tags_woken": list(outcome.tags_woken),
        "bytes_restored": outcome.bytes_restored,
        "bytes_zeroed": outcome.bytes_zeroed,
        "bytes_mapped": outcome.bytes_mapped,
        "wake_seconds": outcome.wake_seconds,
        "report": _report_json(outcome.report),
    }


def _report_json(report: Any) -> Any:
    """A controller's report as JSON: dataclasses as dicts, plain JSON values as they are, else ``None``."""
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    if report is None or isinstance(report, (dict, list, str, int, float, bool)):
        return report
    return None
