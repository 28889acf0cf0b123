"""The HTTP control plane of sleep mode, for any FastAPI or Starlette model server.

Two lines::

    import gpusleep.server
    gpusleep.server.install(app, controller)   # controller: a gpusleep.Allocator, or anything with
                                               # sleep(level), wake_up(tags) and is_sleeping

adds ``POST /sleep[?level=1|2]``, ``POST /wake_up[?tags=...]``, ``GET /is_sleeping`` and
``GET /metrics``, and makes the protected endpoints answer 503 ``ModelSleepingError`` while the model
sleeps. Importing this package never imports torch and needs no GPU.
"""

from .controller import SleepController
from .gate import DrainTimeoutError, SleepGate, SleepOutcome, UnknownTagsError, WakeOutcome
from .install import install
from .metrics import SleepMetrics
from .middleware import SleepGateMiddleware
from .options import DEFAULT_PROTECTED_PATHS, TOKEN_ENV_VAR, SleepModeOptions
from .responses import MODEL_SLEEPING_MESSAGE, MODEL_SLEEPING_TYPE, model_sleeping_body

__all__ = [
    "DEFAULT_PROTECTED_PATHS",
    "DrainTimeoutError",
    "MODEL_SLEEPING_MESSAGE",
    "MODEL_SLEEPING_TYPE",
    "SleepController",
    "SleepGate",
    "SleepGateMiddleware",
    "SleepMetrics",
    "SleepModeOptions",
    "SleepOutcome",
    "TOKEN_ENV_VAR",
    "UnknownTagsError",
    "WakeOutcome",
    "install",
    "model_sleeping_body",
]
