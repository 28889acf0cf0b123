"""What ``gpusleep switch`` remembers of its recent switches: each one's time, split into the sleeps that
made room and the wake-up of the wanted backend, with what the backends said they moved. Shown by
``GET /switch/status`` (``recent_switches``, oldest first) and read by ``benchmarks/bench_switch.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BackendCallRecord", "SwitchRecord", "backend_call_record"]


@dataclass(frozen=True)
class BackendCallRecord:
    """One ``POST /sleep`` or ``POST /wake_up`` the switch made, as it saw it."""

    model: str
    action: str  #: ``"sleep"``, ``"wake_up"``, or for launched backends ``"start"`` and ``"stop"``
    seconds: float  #: round trip measured by the switch, HTTP included
    #: The backend's own time of the call (its ``sleep_seconds`` / ``wake_seconds``), when it reports one.
    backend_seconds: float | None = None
    #: Bytes the call copied (a sleep's ``bytes_offloaded``, a wake-up's ``bytes_restored``), when reported.
    bytes_copied: int | None = None
    #: A sleep's bytes offloaded without a copy: kept host copies (``report.bytes_reused``), when reported.
    bytes_reused: int | None = None


@dataclass(frozen=True)
class SwitchRecord:
    """One switch: the backends put to sleep to make room for ``model``, then its wake-up."""

    model: str
    finished_unix_seconds: float
    seconds: float  #: the whole switch: the sleeps plus the wake-up
    sleeps: tuple[BackendCallRecord, ...]
    wake: BackendCallRecord  #: its wake-up (or its start, ``action="start"``, for a launched backend not running)
    kind: str = "gpusleep"  #: the backend kind of ``model`` (kinds.py)


def _number(body: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body if isinstance(body, (int, float)) and not isinstance(body, bool) else None


def backend_call_record(model: str, action: str, seconds: float, body: Any) -> BackendCallRecord:
    """The record of a successful call whose JSON answer was ``body`` (the sleep-mode API's fields are read
    where present; a backend that answers less, vLLM's ``{}`` say, leaves them ``None``)."""
    sleeping = action == "sleep"
    copied = _number(body, "bytes_offloaded" if sleeping else "bytes_restored")
    reused = _number(body, "report", "bytes_reused") if sleeping else None
    return BackendCallRecord(
        model=model,
        action=action,
        seconds=seconds,
        backend_seconds=_number(body, "sleep_seconds" if sleeping else "wake_seconds"),
        bytes_copied=int(copied) if copied is not None else None,
        bytes_reused=int(reused) if reused is not None else None,
    )
