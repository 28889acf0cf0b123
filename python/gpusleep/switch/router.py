"""The router of ``gpusleep switch``: which backend is awake, and the switches between them.

Note [Switches are serialized]
    Every request takes the router's lock (FIFO) long enough to make sure its backend is awake and to
    take a *lease* on it; it forwards without the lock and gives the lease back once its response is
    sent (a stream: at its end). A switch runs under the lock: it picks the backends to put to sleep
    (least recently used first, until the wanted one fits the GPU memory budget; without a budget, all
    the others), waits until nobody holds a lease on them (new leases need the lock, so none arrive),
    puts them to sleep with ``POST /sleep?level=1`` and wakes the wanted one with ``POST /wake_up``.
    Hence the awake backends never hold more than the budget: a wake-up starts only after the sleeps
    that make room have succeeded. A request that cannot have its backend within ``switch_timeout_s``
    gets a 503 ``SwitchTimeoutError``; a backend that fails to sleep or to wake is reported with its
    own error (502 ``BackendError``) and the switch stops there, leaving the other backends usable. A
    backend to put to sleep that refuses the connection (its process is gone, and its GPU memory with it)
    does not stop the switch: its state becomes unknown and the switch goes on.

Note [A failed switch answers its waiters]
    Requests for a model queue on the lock while its switch runs. When that switch fails (the wake-up ran
    out of GPU memory, a backend would not sleep), the requests that were already waiting get the same 502
    at once instead of retrying the same switch one after the other, each as long as the failed one (and
    the last of them only after switch_timeout_s). A request that arrives after the failure tries again.
    The server's own wake on request (python/gpusleep/server) answers the waiters of a failed wake-up the same way.

A backend's state is what the switch last saw (``awake``: ``True``/``False``) or ``None`` when unknown
(at startup, after an error): unknown states are read from ``GET /is_sleeping`` at the next switch.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional

import anyio
import httpx

from .config import BackendConfig, SwitchConfig
from .metrics import SwitchMetrics
from .records import BackendCallRecord, SwitchRecord, backend_call_record

__all__ = ["BackendError", "BackendState", "SwitchRouter", "SwitchTimeoutError", "UnknownModelError"]

#: How many switches ``recent_switches`` (``GET /switch/status``) keeps.
RECENT_SWITCHES = 32

log = logging.getLogger("gpusleep.switch")


#: Longest wait for a backend's ``GET /is_sleeping``, seconds (request_timeout_s if shorter): a hung backend's
#: state stays unknown after it rather than holding every switch for request_timeout_s.
STATE_READ_TIMEOUT_S = 10.0

#: How many characters of a model name an error message shows (a client may send megabytes of one).
SHOWN_MODEL_CHARS = 100


class UnknownModelError(LookupError):
    def __init__(self, model: Any, known: List[str]) -> None:
        shown = repr(model)
        if len(shown) > SHOWN_MODEL_CHARS:
            shown = f"{shown[:SHOWN_MODEL_CHARS]}... ({len(model)} characters)"
        super().__init__(f"no backend serves model {shown}; the models are {known}")
        self.model = model
        self.known = known


class SwitchTimeoutError(TimeoutError):
    def __init__(self, model: str, timeout_s: float) -> None:
        super().__init__(
            f"model {model!r} was not awake after {timeout_s:g} s (other switches or long requests were ahead "
            "of this one); retry later, or raise switch_timeout_s in the switch configuration"
        )
        self.model = model
        self.timeout_s = timeout_s


class BackendError(RuntimeError):
    """A backend refused or failed a control call (``action``: ``sleep``, ``wake_up``, ``is_sleeping``)."""

    def __init__(self, model: str, action: str, detail: str, status_code: Optional[int] = None,
                 body: Any = None, unreachable: bool = False) -> None:
        status = f"HTTP {status_code}" if status_code is not None else "no answer"
        super().__init__(f"backend {model!r}: {action} failed ({status}): {detail}")
        self.model = model
        self.action = action
        self.detail = detail
        self.status_code = status_code
        self.body = body
        #: Nothing accepted the connection: the backend is not running (and holds no GPU memory).
        self.unreachable = unreachable

    def again(self) -> "BackendError":
        """The same error, for another request (each raise gets its own exception)."""
        return BackendError(self.model, self.action, self.detail, self.status_code, self.body, self.unreachable)


@dataclass
class BackendState:
    config: BackendConfig
    awake: Optional[bool] = None  #: None: unknown
    leases: int = 0
    last_used_monotonic: float = 0.0
    last_error: Optional[str] = None
    #: Requests waiting for this backend (for their switch, or for the lock), not yet holding a lease.
    waiting: int = 0
    #: Switches to this backend that failed, and the last one's error (Note [A failed switch answers its waiters]).
    failed_switches: int = 0
    last_switch_error: Optional["BackendError"] = None
    _unleased: Optional[anyio.Event] = field(default=None, repr=False)

    @property
    def model(self) -> str:
        return self.config.model


class SwitchRouter:
    """Keeps at most the budget awake and wakes the backend each request needs (Note [Switches are
    serialized]). All methods run on the switch's event loop."""

    def __init__(self, config: SwitchConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.backends: Dict[str, BackendState] = {b.model: BackendState(b) for b in config.backends}
        self.metrics = SwitchMetrics(
            lambda: sum(1 for s in self.backends.values() if s.awake),
            lambda: sum(s.config.gpu_memory_bytes for s in self.backends.values() if s.awake),
        )
        self._lock = anyio.Lock()
        #: The last :data:`RECENT_SWITCHES` switches, oldest first.
        self.recent_switches: Deque[SwitchRecord] = collections.deque(maxlen=RECENT_SWITCHES)

    # ------------------------------------------------------------------ leases
    async def acquire(self, model: Any) -> BackendState:
        """Wake ``model``'s backend if needed and take a lease on it; give it back with :meth:`release`."""
        state = self.backends.get(model) if isinstance(model, str) else None
        if state is None:
            raise UnknownModelError(model, sorted(self.backends))
        failures_seen = state.failed_switches
        state.waiting += 1
        try:
            with anyio.fail_after(self.config.switch_timeout_s):
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
            raise SwitchTimeoutError(state.model, self.config.switch_timeout_s) from None
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
        if not target.awake:  # an awake target adds nothing to the GPU: no other backend's state need be read for it
            await self._refresh_unknown()
        victims = self._victims_for(target)
        if target.awake and not victims:
            return
        t0 = time.perf_counter()
        sleeps = []
        for victim in victims:
            try:
                sleeps.append(await self._put_to_sleep(victim, reason="make_room"))
            except BackendError as exc:
                if not exc.unreachable:
                    raise
                # Nothing listens there: the process is gone, and its GPU memory with it. Its state is unknown
                # (it does not count against the budget) until it answers again.
                log.warning("%s: %s is not running; switching on without it", exc, victim.model)
        if not target.awake:
            wake = await self._wake(target)
            seconds = time.perf_counter() - t0
            self.metrics.switches.labels(model=target.model).inc()
            self.metrics.switch_seconds.observe(seconds)
            self.recent_switches.append(SwitchRecord(target.model, time.time(), seconds, tuple(sleeps), wake))
            log.info("switch to %s in %.3f s: wake-up %.3f s%s", target.model, seconds, wake.seconds,
                     "".join(f", sleep of {r.model} {r.seconds:.3f} s" for r in sleeps) or " (nothing put to sleep)")

    def _victims_for(self, target: BackendState) -> List[BackendState]:
        """The awake backends to put to sleep, least recently used first, so that ``target`` fits."""
        others = sorted((s for s in self.backends.values() if s is not target and s.awake),
                        key=lambda s: s.last_used_monotonic)
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
                    state.awake = not await self._is_sleeping(state)
                except BackendError as exc:
                    state.last_error = str(exc)
                    log.warning("%s; its state stays unknown", exc)

    async def _is_sleeping(self, state: BackendState) -> bool:
        answer = await self._call(state, "GET", "/is_sleeping", "is_sleeping",
                                  timeout_s=min(STATE_READ_TIMEOUT_S, self.config.request_timeout_s))
        value = answer.get("is_sleeping") if isinstance(answer, dict) else None
        if not isinstance(value, bool):
            raise BackendError(state.model, "is_sleeping", f"unexpected answer {answer!r}", 200, answer)
        return value

    async def _put_to_sleep(self, state: BackendState, reason: str) -> BackendCallRecord:
        while state.leases:
            if state._unleased is None:
                state._unleased = anyio.Event()
            await state._unleased.wait()
        record = await self._timed_call(state, "/sleep", "sleep", params={"level": self.config.sleep_level})
        state.awake = False
        self.metrics.sleeps.labels(model=state.model, reason=reason).inc()
        log.info("%s asleep (level %d, %s)", state.model, self.config.sleep_level, reason)
        return record

    async def _wake(self, state: BackendState) -> BackendCallRecord:
        record = await self._timed_call(state, "/wake_up", "wake_up")
        state.awake = True
        return record

    async def _timed_call(self, state: BackendState, path: str, action: str,
                          params: Optional[Dict[str, Any]] = None) -> BackendCallRecord:
        """``POST path`` (a sleep or a wake-up): its record, or :class:`BackendError` with the backend's
        state marked unknown (whether it changed is read again at the next switch)."""
        started = time.perf_counter()
        try:
            body = await self._call(state, "POST", path, action, params=params,
                                    timeout_s=self.config.backend_call_timeout_s)
        except BackendError:
            state.awake = None
            raise
        record = backend_call_record(state.model, action, time.perf_counter() - started, body)
        self.metrics.backend_call_seconds.labels(model=state.model, action=action).observe(record.seconds)
        return record

    async def _call(self, state: BackendState, method: str, path: str, action: str,
                    params: Optional[Dict[str, Any]] = None, timeout_s: Optional[float] = None) -> Any:
        """``method path`` on ``state``'s backend: its JSON answer, or :class:`BackendError`. A sleep or wake-up
        is shielded (a request's timeout never leaves a backend's state unknown); a state read changes nothing
        and is not (the request that waits for it may give up)."""
        headers = {"Authorization": f"Bearer {state.config.token}"} if state.config.token else {}
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else httpx.Timeout(timeout_s, connect=10.0)
        try:
            with anyio.CancelScope(shield=action != "is_sleeping"):
                response = await self.client.request(method, state.config.url + path, params=params, headers=headers,
                                                     timeout=timeout)
        except httpx.HTTPError as exc:
            error = BackendError(state.model, action, f"{type(exc).__name__}: {exc} ({state.config.url})",
                                 unreachable=isinstance(exc, httpx.ConnectError))
        else:
            try:
                body = response.json()
            except (ValueError, RecursionError):  # not JSON, or nested too deeply: the status still says what happened
                body = response.text[:500]
            if response.status_code < 400:
                if action != "is_sleeping":  # the last sleep or wake-up error stays until one succeeds
                    state.last_error = None
                return body
            detail = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(
                body.get("error"), dict) else None
            error = BackendError(state.model, action, detail or str(body)[:500], response.status_code, body)
        state.last_error = str(error)
        if action != "is_sleeping":
            self.metrics.failures.labels(model=state.model, action=action).inc()
        log.warning("%s", error)
        raise error

    # --------------------------------------------------------------- idle sleep
    async def sleep_idle_backends(self) -> None:
        """Put to sleep the awake backends nobody has used for ``config.idle_sleep_s``."""
        idle_s = self.config.idle_sleep_s
        if idle_s is None:
            return
        async with self._lock:
            now = time.monotonic()
            for state in self.backends.values():
                if state.awake and state.leases == 0 and now - state.last_used_monotonic >= idle_s:
                    try:
                        await self._put_to_sleep(state, reason="idle")
                    except BackendError:
                        pass  # logged and counted; the state is read again at the next switch

    async def run_idle_sleep(self) -> None:
        """Loop of :meth:`sleep_idle_backends` until cancelled (nothing to do without ``idle_sleep_s``)."""
        if self.config.idle_sleep_s is None:
            return
        now = time.monotonic()
        for state in self.backends.values():
            state.last_used_monotonic = max(state.last_used_monotonic, now)
        while True:
            await anyio.sleep(min(self.config.idle_sleep_s / 4, 5.0))
            await self.sleep_idle_backends()

    def status(self) -> List[dict]:
        return [
            {"model": s.model, "url": s.config.url, "awake": s.awake, "requests_in_flight": s.leases,
             "requests_waiting": s.waiting,
             "gpu_memory_bytes": s.config.gpu_memory_bytes, "last_error": s.last_error}
            for s in self.backends.values()
        ]
