"""Options of the HTTP control plane (:func:`gpusleep.server.install`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .._renamed import renamed_attributes

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PROTECTED_PATHS",
    "SGLANG_PROTECTED_PATHS",
    "SPEC_PROTECTED_PATHS",
    "TOKEN_ENV_VAR",
    "SleepModeOptions",
]

#: The endpoints of the sleep-mode spec (vLLM's) that need the model's weights.
SPEC_PROTECTED_PATHS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/pooling",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/audio/transcriptions",
    "/invocations",
)

#: SGLang's own endpoints that run the model (its ``http_server.py``), beyond the OpenAI-compatible
#: ones already in the spec's list: native generation and encoding, classification, the Responses
#: API and Vertex AI's default predict route. ``/health_generate`` is left out on purpose: a health
#: probe that fails while the model sleeps would get the server restarted.
SGLANG_PROTECTED_PATHS: tuple[str, ...] = (
    "/generate",
    "/generate_from_file",
    "/encode",
    "/classify",
    "/v1/classify",
    "/v1/responses",
    "/vertex_generate",
)

#: The endpoints that need the model's weights: while the model sleeps they answer 503
#: ``ModelSleepingError``. The spec's list and SGLang's. Everything else (``/tokenize``,
#: ``/detokenize``, ``/v1/models``, health checks, ...) keeps working.
DEFAULT_PROTECTED_PATHS: tuple[str, ...] = SPEC_PROTECTED_PATHS + SGLANG_PROTECTED_PATHS

#: Environment variable read for the control-plane bearer token when no token is given as an option.
TOKEN_ENV_VAR = "GPUSLEEP_TOKEN"

#: Default cap of a request body, bytes: room for OpenAI's largest uploads (25 MB audio), small enough
#: that a flood of huge bodies cannot exhaust the server's memory.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@renamed_attributes(
    {
        "drain_timeout_s": "drain_timeout_seconds",
        "retry_after_s": "retry_after_seconds",
        "idle_sleep_s": "idle_sleep_seconds",
        "wake_on_request_timeout_s": "wake_on_request_timeout_seconds",
    }
)
@dataclass(frozen=True)
class SleepModeOptions:
    """How :func:`gpusleep.server.install` sets up the control plane. Immutable; safe to share. The former
    ``_s`` spellings of the durations (``drain_timeout_s``, ...) still work, deprecated (Note [One spelling per
    unit] in gpusleep/_renamed.py)."""

    #: Paths (exact match, a trailing slash is ignored) refused with 503 while the model sleeps or
    #: while it is going to sleep or waking up.
    protected_paths: tuple[str, ...] = DEFAULT_PROTECTED_PATHS
    #: Bearer token required by ``POST /sleep`` and ``POST /wake_up``. ``None``: read the environment
    #: variable ``TOKEN_ENV_VAR``; no token there either means the control endpoints are open.
    #: ``GET /is_sleeping`` and ``GET /metrics`` only read state and stay open.
    control_token: str | None = None
    #: How long ``POST /sleep`` waits for the protected requests in flight to finish (or, with
    #: ``mode=abort``, to stop), seconds. Only requests whose body has arrived count. When they are not
    #: done by then, the sleep is abandoned (the model stays awake) and the call answers 409.
    drain_timeout_seconds: float = 30.0
    #: Value of the ``Retry-After`` header of the 503 ``ModelSleepingError`` answer, seconds.
    retry_after_seconds: int = 5
    #: Where the Prometheus metrics are served; ``None`` serves none (register
    #: ``gate.metrics.registry``'s collectors in your own registry instead).
    metrics_path: str | None = "/metrics"
    #: Largest request body accepted on any path of the app, bytes; a larger one is answered 413
    #: ``RequestTooLargeError`` before any endpoint reads it. ``None``: no cap (protected requests are
    #: still read whole before they are admitted).
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    #: Idle sleep (opt-in): put the model to sleep at ``idle_sleep_level`` once no protected request has
    #: run for this many seconds. ``None``: never. Runs while the app's lifespan runs (uvicorn's default).
    idle_sleep_seconds: float | None = None
    #: Level of the idle sleep, 1 (weights kept in host memory) or 2 (weights discarded).
    idle_sleep_level: int = 1
    #: Wake on request (opt-in): a protected request that arrives while the model sleeps wakes it and is
    #: then served, instead of the spec's 503 ``ModelSleepingError`` (the default).
    wake_on_request: bool = False
    #: How long such a request waits for the model to be awake (its wake-up, or a sleep or wake-up
    #: already under way), seconds; past it, the 503.
    wake_on_request_timeout_seconds: float = 120.0
    #: Also serve SGLang's dialect, ``GET``/``POST /release_memory_occupation`` and
    #: ``/resume_memory_occupation`` (Note [The SGLang dialect] in ``gpusleep/server/sglang.py``), behind
    #: the same gate and token as ``/sleep`` and ``/wake_up``.
    sglang_routes: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.protected_paths, str):
            raise TypeError("protected_paths must be a sequence of paths, not a single string")
        object.__setattr__(self, "protected_paths", tuple(self.protected_paths))
        for path in self.protected_paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"every protected path must be a string starting with '/', got {path!r}")
        if self.drain_timeout_seconds <= 0:
            raise ValueError(f"drain_timeout_seconds must be > 0 seconds, got {self.drain_timeout_seconds!r}")
        if self.max_body_bytes is not None and (isinstance(self.max_body_bytes, bool) or self.max_body_bytes < 1):
            raise ValueError(f"max_body_bytes must be a positive number of bytes or None, got {self.max_body_bytes!r}")
        if self.idle_sleep_seconds is not None and not (0 < self.idle_sleep_seconds < float("inf")):
            raise ValueError(
                f"idle_sleep_seconds must be a finite number of seconds > 0 or None, got {self.idle_sleep_seconds!r}"
            )
        if self.idle_sleep_level not in (1, 2):
            raise ValueError(f"idle_sleep_level must be 1 or 2, got {self.idle_sleep_level!r}")
        if not (0 < self.wake_on_request_timeout_seconds < float("inf")):
            raise ValueError(
                "wake_on_request_timeout_seconds must be a finite number of seconds > 0, "
                f"got {self.wake_on_request_timeout_seconds!r}"
            )
        if self.retry_after_seconds < 0:
            raise ValueError(f"retry_after_seconds must be >= 0 seconds, got {self.retry_after_seconds!r}")

    def resolved_token(self) -> str | None:
        """The token in force: the option, else the environment variable, else ``None`` (open)."""
        token = self.control_token if self.control_token is not None else os.environ.get(TOKEN_ENV_VAR)
        return token or None
