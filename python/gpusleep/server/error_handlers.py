"""``install_error_handlers(app)``: every error a FastAPI app answers, in the control plane's one shape.

Without them, FastAPI answers a validation error with 422 ``{"detail": [...]}`` (echoing the input it
refused, however large), an unknown path with ``{"detail": "Not Found"}`` and a crash with plain text.
With them, each of these is ``{"error": {"message", "type", "code", "param"}}`` like the control
plane's own errors and the 503 of the spec; the message says what was wrong and never repeats the
request body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from .responses import error_response

__all__ = ["install_error_handlers", "HTTP_ERROR_TYPES", "MAX_MESSAGE_CHARS"]

log = logging.getLogger("gpusleep.server")

#: The error ``type`` of the answers that Starlette produces itself.
HTTP_ERROR_TYPES: Mapping[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "BadRequestError",
}
MAX_MESSAGE_CHARS = 1000  #: longer messages are cut, so that no answer grows with the request
_MAX_PROBLEMS = 3  #: validation problems spelled out in the message; the rest are counted


def install_error_handlers(app: Starlette) -> None:
    """Answer validation errors (400), Starlette's HTTP errors (404, 405, ...) and unhandled exceptions
    (500) of ``app`` in the one error shape. Call it before the app starts."""
    try:
        from fastapi.exceptions import RequestValidationError
    except ImportError:  # a plain Starlette app has no request validation
        RequestValidationError = None  # type: ignore[assignment,misc]  # noqa: N806

    async def validation_error(request: Request, exc: Any) -> JSONResponse:
        problems = list(exc.errors())
        param = _param(problems[0].get("loc", ())) if problems else "body"
        if problems and problems[0].get("type") == "json_invalid":
            param = "body"
        parts = [_describe(p) for p in problems[:_MAX_PROBLEMS]]
        if len(problems) > _MAX_PROBLEMS:
            parts.append(f"and {len(problems) - _MAX_PROBLEMS} more problem(s)")
        message = f"{request.method} {request.url.path}: invalid request: {'; '.join(parts) or 'malformed body'}"
        return error_response(400, "BadRequestError", _cut(message), param=param)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        message = f"{request.method} {request.url.path}: {detail}"
        if status == 404:
            message += ". GET /openapi.json lists the endpoints of this server."
        elif status == 405:
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
            message += f"; this path takes {allowed}." if allowed else "."
        return error_response(
            status,
            HTTP_ERROR_TYPES.get(status, "HTTPError" if status < 500 else "InternalServerError"),
            _cut(message),
            headers=exc.headers,
        )

    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=(type(exc), exc, exc.__traceback__))
        return error_response(
            500,
            "InternalServerError",
            f"{request.method} {request.url.path} failed on the server ({type(exc).__name__}). "
            "This is a bug: the server log has the traceback.",
        )

    if RequestValidationError is not None:
        app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unhandled)


def _param(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "content")`` -> ``"messages.0.content"``; the body itself -> ``"body"``."""
    path = (
        [str(part) for part in loc[1:]]
        if loc and loc[0] in ("body", "query", "path", "header")
        else [str(p) for p in loc]
    )
    return ".".join(path) or (str(loc[0]) if loc else "body")


def _describe(problem: Mapping[str, Any]) -> str:
    """One validation problem as text: where and what, never the value that was sent."""
    where = _param(problem.get("loc", ()))
    if problem.get("type") == "json_invalid":
        return f"the body is not valid JSON ({(problem.get('ctx') or {}).get('error', 'decode error')})"
    return f"{where}: {problem.get('msg', 'invalid value')}"


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
