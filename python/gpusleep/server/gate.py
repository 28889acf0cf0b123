"""The :class:`SleepGate`: admission of protected requests and the serialized sleep/wake transitions.

Note [Sleep never pulls memory from under a request]
    Sleep first closes the gate (new protected requests get the 503), then waits until the protected
    requests already admitted have finished (their whole response sent), and only then calls
    ``controller.sleep``. If they do not finish within ``drain_timeout_s`` the gate reopens, the
    controller is not called, and :class:`DrainTimeoutError` says how many were still running.
    The gate stays closed while the model sleeps and while it wakes up; it reopens once the
    controller reports that nothing is asleep any more. Sleep and wake-up calls hold one lock, so
    they run one at a time, in arrival order.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, FrozenSet, Optional, Sequence, Tuple

import anyio
import anyio.to_thread

from .controller import SleepController, read_is_sleeping

if TYPE_CHECKING:
    from .metrics import SleepMetrics

__all__ = ["SleepGate", "SleepOutcome", "WakeOutcome", "DrainTimeoutError", "UnknownTagsError"]

log = logging.getLogger("gpusleep.server")


class DrainTimeoutError(TimeoutError):
    """Protected requests were still running when the drain timeout expired; the model was not put to sleep."""

    def __init__(self, in_flight: int, timeout_s: float) -> None:
        super().__init__(f"{in_flight} request(s) still running after {timeout_s:g} s; sleep abandoned")
        self.in_flight = in_flight
        self.timeout_s = timeout_s


class UnknownTagsError(ValueError):
    """``wake_up`` named tags the controller does not know."""

    def __init__(self, unknown: FrozenSet[str], known: FrozenSet[str]) -> None:
        super().__init__(f"unknown tag(s) {sorted(unknown)}; known tags: {sorted(known)}")
        self.unknown = unknown
        self.known = known


@dataclass(frozen=True)
class SleepOutcome:
    """What one ``POST /sleep`` did."""

    level: int
    is_sleeping: bool  #: the controller's state after the call
    drain_seconds: float  #: time spent waiting for the requests in flight
    sleep_seconds: float  #: time spent in ``controller.sleep``
    report: Any  #: what ``controller.sleep`` returned (a :class:`gpusleep.SleepReport` for an Allocator)


@dataclass(frozen=True)
class WakeOutcome:
    """What one ``POST /wake_up`` did."""

    tags: Optional[Tuple[str, ...]]  #: the tags asked for; ``None``: everything
    is_sleeping: bool  #: the controller's state after the call (True after a partial, staged wake)
    wake_seconds: float  #: time spent in ``controller.wake_up``
    report: Any  #: what ``controller.wake_up`` returned (a :class:`gpusleep.WakeReport` for an Allocator)


class SleepGate:
    """Decides which protected requests may run, and puts the controller to sleep and wakes it up.

    Thread safety: ``try_admit``, ``release`` and the ``async`` methods must be called on the server's
    event loop (the middleware and the routes do). The controller's blocking calls run in a worker
    thread, one at a time. The read-only properties may be read from any thread.
    """

    def __init__(
        self,
        controller: SleepController,
        *,
        drain_timeout_s: float = 30.0,
        metrics: Optional["SleepMetrics"] = None,
    ) -> None:
        self.controller = controller
        self.drain_timeout_s = float(drain_timeout_s)
        self.metrics = metrics
        self._sleeping = read_is_sleeping(controller)
        self._admitting = not self._sleeping
        self._in_flight = 0
        self._drained: Optional[anyio.Event] = None
        self._lock: Optional[anyio.Lock] = None
        self._transition: Optional[str] = None
        self._transitions_started = 0
        if metrics is not None:
            metrics.bind_gate(self)

    # ------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        """Protected requests admitted and not finished yet."""
        return self._in_flight

    @property
    def admitting(self) -> bool:
        """True while protected requests are let through (the model is awake and no transition runs)."""
        return self._admitting

    @property
    def transition(self) -> Optional[str]:
        """``"sleep"`` or ``"wake_up"`` while one runs (including the drain), else ``None``."""
        return self._transition

    @property
    def is_sleeping(self) -> bool:
        """The controller's state as of the last transition or :meth:`refresh` (never blocks)."""
        return self._sleeping

    # -------------------------------------------------------------- admission
    def try_admit(self) -> bool:
        """Admit one protected request (the caller must :meth:`release` it), or refuse it while asleep."""
        if not self._admitting:
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        """A protected request admitted by :meth:`try_admit` has finished."""
        self._in_flight -= 1
        if self._in_flight == 0 and self._drained is not None:
            self._drained.set()

    # ------------------------------------------------------------ transitions
    def _transition_lock(self) -> anyio.Lock:
        if self._lock is None:  # created on the event loop, at first use
            self._lock = anyio.Lock()
        return self._lock

    @contextlib.asynccontextmanager
    async def _transitioning(self, name: str) -> AsyncIterator[None]:
        """One sleep or wake at a time: admission is closed while the body runs; afterwards the gate
        follows the controller's state, or, on failure, ``_after_failure`` decides and the error goes on."""
        async with self._transition_lock():
            self._transition = name
            self._transitions_started += 1
            self._admitting = False
            try:
                yield
            except BaseException as exc:
                await self._after_failure(name, exc)
                raise
            else:
                await self._follow_controller()
            finally:
                self._transition = None

    async def refresh(self) -> bool:
        """Re-read ``controller.is_sleeping`` (for a controller also driven outside the control plane).

        While a transition runs, returns the state from before it without waiting for it."""
        if self._transition is not None:
            return self._sleeping
        started = self._transitions_started
        sleeping = await anyio.to_thread.run_sync(read_is_sleeping, self.controller)
        if self._transition is None and self._transitions_started == started:  # nothing changed it meanwhile
            self._sleeping = sleeping
            self._admitting = not sleeping
        return sleeping

    async def sleep(self, level: int) -> SleepOutcome:
        """Stop admitting, wait for the requests in flight (at most ``drain_timeout_s``), then sleep.

        Raises :class:`DrainTimeoutError` (nothing changed, the gate reopens) or whatever
        ``controller.sleep`` raised (the gate then follows the controller's state)."""
        async with self._transitioning("sleep"):
            t0 = time.perf_counter()
            await self._drain()
            drain_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            report = await anyio.to_thread.run_sync(self.controller.sleep, level)
            sleep_seconds = time.perf_counter() - t1
        log.info(
            "sleep(level=%d): drained requests in %.3f s, controller.sleep took %.3f s, is_sleeping=%s",
            level, drain_seconds, sleep_seconds, self._sleeping,
        )
        if self.metrics is not None:
            self.metrics.record_sleep(level, sleep_seconds, drain_seconds, report)
        return SleepOutcome(level, self._sleeping, drain_seconds, sleep_seconds, report)

    async def wake_up(self, tags: Optional[Sequence[str]] = None) -> WakeOutcome:
        """Wake ``tags`` (everything when ``None``); admission reopens once nothing is asleep.

        Raises :class:`UnknownTagsError` for tags the controller does not know (when it lists its
        ``known_tags``), or whatever ``controller.wake_up`` raised; the model then stays asleep."""
        tag_tuple = tuple(tags) if tags is not None else None
        async with self._transitioning("wake_up"):
            if tag_tuple is not None:
                await anyio.to_thread.run_sync(self._check_tags, tag_tuple)
            t0 = time.perf_counter()
            report = await anyio.to_thread.run_sync(
                self.controller.wake_up, list(tag_tuple) if tag_tuple is not None else None
            )
            wake_seconds = time.perf_counter() - t0
        log.info(
            "wake_up(tags=%s): controller.wake_up took %.3f s, is_sleeping=%s",
            list(tag_tuple) if tag_tuple is not None else "all", wake_seconds, self._sleeping,
        )
        if self.metrics is not None:
            self.metrics.record_wake(wake_seconds, report)
        return WakeOutcome(tag_tuple, self._sleeping, wake_seconds, report)

    # ---------------------------------------------------------------- helpers
    async def _drain(self) -> None:
        if self._in_flight == 0:
            return
        self._drained = anyio.Event()
        try:
            with anyio.move_on_after(self.drain_timeout_s):
                await self._drained.wait()
        finally:
            self._drained = None
        if self._in_flight > 0:
            in_flight = self._in_flight
            log.warning(
                "sleep abandoned: %d request(s) still running after %.3f s; the model keeps serving",
                in_flight, self.drain_timeout_s,
            )
            raise DrainTimeoutError(in_flight, self.drain_timeout_s)

    async def _after_failure(self, action: str, exc: BaseException) -> None:
        with anyio.CancelScope(shield=True):
            await self._follow_controller()
        log.warning("%s failed (%s: %s); is_sleeping=%s", action, type(exc).__name__, exc, self._sleeping)
        if self.metrics is not None:
            self.metrics.record_failure(action)

    async def _follow_controller(self) -> None:
        try:
            self._sleeping = await anyio.to_thread.run_sync(read_is_sleeping, self.controller)
        except Exception:  # keep the last known state; the caller raises the original error
            log.exception("reading controller.is_sleeping failed; keeping is_sleeping=%s", self._sleeping)
        self._admitting = not self._sleeping

    def _check_tags(self, tags: Tuple[str, ...]) -> None:
        for tag in tags:
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"every tag must be a non-empty string, got {tag!r}")
        known = getattr(self.controller, "known_tags", None)
        if known is None:
            return
        known = frozenset(known() if callable(known) else known)
        unknown = frozenset(tags) - known
        if unknown:
            raise UnknownTagsError(unknown, known)
