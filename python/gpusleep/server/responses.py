"""The JSON answers of the control plane: the spec's 503 ``ModelSleepingError`` and the error envelope.

Every error body has one shape, OpenAI's: ``{"error": {"message", "type", "code", "param", ...}}``
(``code`` is the HTTP status, ``param`` the request parameter at fault or ``null``, extra fields only
add detail), so a client that understands the 503 also understands the others. The one exception is
the spec's 503 ``ModelSleepingError``, whose body is the spec's, exactly (no ``param``).

Note [One answer per exception class]
    What a failed ``sleep``/``wake_up`` answers is one entry of :data:`ERROR_ANSWERS` per exception class:
    the status, the error ``type``, the message and the extra fields. The entry of the first class along
    the exception's method resolution order (``type(exc).__mro__``) applies, so a subclass takes its own
    entry if it has one and its nearest base's otherwise: ``CaptureInProgressError`` its own before its
    base ``SleepStateError``'s, ``HostOutOfMemoryError`` its own before ``MemoryError``'s, and
    ``ModelOutOfMemoryError`` (a ``DistributedSleepError`` and an ``OutOfMemoryError``) the
    ``OutOfMemoryError`` one, as ``DistributedSleepError`` has none. ``BaseException`` answers everything
    else. The order of the entries does not matter; a new exception that needs its own answer is one new entry.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from ..errors import (
    CaptureInProgressError,
    CudaError,
    DriverUnavailableError,
    HostOutOfMemoryError,
    OutOfMemoryError,
    SleepStateError,
    WakeVerificationError,
)
from .gate import DrainTimeoutError, TransitionInProgressError, UnknownTagsError

__all__ = [
    "MODEL_SLEEPING_MESSAGE",
    "MODEL_SLEEPING_TYPE",
    "model_sleeping_body",
    "model_sleeping_response",
    "error_body",
    "error_response",
    "controller_error_response",
    "ErrorAnswer",
    "ERROR_ANSWERS",
    "error_answer_for",
    "request_too_large_response",
]

log = logging.getLogger("gpusleep.server")

MODEL_SLEEPING_TYPE = "ModelSleepingError"
MODEL_SLEEPING_MESSAGE = "Model is currently in sleep mode. Please wake it up first with a POST request to /wake_up"


def model_sleeping_body() -> dict:
    """The spec's 503 body, exactly."""
    return {"error": {"message": MODEL_SLEEPING_MESSAGE, "type": MODEL_SLEEPING_TYPE, "code": 503}}


def model_sleeping_response(
    retry_after_seconds: int | None = None, *, retry_after_s: int | None = None
) -> JSONResponse:
    """The spec's 503, with ``Retry-After: retry_after_seconds``. ``retry_after_s`` is the former spelling:
    still accepted, with a :class:`DeprecationWarning`."""
    if retry_after_s is not None:
        warnings.warn(
            "model_sleeping_response(retry_after_s=...) is deprecated; use retry_after_seconds=",
            DeprecationWarning,
            stacklevel=2,
        )
        if retry_after_seconds is None:
            retry_after_seconds = retry_after_s
    if retry_after_seconds is None:
        raise TypeError("model_sleeping_response() needs retry_after_seconds")
    return JSONResponse(model_sleeping_body(), status_code=503, headers={"Retry-After": str(int(retry_after_seconds))})


