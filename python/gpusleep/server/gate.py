"""The :class:`SleepGate`: admission of protected requests and the sleep/wake transitions.

Note [Sleep never pulls memory from under a request]
    A protected request counts as *in flight* from the moment its whole body has arrived and it is
    admitted, until its whole response is sent (the middleware reads the body first, so a client that
    sends slowly never holds a sleep back). Sleep first asks the controller whether it can sleep at all
    (``check_sleep``), and only then closes the gate (new protected requests get the 503), waits until
    the requests in flight have finished, and calls ``controller.sleep``. With ``mode="abort"`` it
    cancels them instead of waiting: their model work stops at its next check and they are answered
    503. If they are not done within ``drain_timeout_seconds`` the gate reopens, the controller is not called,
    and :class:`DrainTimeoutError` says how many were still running. The gate stays closed while the
    model sleeps and while it wakes up; it reopens once the controller reports that nothing is asleep.

Note [One transition at a time]
    A sleep or wake-up that arrives while another one runs (its drain included) is refused at once
    with :class:`TransitionInProgressError` (HTTP 409 with the current state), rather than queued
    behind it. The check and the claim happen on the event loop without an ``await`` in between.
    One exception, as in vLLM: a sleep that arrives while a sleep runs does not conflict with it (a
    client retrying a slow ``POST /sleep``, two RL workers releasing one server), so it waits for that
    sleep to end and then runs as if it had arrived just after (usually a no-op: the model already
    sleeps at that level). If a wake-up claimed the gate in between, that is a conflicting transition
    and the 409 stands.

Note [Control calls never wait behind model work]
    Every blocking call into the controller (``sleep``, ``wake_up``, ``is_sleeping``, ``stats``) runs
    on worker threads counted by the gate's own capacity limiter, not by the thread pool that runs
    the model endpoints, so probes and control calls answer while hundreds of requests hold that pool.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Protocol,
    TypeGuard,
    TypeVar,
    Union,
    runtime_checkable,
)

import anyio
import anyio.to_thread

from .._renamed import renamed_attributes
from ..errors import GpusleepError
from .controller import SleepController, read_is_sleeping

if TYPE_CHECKING:
    from .metrics import SleepMetrics

__all__ = [
    "Admission",
    "ChecksSleep",
    "DrainTimeoutError",
    "KnowsTags",
    "ReportsSleepLevel",
    "ReportsSleepingTags",
    "ReportsStats",
    "SleepsTags",
    "SLEEP_MODES",
    "SleepGate",
    "SleepOutcome",
    "TransitionInProgressError",
    "UnknownTagsError",
    "WakeOutcome",
    "known_tags",
    "sleeps_tags",
]

log = logging.getLogger("gpusleep.server")

T = TypeVar("T")

#: ``wait``: let the requests in flight finish (at most ``drain_timeout_seconds``); ``abort``: cancel them.
SLEEP_MODES = ("wait", "abort")
_CONTROL_THREADS = 4  #: worker threads reserved for control calls (one transition plus reads)


@renamed_attributes({"timeout_s": "timeout_seconds"})
class DrainTimeoutError(TimeoutError, GpusleepError):
    """Protected requests were still running when the drain timeout expired; the model was not put to sleep."""

    def __init__(self, in_flight: int, timeout_seconds: float) -> None:
        super().__init__(f"{in_flight} request(s) still running after {timeout_seconds:g} s; sleep abandoned")
        self.in_flight = in_flight
        self.timeout_seconds = timeout_seconds


class UnknownTagsError(ValueError, GpusleepError):
    """``wake_up`` named tags the controller does not know."""

    def __init__(self, unknown: frozenset[str], known: frozenset[str]) -> None:
        super().__init__(f"unknown tag(s) {sorted(unknown)}; known tags: {sorted(known)}")
        self.unknown = unknown
        self.known = known


class TransitionInProgressError(RuntimeError, GpusleepError):
    """A sleep or wake-up was asked for while another one (``running``) was still under way."""

    def __init__(self, running: str, is_sleeping: bool, level: int) -> None:
        super().__init__(f"a {running} is already under way")
        self.running = running
        self.is_sleeping = is_sleeping
        self.level = level


# ------------------------------------------------------------------------------------------------------------
# Optional capabilities of a controller, beyond SleepController's sleep / wake_up / is_sleeping. The gate asks
# ``isinstance(controller, ChecksSleep)`` and so on; a controller opts in by having the member, nothing to inherit.

#: Tags, as a property or a zero-argument method returning them.
TagsOrTagsMethod = Union[Iterable[str], Callable[[], Iterable[str]]]  # noqa: UP007 - a runtime alias, kept a typing.Union


@runtime_checkable
class ChecksSleep(Protocol):
    """Can say in advance that ``sleep(level)`` would fail (no CUDA device, say): ``check_sleep`` raises that
    error without changing anything. The gate calls it before it stops admitting requests."""

    def check_sleep(self, level: int) -> None: ...


@runtime_checkable
class ReportsSleepLevel(Protocol):
    """Knows the depth it sleeps at (1 or 2; 0 while awake), so a gate made while it sleeps starts there."""

    @property
    def sleep_level(self) -> int: ...


@runtime_checkable
class KnowsTags(Protocol):
    """Lists its tags, so that a wake-up naming other tags is refused with :class:`UnknownTagsError`."""

    @property
    def known_tags(self) -> TagsOrTagsMethod: ...


@runtime_checkable
class ReportsSleepingTags(Protocol):
    """Lists the tags that sleep now, so that a sleep of tags that already sleep is a no-op."""

    @property
    def sleeping_tags(self) -> TagsOrTagsMethod: ...


@runtime_checkable
class ReportsStats(Protocol):
    """Has ``stats()`` (``gpusleep.AllocatorStats``, or any object with its ``tags`` and ``host``), read at
    scrape time for the per-tag memory figures of ``/metrics``."""

    def stats(self) -> Any: ...


class SleepsTags(Protocol):
    """Can put single tags to sleep: ``sleep`` takes ``tags=`` (a :class:`gpusleep.Allocator` does). A
    signature is no member, so :func:`sleeps_tags` checks it rather than ``isinstance``."""

    def sleep(self, level: int, tags: Sequence[str] | None = None) -> Any: ...


def sleeps_tags(controller: SleepController) -> TypeGuard[SleepsTags]:
    """Whether ``controller.sleep`` can be called with ``tags=``."""
    return _takes_keyword(controller.sleep, "tags")


def known_tags(controller: object) -> frozenset[str] | None:
    """The controller's ``known_tags`` (a property or a method), or ``None`` when it does not list them."""
    return _tags(controller.known_tags) if isinstance(controller, KnowsTags) else None


