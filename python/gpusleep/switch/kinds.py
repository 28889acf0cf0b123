"""The sleep dialects ``gpusleep switch`` speaks to its backends, one per backend ``kind``.

Note [Backend kinds]
    Every kind answers the same three questions for the router: put the backend to sleep at a level,
    wake it from the level it sleeps at, and (for a state the switch does not know) is it asleep.

    ``gpusleep``  ``POST /sleep?level=N``, ``POST /wake_up``, ``GET /is_sleeping``. A level-1 sleeper can be
                  deepened to level 2 in place (``POST /sleep?level=2`` again: the host copies are dropped).
                  A level-2 wake-up with a configured ``reload`` call runs the staged sequence below.
    ``vllm``      The same endpoints (vLLM with ``VLLM_SERVER_DEV_MODE=1 --enable-sleep-mode``). vLLM ignores a
                  sleep while asleep, so a level-1 sleeper cannot be deepened in place: it is stopped instead
                  (launched backends only). A level-2 wake-up is vLLM's sequence: ``POST /wake_up?tags=weights``
                  (weights memory only), the ``reload`` call (default ``POST /collective_rpc
                  {"method": "reload_weights"}``: the weights loaded again in place), ``POST
                  /wake_up?tags=kv_cache``, then ``POST /reset_prefix_cache`` (the prefix cache indexes blocks
                  whose contents are gone).
    ``sglang``    ``POST /flush_cache`` (where served: ``gpusleep serve`` has no prefix cache) then ``POST
                  /release_memory_occupation {}`` to sleep, ``POST /resume_memory_occupation {}`` to wake. SGLang
                  answers ``{"success": bool, "message": ...}``; the memory counts as released only once the release
                  has answered ``success: true`` (a 200 with ``success: false`` is a failed sleep). SGLang has no
                  levels (what a release keeps in host memory depends on its ``--enable-weights-cpu-backup``) and no
                  ``/is_sleeping``: a state the switch does not know is read from ``/is_sleeping`` where the server
                  has one (``gpusleep serve`` does) and is otherwise taken as awake, which counts against the GPU
                  budget (the safe side).
    ``process``   No sleep API (llama.cpp's server, anything): sleeping is stopping the process, waking is
                  starting it again and waiting for its readiness, as a swapper does. Needs a ``command``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import GpusleepError
from .config import BackendConfig

__all__ = ["CAN_DEEPEN_IN_PLACE", "Call", "Dialect", "UnexpectedAnswerError", "UnsuccessfulAnswerError", "dialect_for"]

#: ``call(method, path, action, params=None, json=None)``: the router's control call to this backend, its JSON
#: answer or BackendError.
Call = Callable[..., Awaitable[Any]]

#: Kinds whose level-1 sleep becomes level 2 in place; the others are stopped to free their host memory.
CAN_DEEPEN_IN_PLACE = frozenset({"gpusleep"})


class Dialect:
    """The sleep calls of one backend; stateless apart from its configuration."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

    @property
    def has_sleep_api(self) -> bool:
        return self.config.kind != "process"

    async def sleep(self, call: Call, level: int) -> Any:
        return await call("POST", "/sleep", "sleep", params={"level": level})

    async def deepen(self, call: Call) -> Any:
        """Level 1 to level 2 in place (only kinds in :data:`CAN_DEEPEN_IN_PLACE`)."""
        return await call("POST", "/sleep", "sleep", params={"level": 2})

    async def wake(self, call: Call, level: int) -> Any:
        """Wake from ``level``; the answer of the call that brought the weights back (for the records)."""
        reload = self.config.reload
        if level < 2 or reload is None:
            return await call("POST", "/wake_up", "wake_up")
        answer = await call("POST", "/wake_up", "wake_up", params={"tags": "weights"})
        await call("POST", reload.path, "reload", json=reload.json)
        await self._wake_rest(call)
        return answer

    async def _wake_rest(self, call: Call) -> None:
        await call("POST", "/wake_up", "wake_up")

    async def is_sleeping(self, call: Call) -> bool | None:
        """``True``/``False``, or ``None`` where the backend cannot say (the caller then decides)."""
        answer = await call("GET", "/is_sleeping", "is_sleeping")
        return _is_sleeping_value(answer)


class VllmDialect(Dialect):
    async def _wake_rest(self, call: Call) -> None:
        await call("POST", "/wake_up", "wake_up", params={"tags": "kv_cache"})
        await call("POST", "/reset_prefix_cache", "reset_prefix_cache")


class SglangDialect(Dialect):
    async def sleep(self, call: Call, level: int) -> Any:
        await call("POST", "/flush_cache", "flush_cache", missing_ok=True)  # gpusleep serve has no cache to flush
        answer = await call("POST", "/release_memory_occupation", "sleep", json={})
        _check_success(answer, "release_memory_occupation")
        return answer

    async def wake(self, call: Call, level: int) -> Any:
        answer = await call("POST", "/resume_memory_occupation", "wake_up", json={})
        _check_success(answer, "resume_memory_occupation")
        return answer

    async def is_sleeping(self, call: Call) -> bool | None:
        answer = await call("GET", "/is_sleeping", "is_sleeping", missing_ok=True)
        return None if answer is None else _is_sleeping_value(answer)


class UnsuccessfulAnswerError(GpusleepError):
    """An SGLang control call answered 200 with ``success: false``."""

    def __init__(self, endpoint: str, answer: Any) -> None:
        message = answer.get("message") if isinstance(answer, dict) else None
        super().__init__(f"{endpoint} answered success: false ({message or answer!r})")
        self.answer = answer


UnsuccessfulAnswer = UnsuccessfulAnswerError  # the name before every exception ended in Error


class UnexpectedAnswerError(GpusleepError):
    def __init__(self, answer: Any) -> None:
        super().__init__(f"unexpected answer {answer!r}")
        self.answer = answer


UnexpectedAnswer = UnexpectedAnswerError  # the name before every exception ended in Error


def _check_success(answer: Any, endpoint: str) -> None:
    if not (isinstance(answer, dict) and answer.get("success") is True):
        raise UnsuccessfulAnswerError(endpoint, answer)


def _is_sleeping_value(answer: Any) -> bool:
    value = answer.get("is_sleeping") if isinstance(answer, dict) else None
    if not isinstance(value, bool):
        raise UnexpectedAnswerError(answer)
    return value


_DIALECTS: dict[str, type] = {"gpusleep": Dialect, "vllm": VllmDialect, "sglang": SglangDialect, "process": Dialect}


def dialect_for(config: BackendConfig) -> Dialect:
    return _DIALECTS[config.kind](config)
