"""``install(app, controller)``: add the sleep-mode control plane to a FastAPI or Starlette app."""

from __future__ import annotations

from starlette.applications import Starlette

from .controller import SleepController
from .gate import ReportsStats, SleepGate
from .idle import IdleSleeper
from .metrics import SleepMetrics
from .middleware import SleepGateMiddleware
from .openapi import add_control_routes
from .options import SleepModeOptions
from .routes import control_routes
from .sglang import sglang_routes

__all__ = ["install"]


def install(app: Starlette, controller: SleepController, options: SleepModeOptions | None = None) -> SleepGate:
    """Add ``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping``, ``GET /metrics``, SGLang's
    ``/release_memory_occupation`` and ``/resume_memory_occupation`` (``options.sglang_routes``) and the middleware
    that answers 503 ``ModelSleepingError`` on the protected endpoints while ``controller`` sleeps.

    Call it before the app starts (Starlette refuses middleware added later). Routes the app already
    has at the same paths take precedence. In a FastAPI app the control routes are in the OpenAPI
    schema. The middleware also caps request bodies (``options.max_body_bytes``, 413 past it), and
    with ``options.idle_sleep_seconds`` / ``options.wake_on_request`` sleeps an idle model and wakes it for a
    request (idle sleep runs while the app's lifespan runs: uvicorn's default). Returns the :class:`SleepGate`, also
    kept as ``app.state.gpusleep_gate``, for in-process use (``await gate.sleep(1)``).

    Example::

        app = FastAPI()
        gpusleep.server.install(app, allocator)      # allocator: a gpusleep.Allocator
    """
    options = options if options is not None else SleepModeOptions()
    for attr in ("sleep", "wake_up", "is_sleeping"):
        if not hasattr(controller, attr):
            raise TypeError(
                f"install(app, controller): controller {type(controller).__name__} has no {attr!r}; it needs "
                "sleep(level), wake_up(tags) and is_sleeping, like a gpusleep.Allocator"
            )
    metrics = None
    if options.metrics_path is not None:
        stats = controller.stats if isinstance(controller, ReportsStats) and callable(controller.stats) else None
        metrics = SleepMetrics(stats=stats)
    gate = SleepGate(controller, drain_timeout_seconds=options.drain_timeout_seconds, metrics=metrics)
    app.add_middleware(
        SleepGateMiddleware,
        gate=gate,
        protected_paths=options.protected_paths,
        retry_after_seconds=options.retry_after_seconds,
        max_body_bytes=options.max_body_bytes,
        wake_on_request=options.wake_on_request,
        wake_on_request_timeout_seconds=options.wake_on_request_timeout_seconds,
        idle_sleeper=(
            IdleSleeper(gate, options.idle_sleep_seconds, options.idle_sleep_level)
            if options.idle_sleep_seconds is not None
            else None
        ),
    )
    token = options.resolved_token()
    routes = control_routes(gate, control_token=token, metrics_path=options.metrics_path)
    if options.sglang_routes:
        routes += sglang_routes(gate, control_token=token)
    add_control_routes(app, routes)
    app.state.gpusleep_gate = gate
    return gate
