"""The control endpoints in the app's OpenAPI schema (FastAPI apps), so that clients, docs and fuzzers
(Schemathesis) see ``/sleep``, ``/wake_up``, ``/is_sleeping`` and ``/metrics`` with their parameters
and answers. A plain Starlette app has no schema: the routes are added as they are."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

__all__ = ["add_control_routes", "CONTROL_ROUTE_DOCS"]

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": "integer"},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}


def _answers(ok: str, **errors: str) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": ok, "content": {"application/json": {"schema": {"type": "object"}}}}}
    for status, description in errors.items():
        out[status.lstrip("_")] = {
            "description": description,
            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
        }
    return out


_CONTROL_ERRORS = {
    "_400": "BadRequestError / InvalidSleepLevelError / UnknownTagError: a bad parameter; nothing changed",
    "_401": "AuthenticationError: the control token is missing or wrong",
    "_409": "TransitionInProgressError, SleepTimeoutError, InsufficientMemoryError, CaptureInProgressError, "
    "SleepStateError: not now; nothing changed",
    "_501": "SleepModeUnavailableError: no CUDA device, sleep mode cannot work here",
    "_507": "InsufficientHostMemoryError: not enough host memory to keep the weights (level 1)",
}

#: The JSON body of the SGLang dialect's routes: other keys are accepted and ignored.
_SGLANG_BODY: dict[str, Any] = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "tags": {
                        "type": ["array", "null"],
                        "items": {"type": "string", "minLength": 1},
                        "description": "tags to release or resume; null or missing: every tag",
                    }
                },
            }
        }
    },
}

#: OpenAPI details of each control route, by route name (the SGLang dialect's GET routes: below).
CONTROL_ROUTE_DOCS: dict[str, dict[str, Any]] = {
    "gpusleep_sleep": {
        "summary": "Put the model to sleep",
        "parameters": [
            {
                "name": "level",
                "in": "query",
                "required": False,
                "description": "1: weights kept in host memory, KV cache discarded (default); 2: everything discarded",
                "schema": {"type": "integer", "enum": [1, 2], "default": 1},
            },
            {
                "name": "mode",
                "in": "query",
                "required": False,
                "description": "wait: let the running requests finish (default); abort: cancel them (503)",
                "schema": {"type": "string", "enum": ["wait", "abort"], "default": "wait"},
            },
        ],
        "responses": _answers("Asleep: level reached, already_sleeping, tags, bytes and seconds", **_CONTROL_ERRORS),
    },
    "gpusleep_wake_up": {
        "summary": "Wake the model up (all tags, or the tags given)",
        "parameters": [
            {
                "name": "tags",
                "in": "query",
                "required": False,
                "style": "form",
                "explode": True,
                "description": "tags to wake (repeat the parameter); omit to wake everything",
                "schema": {"type": "array", "items": {"type": "string"}},
            },
        ],
        "responses": _answers("Woken: already_awake, tags woken, bytes and seconds", **_CONTROL_ERRORS),
    },
    "gpusleep_is_sleeping": {
        "summary": "Whether the model sleeps",
        "responses": _answers('{"is_sleeping": bool}'),
    },
    "gpusleep_sglang_release_post": {
        "requestBody": _SGLANG_BODY,
        "summary": "SGLang dialect: release GPU memory (sleep) of the tags in the JSON body, or of all",
        "description": 'Body {"tags": ["weights", "kv_cache", "cuda_graph"] | null}; other keys are ignored. '
        'Answers {"success": bool, "message": str}.',
        "responses": _answers('{"success": true, "message": ..., "tags": [...]}', **_CONTROL_ERRORS),
    },
    "gpusleep_sglang_resume_post": {
        "requestBody": _SGLANG_BODY,
        "summary": "SGLang dialect: resume (wake) the tags in the JSON body, or every released tag",
        "description": 'Body {"tags": [...] | null}; other keys are ignored. '
        'Answers {"success": bool, "message": str}.',
        "responses": _answers('{"success": true, "message": ..., "tags": [...]}', **_CONTROL_ERRORS),
    },
    "gpusleep_metrics": {
        "summary": "Prometheus metrics of sleep mode",
        "responses": {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
        },
    },
}


for _name in ("gpusleep_sglang_release", "gpusleep_sglang_resume"):  # GET: the same, without a documented body
    CONTROL_ROUTE_DOCS[f"{_name}_get"] = {
        k: v for k, v in CONTROL_ROUTE_DOCS[f"{_name}_post"].items() if k != "requestBody"
    }


def add_control_routes(app: Starlette, routes: list[Route]) -> None:
    """Add ``routes`` to ``app``: documented in the OpenAPI schema of a FastAPI app, as they are otherwise."""
    try:
        from fastapi import FastAPI
    except ImportError:  # pragma: no cover - fastapi is in the server extra
        FastAPI = None  # type: ignore[assignment,misc]  # noqa: N806
    if FastAPI is None or not isinstance(app, FastAPI):
        app.router.routes.extend(routes)
        return
    for route in routes:
        docs = dict(CONTROL_ROUTE_DOCS.get(route.name, {}))
        summary = docs.pop("summary", None)
        responses = docs.pop("responses", None)
        app.add_api_route(
            route.path,
            route.endpoint,
            methods=sorted(route.methods - {"HEAD"}) if route.methods else None,
            name=route.name,
            summary=summary,
            openapi_extra={**docs, **({"responses": responses} if responses else {})},
            tags=["sleep mode"],
        )
