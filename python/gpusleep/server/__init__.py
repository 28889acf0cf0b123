"""The HTTP control plane of sleep mode, for any FastAPI or Starlette model server.

Two lines::

    import gpusleep.server
    gpusleep.server.install(app, controller)   # controller: a gpusleep.Allocator, or anything with
                                               # sleep(level), wake_up(tags) and is_sleeping

adds ``POST /sleep[?level=1|2][&mode=wait|abort]``, ``POST /wake_up[?tags=...]``, ``GET /is_sleeping`` and
``GET /metrics``, and makes the protected endpoints answer 503 ``ModelSleepingError`` while the model
sleeps. ``install_error_handlers(app)`` puts FastAPI's own errors (validation, 404, 405, 500) in the
same ``{"error": {...}}`` shape. Importing this package never imports torch and needs no GPU.
"""

from .controller import SleepController
from .error_handlers import install_error_handlers
from .gate import (
    SLEEP_MODES,
    Admission,
    DrainTimeoutError,
    SleepGate,
    SleepOutcome,
    TransitionInProgressError,
    UnknownTagsError,
    WakeOutcome,
)
from .install import install
from .metrics import SleepMetrics
from .middleware import SleepGateMiddleware
from .options import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PROTECTED_PATHS,
    SGLANG_PROTECTED_PATHS,
    SPEC_PROTECTED_PATHS,
    TOKEN_ENV_VAR,
    SleepModeOptions,
)
from .responses import MODEL_SLEEPING_MESSAGE, MODEL_SLEEPING_TYPE, error_body, model_sleeping_body

__all__ = [
    "Admission",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PROTECTED_PATHS",
    "DrainTimeoutError",
    "MODEL_SLEEPING_MESSAGE",
    "MODEL_SLEEPING_TYPE",
    "SGLANG_PROTECTED_PATHS",
    "SLEEP_MODES",
    "SPEC_PROTECTED_PATHS",
    "SleepController",
    "SleepGate",
    "SleepGateMiddleware",
    "SleepMetrics",
    "SleepModeOptions",
    "SleepOutcome",
    "TOKEN_ENV_VAR",
    "TransitionInProgressError",
    "UnknownTagsError",
    "WakeOutcome",
    "error_body",
    "install",
    "install_error_handlers",
    "model_sleeping_body",
]