def error_body(
    status_code: int,
    error_type: str,
    message: str,
    param: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """``{"error": {"message", "type", "code", "param", **extra}}``."""
    body = {"message": message, "type": error_type, "code": status_code, "param": param}
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    return {"error": body}


def error_response(
    status_code: int,
    error_type: str,
    message: str,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    param: str | None = None,
) -> JSONResponse:
    extra = dict(extra or {})
    param = param if param is not None else extra.pop("param", None)
    return JSONResponse(
        error_body(status_code, error_type, message, param, extra), status_code=status_code, headers=dict(headers or {})
    )


def request_too_large_response(max_body_bytes: int, what: str) -> JSONResponse:
    """413 for a request body over the server's cap; the body is neither kept nor echoed."""
    return error_response(
        413,
        "RequestTooLargeError",
        f"{what}: the request body is larger than this server accepts ({max_body_bytes} bytes). Send a "
        "smaller body (fewer or shorter inputs per request), or start the server with a larger body cap.",
        {"max_body_bytes": max_body_bytes},
    )


@dataclass(frozen=True)
class ErrorAnswer:
    """How the control plane answers one class of exception (Note [One answer per exception class])."""

    status: int
    type: str
    message: Callable[[Any, str], str]  #: ``(exc, action) -> message``; ``action`` names the call
    extra: Callable[[Any], Mapping[str, Any]] | None = None  #: extra fields of the error body
    retry_after_seconds: int | None = None  #: the ``Retry-After`` header, if any
    log: str | None = None  #: ``"message"``: log the error; ``"traceback"``: log it with its traceback

    def response(self, exc: BaseException, action: str) -> JSONResponse:
        if self.log == "message":
            log.error("%s: %s", action, exc)
        elif self.log == "traceback":
            log.error("%s failed", action, exc_info=(type(exc), exc, exc.__traceback__))
        headers = {"Retry-After": str(self.retry_after_seconds)} if self.retry_after_seconds is not None else None
        return error_response(
            self.status,
            self.type,
            self.message(exc, action),
            self.extra(exc) if self.extra is not None else None,
            headers=headers,
        )


def _wake_verification_message(exc: WakeVerificationError, action: str) -> str:
    retry = (
        "POST /wake_up again restores it again"
        if not exc.host_copy_damaged
        else "the host copy itself is damaged, so another POST /wake_up fails the same way: sleep at level 2 "
        "and load the weights again"
    )
    return (
        f"{action}: the restored GPU memory did not match what the sleep copied out, so the wake was rolled "
        f"back: the model stays asleep and answers 503 rather than serve wrong weights; {retry}. Detail: {exc}"
    )


#: The answer of each exception class, found along the exception's MRO (Note [One answer per exception class]).
ERROR_ANSWERS: dict[type[BaseException], ErrorAnswer] = {
    DrainTimeoutError: ErrorAnswer(
        409,
        "SleepTimeoutError",
        lambda exc, action: (
            f"{action}: {exc.in_flight} request(s) were still running after {exc.timeout_seconds:g} s, so the "
            "model was not put to sleep and keeps serving. Retry when the server is less busy, use "
            "POST /sleep?mode=abort to cancel the running requests, or start the server with a longer "
            "drain timeout."
        ),
        lambda exc: {"in_flight": exc.in_flight, "timeout_s": exc.timeout_seconds},
    ),
    TransitionInProgressError: ErrorAnswer(
        409,
        "TransitionInProgressError",
        lambda exc, action: (
            f"{action}: a {exc.running} is already under way; this call was not started. The model "
            f"{'sleeps at level ' + str(exc.level) if exc.is_sleeping else 'is awake'} until it ends: "
            "retry once it has finished (GET /is_sleeping says where it stands)."
        ),
        lambda exc: {"running": exc.running, "is_sleeping": exc.is_sleeping, "level": exc.level},
        retry_after_seconds=1,
    ),
    UnknownTagsError: ErrorAnswer(
        400,
        "UnknownTagError",
        lambda exc, action: (
            f"{action}: unknown tag(s) {sorted(exc.unknown)}; this model's tags are {sorted(exc.known)}. "
            "Omit tags to wake everything."
        ),
        lambda exc: {"unknown_tags": sorted(exc.unknown), "known_tags": sorted(exc.known)},
    ),
    HostOutOfMemoryError: ErrorAnswer(  # the host is short, not the GPU
        507,
        "InsufficientHostMemoryError",
        lambda exc, action: (
            f"{action}: not enough host memory to keep the weights while the model sleeps: "
            f"{exc.bytes_needed} bytes of pinned host memory needed, {exc.bytes_available} bytes available "
            f"(limited by {exc.limited_by or 'the host'}). Nothing changed and the model keeps serving; free "
            f"host memory, reserve it ahead, or sleep at level 2 (nothing kept in host memory). Detail: {exc}"
        ),
        lambda exc: {
            "bytes_needed": exc.bytes_needed,
            "bytes_available": exc.bytes_available,
            "limited_by": exc.limited_by,
        },
    ),
    OutOfMemoryError: ErrorAnswer(
        409,
        "InsufficientMemoryError",
        lambda exc, action: (
            f"{action}: not enough GPU memory: {exc.bytes_needed} bytes needed, {exc.bytes_free} bytes free "
            f"on device {exc.device}. The model stays asleep and nothing was lost; free GPU memory "
            f"(stop what took it) and retry. Detail: {exc}"
        ),
        lambda exc: {"bytes_needed": exc.bytes_needed, "bytes_free": exc.bytes_free, "device": exc.device},
    ),
    MemoryError: ErrorAnswer(
        409,
        "InsufficientMemoryError",
        lambda exc, action: f"{action}: out of memory ({exc or 'no detail'}). Nothing changed; free memory and retry.",
    ),
    DriverUnavailableError: ErrorAnswer(501, "SleepModeUnavailableError", lambda exc, action: f"{action}: {exc}"),
    WakeVerificationError: ErrorAnswer(
        500,
        "WakeVerificationError",
        _wake_verification_message,
        lambda exc: {
            "tags": list(exc.tags),
            "host_copy_damaged": exc.host_copy_damaged,
            "blocks": [{"tag": tag, "address": address, "num_bytes": size} for tag, address, size in exc.blocks[:16]],
            "blocks_total": len(exc.blocks),
        },
        log="message",
    ),
    CaptureInProgressError: ErrorAnswer(
        409,
        "CaptureInProgressError",
        lambda exc, action: (
            f"{action}: a CUDA graph capture is in progress in the server process, and this call would "
            f"invalidate it. Nothing changed; retry once the capture has ended. Detail: {exc}"
        ),
        retry_after_seconds=1,
    ),
    SleepStateError: ErrorAnswer(409, "SleepStateError", lambda exc, action: f"{action}: {exc}"),
    ValueError: ErrorAnswer(400, "BadRequestError", lambda exc, action: f"{action}: {exc}"),
    CudaError: ErrorAnswer(
        500,
        "CudaError",
        lambda exc, action: (
            f"{action} failed in the CUDA driver: {exc}. The model keeps its previous state; see the server log."
        ),
        lambda exc: {"cuda_error": exc.name, "cuda_code": exc.code},
        log="traceback",
    ),
    BaseException: ErrorAnswer(
        500,
        "SleepModeError",
        lambda exc, action: f"{action} failed: {type(exc).__name__}: {exc}. See the server log for the traceback.",
        lambda exc: {"exception": type(exc).__name__},
        log="traceback",
    ),
}


def error_answer_for(cls: type[BaseException]) -> ErrorAnswer:
    """The entry of :data:`ERROR_ANSWERS` for exceptions of class ``cls``: that of the first class along
    ``cls.__mro__`` that has one (``BaseException`` at the latest)."""
    return next(ERROR_ANSWERS[base] for base in cls.__mro__ if base in ERROR_ANSWERS)


def controller_error_response(exc: BaseException, action: str) -> JSONResponse:
    """Map an exception raised by ``gate.sleep``/``gate.wake_up`` to its HTTP answer: the entry of
    :data:`ERROR_ANSWERS` for its class (Note [One answer per exception class]).

    ``action`` names the call (``"POST /sleep?level=2"``) so that the message says what was asked.
    """
    return error_answer_for(type(exc)).response(exc, action)
