"""The JSON answers of the control plane: the spec's 503 ``ModelSleepingError`` and the error envelope.

Every error body has the spec's shape ``{"error": {"message", "type", "code", ...}}``, so a client
that understands the 503 also understands the others.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from starlette.responses import JSONResponse

from ..errors import CudaError, DriverUnavailableError, OutOfMemoryError, SleepStateError
from .gate import DrainTimeoutError, UnknownTagsError

__all__ = [
    "MODEL_SLEEPING_MESSAGE",
    "MODEL_SLEEPING_TYPE",
    "model_sleeping_body",
    "model_sleeping_response",
    "error_response",
    "controller_error_response",
]

log = logging.getLogger("gpusleep.server")

MODEL_SLEEPING_TYPE = "ModelSleepingError"
MODEL_SLEEPING_MESSAGE = (
    "Model is currently in sleep mode. Please wake it up first with a POST request to /wake_up"
)


def model_sleeping_body() -> dict:
    """The spec's 503 body, exactly."""
    return {"error": {"message": MODEL_SLEEPING_MESSAGE, "type": MODEL_SLEEPING_TYPE, "code": 503}}


def model_sleeping_response(retry_after_s: int) -> JSONResponse:
    return JSONResponse(model_sleeping_body(), status_code=503, headers={"Retry-After": str(int(retry_after_s))})


def error_response(
    status_code: int,
    error_type: str,
    message: str,
    extra: Optional[Mapping[str, Any]] = None,
    headers: Optional[Mapping[str, str]] = None,
) -> JSONResponse:
    body = {"message": message, "type": error_type, "code": status_code}
    if extra:
        body.update(extra)
    return JSONResponse({"error": body}, status_code=status_code, headers=dict(headers or {}))


def controller_error_response(exc: BaseException, action: str) -> JSONResponse:
    """Map an exception raised by ``gate.sleep``/``gate.wake_up`` to its HTTP answer.

    ``action`` names the call (``"POST /sleep?level=2"``) so that the message says what was asked.
    """
    if isinstance(exc, DrainTimeoutError):
        return error_response(
            409,
            "SleepTimeoutError",
            f"{action}: {exc.in_flight} request(s) were still running after {exc.timeout_s:g} s, so the "
            "model was not put to sleep and keeps serving. Retry when the server is less busy, or "
            "start it with a longer drain timeout.",
            {"in_flight": exc.in_flight, "timeout_s": exc.timeout_s},
        )
    if isinstance(exc, UnknownTagsError):
        return error_response(
            400,
            "UnknownTagError",
            f"{action}: unknown tag(s) {sorted(exc.unknown)}; this model's tags are {sorted(exc.known)}. "
            "Omit tags to wake everything.",
            {"unknown_tags": sorted(exc.unknown), "known_tags": sorted(exc.known)},
        )
    if isinstance(exc, OutOfMemoryError):
        return error_response(
            409,
            "InsufficientMemoryError",
            f"{action}: not enough GPU memory: {exc.bytes_needed} bytes needed, {exc.bytes_free} bytes free "
            f"on device {exc.device}. The model stays asleep and nothing was lost; free GPU memory "
            f"(stop what took it) and retry. Detail: {exc}",
            {"bytes_needed": exc.bytes_needed, "bytes_free": exc.bytes_free, "device": exc.device},
        )
    if isinstance(exc, MemoryError):
        return error_response(
            409,
            "InsufficientMemoryError",
            f"{action}: out of memory ({exc or 'no detail'}). Nothing changed; free memory and retry.",
        )
    if isinstance(exc, DriverUnavailableError):
        return error_response(501, "SleepModeUnavailableError", f"{action}: {exc}")
    if isinstance(exc, SleepStateError):
        return error_response(409, "SleepStateError", f"{action}: {exc}")
    if isinstance(exc, ValueError):
        return error_response(400, "BadRequestError", f"{action}: {exc}")
    if isinstance(exc, CudaError):
        log.error("%s failed", action, exc_info=(type(exc), exc, exc.__traceback__))
        return error_response(
            500,
            "CudaError",
            f"{action} failed in the CUDA driver: {exc}. The model keeps its previous state; see the server log.",
            {"cuda_error": exc.name, "cuda_code": exc.code},
        )
    log.error("%s failed", action, exc_info=(type(exc), exc, exc.__traceback__))
    return error_response(
        500,
        "SleepModeError",
        f"{action} failed: {type(exc).__name__}: {exc}. See the server log for the traceback.",
        {"exception": type(exc).__name__},
    )
