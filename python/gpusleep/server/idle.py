"""Idle sleep and wake on request: the model sleeps when nobody uses it and wakes when somebody does.

Note [Idle sleep]
    :class:`IdleSleeper` runs for the lifetime of the app (the middleware starts it from the ASGI
    lifespan). Idle time counts from the last moment a protected request was admitted or finished
    (``gate.last_activity_monotonic``); a request in flight means not idle. Once the model has been idle
    for ``idle_sleep_seconds`` it calls ``gate.sleep(level, mode="wait")``, the same transition as
    ``POST /sleep``, so every promise of the gate holds (drain, one transition at a time, 503 or wake on
    request afterwards). A failed idle sleep (no CUDA device, not enough host memory) is logged and
    counted, and is tried again only after another idle period, never in a tight loop.

Note [Wake on request]
    With ``wake_on_request`` a protected request that finds the gate closed does not get the 503: it
    waits (at most ``wake_on_request_timeout_seconds``) for a transition under way to end, wakes the model
    itself when it still sleeps (the first such request does; the others wait for its wake-up), and
    is then admitted like any other. When that wake-up fails (out of GPU memory, say), every request
    that waited for it gets the 503 at once: none tries again in turn (each would wait as long, and fail
    the same way); the next request to arrive does. Time from its arrival to the first byte of its response (time to
    first token for a streamed completion) is logged and exported as
    ``gpusleep_wake_on_request_first_byte_seconds``.
"""

from __future__ import annotations

import logging
import time

import anyio

from .._renamed import renamed_attributes, renamed_keywords
from .gate import Admission, SleepGate, TransitionInProgressError

__all__ = ["IdleSleeper", "wake_for_request"]

log = logging.getLogger("gpusleep.server")


@renamed_attributes({"idle_s": "idle_seconds"})
class IdleSleeper:
    """Puts ``gate``'s model to sleep at ``level`` after ``idle_seconds`` seconds without a protected request
    (Note [Idle sleep]). :meth:`run` loops until cancelled; run it on the server's event loop."""

    def __init__(self, gate: SleepGate, idle_seconds: float, level: int) -> None:
        if not idle_seconds > 0:
            raise ValueError(f"idle_seconds must be > 0 seconds, got {idle_seconds!r}")
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level!r}")
        self.gate = gate
        self.idle_seconds = float(idle_seconds)
        self.level = level
        self._failed_at: float | None = None

    def seconds_until_due(self, now: float) -> float:
        """How long until the model counts as idle (0 or less: it does now)."""
        since = self.gate.last_activity_monotonic
        if self._failed_at is not None and self._failed_at > since:
            since = self._failed_at
        return since + self.idle_seconds - now

    def due(self, now: float) -> bool:
        gate = self.gate
        return (
            gate.admitting
            and gate.in_flight == 0
            and gate.transition is None
            and not gate.is_sleeping
            and self.seconds_until_due(now) <= 0
        )

    async def run(self) -> None:
        log.info("idle sleep on: level %d after %g s without a model request", self.level, self.idle_seconds)
        self.gate.last_activity_monotonic = max(self.gate.last_activity_monotonic, time.monotonic())  # from startup
        while True:
            now = time.monotonic()
            if self.due(now):
                await self._sleep_now()
                continue
            await anyio.sleep(min(max(self.seconds_until_due(now), 0.0), self.idle_seconds) + 0.01)

    async def _sleep_now(self) -> None:
        idle_seconds = time.monotonic() - self.gate.last_activity_monotonic
        try:
            outcome = await self.gate.sleep(self.level, mode="wait")
        except TransitionInProgressError:
            return  # someone else is changing the state; look again at the next tick
        except Exception as exc:
            self._failed_at = time.monotonic()
            log.warning(
                "idle sleep (level %d after %.1f s idle) failed: %s: %s; trying again after another %g s idle",
                self.level,
                idle_seconds,
                type(exc).__name__,
                exc,
                self.idle_seconds,
            )
            return
        self._failed_at = None
        if self.gate.metrics is not None and outcome.is_sleeping and not outcome.already_sleeping:
            self.gate.metrics.record_idle_sleep()
        log.info("idle sleep: asleep at level %d after %.1f s without a model request", outcome.level, idle_seconds)


@renamed_keywords({"timeout_s": "timeout_seconds"})
async def wake_for_request(gate: SleepGate, timeout_seconds: float) -> Admission | None:
    """Wait for the model to be awake, waking it when it sleeps, then admit one protected request
    (Note [Wake on request]). ``None`` when it is not awake within ``timeout_seconds`` or a wake-up it waited for
    (its own or another request's) failed."""
    failures_before = gate.wake_failures
    with anyio.move_on_after(timeout_seconds):
        while True:
            admission = gate.admit()
            if admission is not None:
                return admission
            if gate.wake_failures != failures_before:
                log.warning("wake on request: the wake-up this request waited for failed; answering 503")
                return None
            if gate.transition is not None:
                await gate.wait_for_transition()
                continue
            if not gate.is_sleeping:  # closed without a transition: the controller was changed outside
                await gate.refresh()
                admission = gate.admit()
                if admission is not None:
                    return admission
            try:
                log.info("wake on request: the model sleeps at level %d; waking it for a request", gate.sleep_level)
                await gate.wake_up(None)
            except TransitionInProgressError:
                continue
            except Exception as exc:
                log.warning("wake on request failed (%s: %s); answering 503", type(exc).__name__, exc)
                return None
            if gate.metrics is not None:
                gate.metrics.record_wake_on_request()
    log.warning("wake on request: the model was not awake after %g s; answering 503", timeout_seconds)
    return None
