"""The router of ``gpusleep switch``: which backend is awake, and the switches between them.

Note [Switches are serialized]
    Every request takes the router's lock (FIFO) long enough to make sure its backend is awake and to
    take a *lease* on it; it forwards without the lock and gives the lease back once its response is
    sent (a stream: at its end). A switch runs under the lock: it picks the backends to put to sleep
    (least recently used first, until the wanted one fits the GPU memory budget; without a budget, all
    the others), waits until nobody holds a lease on them (new leases need the lock, so none arrive),
    puts them to sleep with ``POST /sleep?level=1`` and wakes the wanted one with ``POST /wake_up``.
    Hence the awake backends never hold more than the budget: a wake-up starts only after the sleeps
    that make room have succeeded. A request that cannot have its backend within ``switch_timeout_seconds``
    gets a 503 ``SwitchTimeoutError``; a backend that fails to sleep or to wake is reported with its
    own error (502 ``BackendError``) and the switch stops there, leaving the other backends usable. A
    backend to put to sleep that refuses the connection (its process is gone, and its GPU memory with it)
    does not stop the switch: its state becomes unknown and the switch goes on.

Note [A failed switch answers its waiters]
    Requests for a model queue on the lock while its switch runs. When that switch fails (the wake-up ran
    out of GPU memory, a backend would not sleep), the requests that were already waiting get the same 502
    at once instead of retrying the same switch one after the other, each as long as the failed one (and
    the last of them only after switch_timeout_seconds). A request that arrives after the failure tries again.
    The server's own wake on request (python/gpusleep/server) answers the waiters of a failed wake-up the same way.

Note [Two budgets]
    The GPU budget (``gpu_memory_budget_bytes``) bounds what the awake and starting backends hold together; the
    host budget (``host_memory_budget_bytes``) what the level-1 sleepers hold in host memory together (each
    backend's ``host_memory_bytes``). Before a backend is put to sleep at level 1, the least recently used
    level-1 sleepers are demoted until its host copy fits: a ``gpusleep`` backend goes to level 2 in place, a
    launched ``vllm`` or ``sglang`` backend is stopped (neither deepens a sleep in place). If it still does not
    fit, the backend itself sleeps at level 2 (``gpusleep``, ``vllm``) or is stopped (a launched ``sglang``).
    A backend is woken by the sequence of its kind and level (kinds.py), or started again when stopped.
    ``GET /switch/status`` shows each backend's ``state`` and the ``reason`` it was last moved.

A backend's state is what the switch last saw (``awake``: ``True``/``False``) or ``None`` when unknown
(at startup, after an error): unknown states are read from ``GET /is_sleeping`` at the next switch (a
launched backend's from its process). Launched backends: launcher.py.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx

from .._renamed import renamed_attributes
from ..errors import GpusleepError
from .config import BackendConfig, SwitchConfig
from .kinds import CAN_DEEPEN_IN_PLACE, Call, Dialect, UnexpectedAnswerError, UnsuccessfulAnswerError, dialect_for
from .launcher import LaunchError, ManagedProcess
from .metrics import SwitchMetrics
from .records import BackendCallRecord, SwitchRecord, backend_call_record

__all__ = ["BackendError", "BackendState", "SwitchRouter", "SwitchTimeoutError", "UnknownModelError"]

#: How many switches ``recent_switches`` (``GET /switch/status``) keeps.
RECENT_SWITCHES = 32

log = logging.getLogger("gpusleep.switch")


#: Longest wait for a backend's ``GET /is_sleeping``, seconds (request_timeout_seconds if shorter): a hung backend's
#: state stays unknown after it rather than holding every switch for request_timeout_seconds.
STATE_READ_TIMEOUT_SECONDS = 10.0

#: A launched backend that dies within this many seconds of its start doubles its restart back-off.
STABLE_SECONDS = 60.0
#: Longest restart back-off, seconds.
MAX_BACKOFF_SECONDS = 60.0
#: The former spellings of the three (Note [One spelling per unit] in gpusleep/_renamed.py).
STATE_READ_TIMEOUT_S, STABLE_S, MAX_BACKOFF_S = STATE_READ_TIMEOUT_SECONDS, STABLE_SECONDS, MAX_BACKOFF_SECONDS

#: How many characters of a model name an error message shows (a client may send megabytes of one).
SHOWN_MODEL_CHARS = 100


class UnknownModelError(LookupError, GpusleepError):
    def __init__(self, model: Any, known: list[str]) -> None:
        shown = repr(model)
        if len(shown) > SHOWN_MODEL_CHARS:
            shown = f"{shown[:SHOWN_MODEL_CHARS]}... ({len(model)} characters)"
        super().__init__(f"no backend serves model {shown}; the models are {known}")
        self.model = model
        self.known = known


@renamed_attributes({"timeout_s": "timeout_seconds"})
class SwitchTimeoutError(TimeoutError, GpusleepError):
    def __init__(self, model: str, timeout_seconds: float) -> None:
        super().__init__(
            f"model {model!r} was not awake after {timeout_seconds:g} s (other switches or long requests were ahead "
            "of this one); retry later, or raise switch_timeout_seconds in the switch configuration"
        )
        self.model = model
        self.timeout_seconds = timeout_seconds


class BackendError(RuntimeError, GpusleepError):
    """A backend refused or failed a control call (``action``: ``sleep``, ``wake_up``, ``is_sleeping``, ``start``,
    or a step of a staged wake-up: ``reload``, ``reset_prefix_cache``, ``flush_cache``)."""

    def __init__(
        self,
        model: str,
        action: str,
        detail: str,
        status_code: int | None = None,
        body: Any = None,
        unreachable: bool = False,
    ) -> None:
        status = f"HTTP {status_code}" if status_code is not None else "no answer"
        super().__init__(f"backend {model!r}: {action} failed ({status}): {detail}")
        self.model = model
        self.action = action
        self.detail = detail
        self.status_code = status_code
        self.body = body
        #: Nothing accepted the connection: the backend is not running (and holds no GPU memory).
        self.unreachable = unreachable

    def again(self) -> BackendError:
        """The same error, for another request (each raise gets its own exception)."""
        return BackendError(self.model, self.action, self.detail, self.status_code, self.body, self.unreachable)


@renamed_attributes({"backoff_s": "backoff_seconds"})
@dataclass
class BackendState:
    config: BackendConfig
    awake: bool | None = None  #: holds its GPU memory (``None``: unknown)
    #: Sleep level while asleep (1 or 2); 0 awake.
    level: int = 0
    #: A launched backend whose process is not running (it holds nothing).
    stopped: bool = False
    #: A launched backend being started (counts against the GPU budget).
    starting: bool = False
    #: Why it was last moved: ``make_room``, ``idle``, ``host_memory``, ``request``, ``crashed (status N)``...
    reason: str | None = None
    leases: int = 0
    last_used_monotonic: float = 0.0
    last_error: str | None = None
    #: Requests waiting for this backend (for their switch, or for the lock), not yet holding a lease.
    waiting: int = 0
    #: Switches to this backend that failed, and the last one's error (Note [A failed switch answers its waiters]).
    failed_switches: int = 0
    last_switch_error: BackendError | None = None
    process: ManagedProcess | None = None
    #: Deaths of its process that the switch did not ask for, and the back-off before the next start.
    crashes: int = 0
    backoff_seconds: float = 0.0
    not_before_monotonic: float = 0.0
    _unleased: anyio.Event | None = field(default=None, repr=False)
    dialect: Dialect = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.dialect = dialect_for(self.config)

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def phase(self) -> str:
        """``awake``, ``asleep_l1``, ``asleep_l2``, ``stopped``, ``starting`` or ``unknown``."""
        if self.starting:
            return "starting"
        if self.stopped:
            return "stopped"
        if self.awake is None:
            return "unknown"
        return "awake" if self.awake else f"asleep_l{self.level}"

    @property
    def holds_gpu(self) -> bool:
        return bool(self.awake) or self.starting

    @property
    def holds_host(self) -> bool:
        return self.awake is False and not self.stopped and self.level == 1


class SwitchRouter:
    """Keeps at most the budgets' worth of backends awake (GPU) and asleep at level 1 (host memory), and wakes
    or starts the backend each request needs (Note [Switches are serialized]). All methods run on the
    switch's event loop; :meth:`run` (the app's lifespan) watches launched backends and runs the idle sleep,
    :meth:`aclose` stops every process the switch started."""

    def __init__(self, config: SwitchConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.backends: dict[str, BackendState] = {b.model: BackendState(b) for b in config.backends}
        self.metrics = SwitchMetrics(
            lambda: sum(1 for s in self.backends.values() if s.awake),
            lambda: self.gpu_bytes_held(),
            lambda: self.host_bytes_held(),
            lambda: [(s.model, s.phase) for s in self.backends.values()],
        )
        self._lock = anyio.Lock()
        #: The last :data:`RECENT_SWITCHES` switches, oldest first.
        self.recent_switches: collections.deque[SwitchRecord] = collections.deque(maxlen=RECENT_SWITCHES)
        self.log_dir = config.log_dir
        self._tasks: anyio.abc.TaskGroup | None = None
        self._closing = False
        for state in self.backends.values():
            if state.config.launched:
                state.stopped, state.awake = True, False  # started at first need (Note [Launched backends])
                state.reason = "not started yet"
                state.backoff_seconds = config.restart_backoff_seconds

    def gpu_bytes_held(self) -> int:
        return sum(s.config.gpu_memory_bytes for s in self.backends.values() if s.holds_gpu)

    def host_bytes_held(self) -> int:
        return sum(s.config.host_memory_bytes for s in self.backends.values() if s.holds_host)

    # ------------------------------------------------------------------ leases
    async def acquire(self, model: Any) -> BackendState:
        """Wake ``model``'s backend if needed and take a lease on it; give it back with :meth:`release`."""
        state = self.backends.get(model) if isinstance(model, str) else None
        if state is None:
            raise UnknownModelError(model, sorted(self.backends))
        failures_seen = state.failed_switches
        state.waiting += 1
        try:
            with anyio.fail_after(self.config.switch_timeout_seconds):
                async with self._lock:
                    if state.failed_switches != failures_seen and not state.awake and state.last_switch_error:
                        raise state.last_switch_error.again()  # Note [A failed switch answers its waiters]
                    try:
                        await self._ensure_awake(state)
                    except BackendError as exc:
                        state.failed_switches += 1
                        state.last_switch_error = exc
                        raise
                    state.leases += 1
                    state.last_used_monotonic = time.monotonic()
        except TimeoutError as exc:
            if isinstance(exc, SwitchTimeoutError):
                raise
            raise SwitchTimeoutError(state.model, self.config.switch_timeout_seconds) from None
        finally:
            state.waiting -= 1
        self.metrics.requests.labels(model=state.model).inc()
        return state

    def release(self, state: BackendState) -> None:
        state.leases -= 1
        state.last_used_monotonic = time.monotonic()
        if state.leases == 0 and state._unleased is not None:
            state._unleased.set()
            state._unleased = None

    # ---------------------------------------------------------------- switches
    async def _ensure_awake(self, target: BackendState) -> None:
        if self._closing:
            raise BackendError(target.model, "start", "the switch is shutting down", unreachable=True)
        if not target.awake:  # an awake target adds nothing to the GPU: no other backend's state need be read for it
            await self._refresh_unknown()
        victims = self._victims_for(target)
        if target.awake and not victims:
            return
        t0 = time.perf_counter()
        sleeps = []
        for victim in victims:
            try:
                record = await self._put_to_sleep(victim, reason="make_room")
                if record is not None:
                    sleeps.append(record)
            except BackendError as exc:
                if not exc.unreachable:
                    raise
                # Nothing listens there: the process is gone, and its GPU memory with it. Its state is unknown
                # (it does not count against the budget) until it answers again.
                log.warning("%s: %s is not running; switching on without it", exc, victim.model)
        if not target.awake:
            if target.stopped:
                wake = await self._start(target, reason="request")
            else:
                wake = await self._wake(target)
            seconds = time.perf_counter() - t0
            self.metrics.switches.labels(model=target.model).inc()
            self.metrics.switch_seconds.observe(seconds)
            self.recent_switches.append(
                SwitchRecord(target.model, time.time(), seconds, tuple(sleeps), wake, kind=target.config.kind)
            )
            log.info(
                "switch to %s in %.3f s: %s %.3f s%s",
                target.model,
                seconds,
                wake.action,
                wake.seconds,
                "".join(f", {r.action} of {r.model} {r.seconds:.3f} s" for r in sleeps) or " (nothing put to sleep)",
            )

    def _victims_for(self, target: BackendState) -> list[BackendState]:
        """The backends holding GPU memory to put to sleep, least recently used first, so that ``target`` fits."""
        others = sorted(
            (s for s in self.backends.values() if s is not target and s.holds_gpu), key=lambda s: s.last_used_monotonic
        )
        budget = self.config.gpu_memory_budget_bytes
        if budget is None:
            return others  # one awake at a time
        used = target.config.gpu_memory_bytes + sum(s.config.gpu_memory_bytes for s in others)
        victims = []
        for state in others:
            if used <= budget:
                break
            victims.append(state)
            used -= state.config.gpu_memory_bytes
        return victims

    async def _refresh_unknown(self) -> None:
        for state in self.backends.values():
            if state.awake is None:
                try:
                    sleeping = await self._is_sleeping(state)
                except BackendError as exc:
                    state.last_error = str(exc)
                    log.warning("%s; its state stays unknown", exc)
                    continue
                state.awake = not sleeping
                state.level = (state.level or self.config.sleep_level) if sleeping else 0

    async def _is_sleeping(self, state: BackendState) -> bool:
        if state.config.launched and not (state.process and state.process.running):
            state.stopped, state.starting = True, False
            return True
        if not state.dialect.has_sleep_api:
            return False  # running, no sleep API: awake
        call = self._caller(state, timeout_seconds=min(STATE_READ_TIMEOUT_SECONDS, self.config.request_timeout_seconds))
        value = await self._dialect_call(state, "is_sleeping", state.dialect.is_sleeping(call))
        return False if value is None else value  # cannot say: taken as awake (counts against the budget)

    async def _drain(self, state: BackendState) -> None:
        while state.leases:
            if state._unleased is None:
                state._unleased = anyio.Event()
            await state._unleased.wait()

    async def _put_to_sleep(self, state: BackendState, reason: str) -> BackendCallRecord | None:
        """Sleep ``state`` (or stop it: the ``process`` kind) so that it holds no GPU memory, at the switch's
        level if the host budget has room for it (others demoted first, least recently used first), else deeper
        (Note [Two budgets]). ``None`` when nothing had to be done."""
        await self._drain(state)
        if not state.holds_gpu:
            return None
        level = self.config.sleep_level
        if not state.dialect.has_sleep_api:
            return await self._stop(state, reason)
        if level == 1 and not await self._make_host_room(state.config.host_memory_bytes, exclude=state):
            if state.config.kind in CAN_DEEPEN_IN_PLACE or state.config.kind == "vllm":
                level = 2
                reason = f"{reason}, level 2 for lack of host memory"
            elif state.config.launched:
                return await self._stop(state, f"{reason}, stopped for lack of host memory")
            else:
                raise BackendError(
                    state.model,
                    "sleep",
                    f"no room in host_memory_budget_bytes for its {state.config.host_memory_bytes} "
                    "bytes, and an SGLang backend that the switch did not start can be neither put to "
                    "level 2 nor stopped",
                )
        call = self._caller(state, timeout_seconds=self.config.backend_call_timeout_seconds)
        record = await self._timed("sleep", state, state.dialect.sleep(call, level))
        state.awake, state.level, state.reason = False, level, reason
        self.metrics.sleeps.labels(model=state.model, reason=reason.split(",")[0]).inc()
        log.info("%s asleep (level %d, %s)", state.model, level, reason)
        return record

    async def _make_host_room(self, needed: int, exclude: BackendState) -> bool:
        """Demote level-1 sleepers, least recently used first, until ``needed`` more host bytes fit the host
        budget; whether they fit."""
        budget = self.config.host_memory_budget_bytes
        if budget is None or needed == 0:
            return True
        sleepers = sorted(
            (s for s in self.backends.values() if s is not exclude and s.holds_host and s.config.host_memory_bytes > 0),
            key=lambda s: s.last_used_monotonic,
        )
        for state in sleepers:
            if self.host_bytes_held() + needed <= budget:
                break
            await self._demote(state)
        return self.host_bytes_held() + needed <= budget

    async def _demote(self, state: BackendState) -> None:
        """A level-1 sleeper to level 2 in place, or stopped (launched backends), to free its host memory."""
        reason = "host_memory"
        if state.config.kind in CAN_DEEPEN_IN_PLACE:
            call = self._caller(state, timeout_seconds=self.config.backend_call_timeout_seconds)
            await self._timed("sleep", state, state.dialect.deepen(call))
            state.level, state.reason = 2, reason
            self.metrics.demotions.labels(model=state.model, to="level2").inc()
            log.info("%s: level 1 -> level 2 (host memory)", state.model)
        elif state.config.launched:
            await self._stop(state, reason)
            self.metrics.demotions.labels(model=state.model, to="stopped").inc()
        else:
            log.warning(
                "%s: cannot free its host memory (a %s backend the switch did not start sleeps at level 1 until woken)",
                state.model,
                state.config.kind,
            )

    async def _wake(self, state: BackendState) -> BackendCallRecord:
        call = self._caller(state, timeout_seconds=self.config.backend_call_timeout_seconds)
        record = await self._timed("wake_up", state, state.dialect.wake(call, state.level or 1))
        state.awake, state.level, state.reason = True, 0, "request"
        return record

    # ------------------------------------------------------ launched backends
    async def _start(self, state: BackendState, reason: str) -> BackendCallRecord:
        """Start a launched backend (Note [Launched backends] in launcher.py); it holds its GPU memory from the
        start (the sleeps that made room ran before)."""
        wait_seconds = state.not_before_monotonic - time.monotonic()
        if wait_seconds > 0:
            log.info("%s: starting again in %.1f s (back-off after a crash)", state.model, wait_seconds)
            await anyio.sleep(wait_seconds)
        if state.process is None:
            state.process = ManagedProcess(state.config, self._log_path(state), self.config.stop_timeout_seconds)
        state.starting, state.stopped = True, False
        started = time.perf_counter()
        try:
            with anyio.CancelScope(shield=True):  # a request's timeout must not leave a half-started process
                await state.process.start(self.client)
        except LaunchError as exc:
            state.starting, state.stopped, state.awake = False, True, False
            state.reason = "start failed"
            state.last_error = f"backend {state.model!r}: start failed: {exc}"
            self.metrics.failures.labels(model=state.model, action="start").inc()
            log.warning("%s", state.last_error)
            raise BackendError(state.model, "start", str(exc)) from None
        state.starting, state.awake, state.level, state.reason = False, True, 0, reason
        state.last_error = None
        self.metrics.starts.labels(model=state.model, reason=reason).inc()
        if self._tasks is not None:
            self._tasks.start_soon(self._watch, state, state.process)
        seconds = time.perf_counter() - started
        self.metrics.backend_call_seconds.labels(model=state.model, action="start").observe(seconds)
        return BackendCallRecord(state.model, "start", seconds)

    async def _stop(self, state: BackendState, reason: str) -> BackendCallRecord:
        started = time.perf_counter()
        if state.process is not None:
            with anyio.CancelScope(shield=True):
                await state.process.stop()
        state.stopped, state.starting, state.awake, state.level, state.reason = True, False, False, 0, reason
        self.metrics.sleeps.labels(model=state.model, reason=reason.split(",")[0]).inc()
        return BackendCallRecord(state.model, "stop", time.perf_counter() - started)

    def _log_path(self, state: BackendState) -> str:
        if state.config.log_file:
            return state.config.log_file
        if self.log_dir is None:
            self.log_dir = tempfile.mkdtemp(prefix="gpusleep-switch-logs-")
            log.info("launched backends' logs go to %s", self.log_dir)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in state.model)
        return os.path.join(self.log_dir, f"{safe}.log")

    async def _watch(self, state: BackendState, process: ManagedProcess) -> None:
        """Note [Restarts]: a launched backend's process that exits without the switch asking has crashed. It
        is marked stopped (it holds nothing now) and started again once its back-off has passed: at once in
        the background if it was awake (it held its room in the budget), else at its next request. The back-off
        doubles (up to :data:`MAX_BACKOFF_SECONDS`) when it dies within :data:`STABLE_SECONDS` of its start."""
        status = await process.wait()
        if process.stopping or self._closing or state.process is not process:
            return
        was_awake = state.awake
        state.crashes += 1
        lived_seconds = time.monotonic() - process.started_monotonic
        state.backoff_seconds = (
            min(state.backoff_seconds * 2, MAX_BACKOFF_SECONDS)
            if lived_seconds < STABLE_SECONDS
            else self.config.restart_backoff_seconds
        )
        state.not_before_monotonic = time.monotonic() + state.backoff_seconds
        state.stopped, state.starting, state.awake, state.level = True, False, False, 0
        state.reason = f"crashed (status {status})"
        state.last_error = (
            f"backend {state.model!r}: its process (pid {process.pid}) exited with status {status}; "
            f"log {process.log_path}"
        )
        self.metrics.crashes.labels(model=state.model).inc()
        log.warning("%s; starting it again in %.1f s", state.last_error, state.backoff_seconds)
        await process.stop()  # its group's leftovers, and the log
        if was_awake:
            await anyio.sleep(state.backoff_seconds)
            try:
                async with self._lock:
                    if state.stopped and not self._closing:
                        await self._ensure_awake_for_restart(state)
            except BackendError as exc:
                log.warning("%s: restart failed: %s", state.model, exc)

    async def _ensure_awake_for_restart(self, state: BackendState) -> None:
        for victim in self._victims_for(state):
            await self._put_to_sleep(victim, reason="make_room")
        await self._start(state, reason="restart")

    async def run(self) -> None:
        """Until cancelled: the idle sleep, and watching launched backends (the app's lifespan runs it)."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            tasks.start_soon(self.run_idle_sleep)
            await anyio.sleep_forever()

    async def aclose(self) -> None:
        """Stop every process the switch started (its shutdown)."""
        self._closing = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tasks:
                for state in self.backends.values():
                    if state.process is not None and state.process.running:
                        tasks.start_soon(self._stop, state, "shutdown")

    # ------------------------------------------------------------ backend calls
    async def _timed(self, action: str, state: BackendState, work: Awaitable[Any]) -> BackendCallRecord:
        """A sleep or a wake-up (one or more calls): its record, or :class:`BackendError` with the backend's
        state marked unknown (whether it changed is read again at the next switch)."""
        started = time.perf_counter()
        try:
            body = await self._dialect_call(state, action, work)
        except BackendError:
            state.awake = None
            raise
        record = backend_call_record(state.model, action, time.perf_counter() - started, body)
        self.metrics.backend_call_seconds.labels(model=state.model, action=action).observe(record.seconds)
        return record

    async def _dialect_call(self, state: BackendState, action: str, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except (UnsuccessfulAnswerError, UnexpectedAnswerError) as exc:
            error = BackendError(state.model, action, str(exc), 200, exc.answer)
            state.last_error = str(error)
            if action != "is_sleeping":
                self.metrics.failures.labels(model=state.model, action=action).inc()
            log.warning("%s", error)
            raise error from None

    def _caller(self, state: BackendState, timeout_seconds: float | None) -> Call:
        async def call(
            method: str,
            path: str,
            action: str,
            params: dict[str, Any] | None = None,
            json: Any = None,
            missing_ok: bool = False,
        ) -> Any:
            return await self._call(
                state,
                method,
                path,
                action,
                params=params,
                json=json,
                timeout_seconds=timeout_seconds,
                missing_ok=missing_ok,
            )

        return call

    async def _call(
        self,
        state: BackendState,
        method: str,
        path: str,
        action: str,
        params: dict[str, Any] | None = None,
        timeout_seconds: float | None = None,
        json: Any = None,
        missing_ok: bool = False,
    ) -> Any:
        """``method path`` on ``state``'s backend: its JSON answer, or :class:`BackendError`. A sleep or wake-up
        is shielded (a request's timeout never leaves a backend's state unknown); a state read changes nothing
        and is not (the request that waits for it may give up). ``missing_ok``: ``None`` for a 404."""
        headers = {"Authorization": f"Bearer {state.config.token}"} if state.config.token else {}
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_seconds is None else httpx.Timeout(timeout_seconds, connect=10.0)
        try:
            with anyio.CancelScope(shield=action != "is_sleeping"):
                for attempt in (1, 2):
                    try:
                        response = await self.client.request(
                            method, state.config.url + path, params=params, headers=headers, timeout=timeout, json=json
                        )
                        break
                    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                        # No answer at all: most often a pooled keep-alive connection the backend had closed (after
                        # a request that broke it down). Control calls are idempotent transitions (a second sleep
                        # of a sleeping model, or wake of an awake one, changes nothing), so one retry on a fresh
                        # connection is safe.
                        if attempt == 2:
                            raise
        except httpx.HTTPError as exc:
            error = BackendError(
                state.model,
                action,
                f"{type(exc).__name__}: {exc} ({state.config.url})",
                unreachable=isinstance(exc, httpx.ConnectError),
            )
        else:
            if missing_ok and response.status_code == 404:
                return None
            try:
                body = response.json()
            except (ValueError, RecursionError):  # not JSON, or nested too deeply: the status still says what happened
                body = response.text[:500]
            if response.status_code < 400:
                if action != "is_sleeping":  # the last sleep or wake-up error stays until one succeeds
                    state.last_error = None
                return body
            detail = (
                body.get("error", {}).get("message")
                if isinstance(body, dict) and isinstance(body.get("error"), dict)
                else None
            )
            error = BackendError(state.model, action, detail or str(body)[:500], response.status_code, body)
        state.last_error = str(error)
        if action != "is_sleeping":
            self.metrics.failures.labels(model=state.model, action=action).inc()
        log.warning("%s", error)
        raise error

    # --------------------------------------------------------------- idle sleep
    async def sleep_idle_backends(self) -> None:
        """Put to sleep the awake backends nobody has used for ``config.idle_sleep_seconds``."""
        idle_seconds = self.config.idle_sleep_seconds
        if idle_seconds is None:
            return
        async with self._lock:
            now = time.monotonic()
            for state in self.backends.values():
                if state.awake and state.leases == 0 and now - state.last_used_monotonic >= idle_seconds:
                    try:
                        await self._put_to_sleep(state, reason="idle")
                    except BackendError:
                        pass  # logged and counted; the state is read again at the next switch

    async def run_idle_sleep(self) -> None:
        """Loop of :meth:`sleep_idle_backends` until cancelled (nothing to do without ``idle_sleep_seconds``)."""
        if self.config.idle_sleep_seconds is None:
            return
        now = time.monotonic()
        for state in self.backends.values():
            state.last_used_monotonic = max(state.last_used_monotonic, now)
        while True:
            await anyio.sleep(min(self.config.idle_sleep_seconds / 4, 5.0))
            await self.sleep_idle_backends()

    def status(self) -> list[dict]:
        return [
            {
                "model": s.model,
                "url": s.config.url,
                "kind": s.config.kind,
                "awake": s.awake,
                "state": s.phase,
                "reason": s.reason,
                "requests_in_flight": s.leases,
                "requests_waiting": s.waiting,
                "gpu_memory_bytes": s.config.gpu_memory_bytes,
                "host_memory_bytes": s.config.host_memory_bytes,
                "last_error": s.last_error,
                "launched": s.config.launched,
                "pid": s.process.pid if s.process is not None and s.process.running else None,
                "log_file": s.process.log_path if s.process is not None else None,
                "crashes": s.crashes,
            }
            for s in self.backends.values()
        ]