def _tags(value: TagsOrTagsMethod | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(value() if callable(value) else value)


@dataclass(eq=False)
class Admission:
    """One admitted protected request. ``aborted`` turns True when a ``mode="abort"`` sleep cancels it."""

    aborted: bool = False
    cancel_scope: anyio.CancelScope | None = None

    def abort(self) -> None:
        self.aborted = True
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()


@dataclass(frozen=True)
class SleepOutcome:
    """What one ``POST /sleep`` did."""

    level: int  #: the depth the model sleeps at now (2 after a level-2 sleep, even if 1 was asked next)
    requested_level: int
    mode: str  #: "wait" or "abort"
    already_sleeping: bool  #: the model was asleep before the call
    is_sleeping: bool  #: the controller's state after the call
    tags: tuple[str, ...]  #: tags put to sleep or deepened by this call (empty for a no-op)
    bytes_offloaded: int
    bytes_discarded: int
    bytes_freed: int
    drain_seconds: float  #: time spent waiting for (or aborting) the requests in flight
    sleep_seconds: float  #: time spent in ``controller.sleep`` (0 for a no-op)
    aborted_requests: int  #: requests in flight cancelled by ``mode="abort"``
    report: Any  #: what ``controller.sleep`` returned (a :class:`gpusleep.SleepReport` for an Allocator)


@dataclass(frozen=True)
class WakeOutcome:
    """What one ``POST /wake_up`` did."""

    tags: tuple[str, ...] | None  #: the tags asked for; ``None``: everything
    already_awake: bool  #: nothing was asleep before the call
    is_sleeping: bool  #: the controller's state after the call (True after a partial, staged wake)
    level: int  #: the depth the model still sleeps at (0 once awake)
    tags_woken: tuple[str, ...]
    bytes_restored: int
    bytes_zeroed: int
    bytes_mapped: int
    wake_seconds: float  #: time spent in ``controller.wake_up``
    report: Any  #: what ``controller.wake_up`` returned (a :class:`gpusleep.WakeReport` for an Allocator)


@dataclass
class _State:
    sleeping: bool
    level: int  #: 0 while awake
    partial: bool = False  #: a staged wake woke some tags; the others still sleep
    admitting: bool = True
    aborting: bool = False
    transition: str | None = None
    admitted: set[Admission] = field(default_factory=set)


@renamed_attributes({"drain_timeout_s": "drain_timeout_seconds"})
class SleepGate:
    """Decides which protected requests may run, and puts the controller to sleep and wakes it up.

    Thread safety: ``admit``, ``release`` and the ``async`` methods must be called on the server's
    event loop (the middleware and the routes do). The controller's blocking calls run on the gate's
    own worker threads (Note [Control calls never wait behind model work]). The read-only properties
    may be read from any thread.
    """

    def __init__(
        self,
        controller: SleepController,
        *,
        drain_timeout_seconds: float = 30.0,
        metrics: SleepMetrics | None = None,
    ) -> None:
        self.controller = controller
        self.drain_timeout_seconds = float(drain_timeout_seconds)
        self.metrics = metrics
        sleeping = read_is_sleeping(controller)
        level = int(controller.sleep_level or 0) if sleeping and isinstance(controller, ReportsSleepLevel) else 0
        self._state = _State(sleeping=sleeping, level=(level or 1) if sleeping else 0, admitting=not sleeping)
        self._drained: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._transitions_started = 0
        self._transition_ended: anyio.Event | None = None
        #: ``time.monotonic()`` when the last protected request was admitted or finished (or the gate was
        #: made): what idle sleep measures from.
        self.last_activity_monotonic = time.monotonic()
        #: How many wake-ups have failed so far: a request that waited for one can tell it failed.
        self.wake_failures = 0
        if metrics is not None:
            metrics.bind_gate(self)

    # ------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        """Protected requests admitted (body received) and not finished yet."""
        return len(self._state.admitted)

    @property
    def admitting(self) -> bool:
        """True while protected requests are let through (the model is awake and no sleep is draining)."""
        return self._state.admitting

    @property
    def transition(self) -> str | None:
        """``"sleep"`` or ``"wake_up"`` while one runs (including the drain), else ``None``."""
        return self._state.transition

    @property
    def is_sleeping(self) -> bool:
        """The controller's state as of the last transition or :meth:`refresh` (never blocks)."""
        return self._state.sleeping

    @property
    def sleep_level(self) -> int:
        """The depth the model sleeps at: 1 or 2, 0 while awake."""
        return self._state.level if self._state.sleeping else 0

    @property
    def aborting(self) -> bool:
        """True while a ``mode="abort"`` sleep cancels the requests in flight. Model code running in a
        worker thread may poll it between steps and stop early (the demo engine does)."""
        return self._state.aborting

    # -------------------------------------------------------------- admission
    def admit(self) -> Admission | None:
        """Admit one protected request whose body has arrived (the caller must :meth:`release` it), or
        ``None`` while the gate is closed."""
        if not self._state.admitting:
            return None
        admission = Admission()
        self._state.admitted.add(admission)
        self.last_activity_monotonic = time.monotonic()
        return admission

    def release(self, admission: Admission) -> None:
        """A protected request admitted by :meth:`admit` has finished (its response is sent)."""
        self._state.admitted.discard(admission)
        self.last_activity_monotonic = time.monotonic()
        if not self._state.admitted and self._drained is not None:
            self._drained.set()

    # ------------------------------------------------------- control threads
    async def run_control(self, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking control call on the gate's own worker threads (never behind model work)."""
        if self._limiter is None:  # created on the event loop, at first use
            self._limiter = anyio.CapacityLimiter(_CONTROL_THREADS)
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    # ------------------------------------------------------------ transitions
    def _claim(self, name: str) -> None:
        """Note [One transition at a time]: no ``await`` between the check and the claim."""
        state = self._state
        if state.transition is not None:
            raise TransitionInProgressError(state.transition, state.sleeping, self.sleep_level)
        state.transition = name
        self._transitions_started += 1
        self._transition_ended = None

    def _end_transition(self) -> None:
        self._state.transition = None
        self.last_activity_monotonic = time.monotonic()  # a wake-up (or a failed sleep) restarts the idle clock
        if self._transition_ended is not None:
            self._transition_ended.set()
            self._transition_ended = None

    async def _next_transition_end(self) -> None:
        """Return when the transition running now ends (at once when none runs)."""
        if self._state.transition is None:
            return
        if self._transition_ended is None:
            self._transition_ended = anyio.Event()
        await self._transition_ended.wait()

    async def wait_for_transition(self) -> None:
        """Return once no sleep or wake-up runs (at once when none does). Bound it with a cancel scope."""
        while self._state.transition is not None:
            if self._transition_ended is None:
                self._transition_ended = anyio.Event()
            await self._transition_ended.wait()

    async def refresh(self) -> bool:
        """Re-read ``controller.is_sleeping`` (for a controller also driven outside the control plane).

        While a transition runs, returns the state from before it without waiting for it."""
        if self._state.transition is not None:
            return self._state.sleeping
        started = self._transitions_started
        sleeping = await self.run_control(read_is_sleeping, self.controller)
        state = self._state
        if state.transition is None and self._transitions_started == started:  # nothing changed it meanwhile
            if sleeping != state.sleeping:
                state.level = (state.level or 1) if sleeping else 0
                state.partial = False
            state.sleeping = sleeping
            state.admitting = not sleeping
        return sleeping

    @property
    def controller_sleeps_tags(self) -> bool:
        """Whether ``controller.sleep`` takes ``tags=`` (a :class:`gpusleep.Allocator` does): only then
        can :meth:`sleep` release some tags and leave the others awake."""
        return sleeps_tags(self.controller)

    async def sleep(self, level: int, mode: str = "wait", tags: Sequence[str] | None = None) -> SleepOutcome:
        """Put the model to sleep at ``level`` once the requests in flight are done (``mode="wait"``, at
        most ``drain_timeout_seconds``) or cancelled (``mode="abort"``). ``tags``: release only those tags
        (``controller.sleep(level, tags=...)``; see :attr:`controller_sleeps_tags`), the model then
        counts as asleep until every tag is awake again.

        A model that already sleeps at ``level`` or deeper is left as it is (``already_sleeping``). A
        sleep that arrives while another sleep runs waits for it (Note [One transition at a time]).
        Raises :class:`TransitionInProgressError`, whatever ``controller.check_sleep`` raised (admission
        untouched), :class:`DrainTimeoutError` (nothing changed, the gate reopens) or whatever
        ``controller.sleep`` raised (the gate then follows the controller's state)."""
        if mode not in SLEEP_MODES:
            raise ValueError(f"mode must be one of {', '.join(SLEEP_MODES)}, got {mode!r}")
        tag_tuple = tuple(tags) if tags is not None else None
        tag_sleeper: SleepsTags | None = None
        if tag_tuple is not None:
            controller = self.controller
            if not sleeps_tags(controller):
                raise ValueError(
                    f"this controller ({type(controller).__name__}) cannot put single tags to sleep: its "
                    "sleep() takes no tags= argument; release everything instead (no tags)"
                )
            tag_sleeper = controller
        state = self._state
        while state.transition == "sleep":  # Note [One transition at a time]: a second sleep waits
            await self._next_transition_end()
        self._claim("sleep")
        try:
            already_sleeping = state.sleeping
            if tag_tuple is not None:
                asleep = frozenset(await self.run_control(_sleeping_tags, self.controller))
                noop = already_sleeping and level <= state.level and set(tag_tuple) <= asleep
            else:
                noop = already_sleeping and not state.partial and level <= state.level
            if noop:
                log.info("sleep(level=%d): already asleep at level %d; nothing to do", level, state.level)
                return SleepOutcome(state.level, level, mode, True, True, (), 0, 0, 0, 0.0, 0.0, 0, None)
            if isinstance(self.controller, ChecksSleep) and callable(self.controller.check_sleep):
                try:
                    await self.run_control(self.controller.check_sleep, level)
                except BaseException:
                    if self.metrics is not None:
                        self.metrics.record_failure("sleep")
                    raise
            try:
                state.admitting = False
                t0 = time.perf_counter()
                aborted = await self._drain(mode)
                drain_seconds = time.perf_counter() - t0
                t1 = time.perf_counter()
                if tag_sleeper is None or tag_tuple is None:
                    report = await self.run_control(self.controller.sleep, level)
                else:
                    report = await self.run_control(functools.partial(tag_sleeper.sleep, level, tags=list(tag_tuple)))
                sleep_seconds = time.perf_counter() - t1
            except BaseException as exc:
                await self._after_failure("sleep", exc)
                raise
            await self._follow_controller()
            if state.sleeping:
                state.level = max(level, state.level) if already_sleeping else level
                state.partial = tag_tuple is not None  # other tags may still be awake
        finally:
            self._end_transition()
        log.info(
            "sleep(level=%d, mode=%s): drained %d request(s) in %.3f s (%d aborted), controller.sleep took "
            "%.3f s, is_sleeping=%s",
            level,
            mode,
            aborted,
            drain_seconds,
            aborted,
            sleep_seconds,
            state.sleeping,
        )
        if self.metrics is not None:
            self.metrics.record_sleep(level, sleep_seconds, drain_seconds, report)
        return SleepOutcome(
            level=self.sleep_level,
            requested_level=level,
            mode=mode,
            already_sleeping=already_sleeping,
            is_sleeping=state.sleeping,
            tags=tuple(getattr(report, "tags", ()) or ()),
            bytes_offloaded=_int_field(report, "bytes_offloaded"),
            bytes_discarded=_int_field(report, "bytes_discarded"),
            bytes_freed=_int_field(report, "bytes_freed"),
            drain_seconds=drain_seconds,
            sleep_seconds=sleep_seconds,
            aborted_requests=aborted,
            report=report,
        )

    async def wake_up(self, tags: Sequence[str] | None = None) -> WakeOutcome:
        """Wake ``tags`` (everything when ``None``); admission reopens once nothing is asleep.

        Raises :class:`TransitionInProgressError`, :class:`UnknownTagsError` for tags the controller does
        not know (when it lists its ``known_tags``), or whatever ``controller.wake_up`` raised; the
        model then stays asleep. An awake model stays open to requests during the call."""
        tag_tuple = tuple(tags) if tags is not None else None
        state = self._state
        self._claim("wake_up")
        try:
            try:
                if tag_tuple is not None:
                    await self.run_control(self._check_tags, tag_tuple)
                sleeping_before = await self.run_control(read_is_sleeping, self.controller)
                if sleeping_before:
                    state.admitting = False
                t0 = time.perf_counter()
                report = await self.run_control(
                    self.controller.wake_up, list(tag_tuple) if tag_tuple is not None else None
                )
                wake_seconds = time.perf_counter() - t0
            except BaseException as exc:
                self.wake_failures += 1
                await self._after_failure("wake_up", exc)
                raise
            await self._follow_controller()
            state.partial = state.sleeping and tag_tuple is not None
            if not state.sleeping:
                state.level = 0
        finally:
            self._end_transition()
        log.info(
            "wake_up(tags=%s): controller.wake_up took %.3f s, is_sleeping=%s",
            list(tag_tuple) if tag_tuple is not None else "all",
            wake_seconds,
            state.sleeping,
        )
        if self.metrics is not None:
            self.metrics.record_wake(wake_seconds, report)
        return WakeOutcome(
            tags=tag_tuple,
            already_awake=not sleeping_before,
            is_sleeping=state.sleeping,
            level=self.sleep_level,
            tags_woken=tuple(getattr(report, "tags", ()) or ()),
            bytes_restored=_int_field(report, "bytes_restored"),
            bytes_zeroed=_int_field(report, "bytes_zeroed"),
            bytes_mapped=_int_field(report, "bytes_mapped"),
            wake_seconds=wake_seconds,
            report=report,
        )

    # ---------------------------------------------------------------- helpers
    async def _drain(self, mode: str) -> int:
        """Wait until no admitted request remains; returns how many were aborted (``mode="abort"``)."""
        state = self._state
        if not state.admitted:
            return 0
        aborted = 0
        self._drained = anyio.Event()
        try:
            if mode == "abort":
                state.aborting = True
                running: list[Admission] = list(state.admitted)
                for admission in running:
                    admission.abort()
                aborted = len(running)
            with anyio.move_on_after(self.drain_timeout_seconds):
                await self._drained.wait()
        finally:
            self._drained = None
            state.aborting = False
        if state.admitted:
            in_flight = len(state.admitted)
            log.warning(
                "sleep abandoned: %d request(s) still running after %.3f s; the model keeps serving",
                in_flight,
                self.drain_timeout_seconds,
            )
            raise DrainTimeoutError(in_flight, self.drain_timeout_seconds)
        return aborted

    async def _after_failure(self, action: str, exc: BaseException) -> None:
        with anyio.CancelScope(shield=True):
            await self._follow_controller()
        log.warning("%s failed (%s: %s); is_sleeping=%s", action, type(exc).__name__, exc, self._state.sleeping)
        if self.metrics is not None:
            self.metrics.record_failure(action)

    async def _follow_controller(self) -> None:
        state = self._state
        try:
            state.sleeping = await self.run_control(read_is_sleeping, self.controller)
        except Exception:  # keep the last known state; the caller raises the original error
            log.exception("reading controller.is_sleeping failed; keeping is_sleeping=%s", state.sleeping)
        state.admitting = not state.sleeping
        if not state.sleeping:
            state.level = 0
            state.partial = False

    def _check_tags(self, tags: tuple[str, ...]) -> None:
        for tag in tags:
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"every tag must be a non-empty string, got {tag!r}")
        known = known_tags(self.controller)
        if known is None:
            return
        unknown = frozenset(tags) - known
        if unknown:
            raise UnknownTagsError(unknown, known)


def _takes_keyword(func: Any, name: str) -> bool:
    """Whether ``func`` can be called with the keyword argument ``name``."""
    if not callable(func):
        return False
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(
        p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
        for p in parameters
    )


def _sleeping_tags(controller: SleepController) -> frozenset[str]:
    """The controller's ``sleeping_tags`` (a property or a method); empty when it has none."""
    tags = _tags(controller.sleeping_tags) if isinstance(controller, ReportsSleepingTags) else None
    return tags if tags is not None else frozenset()


def _int_field(report: Any, name: str) -> int:
    value = getattr(report, name, 0)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0
