"""The :class:`SleepController` protocol: what the HTTP control plane needs from the thing that sleeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["SleepController", "read_is_sleeping"]


@runtime_checkable
class SleepController(Protocol):
    """Anything that can put a model to sleep and wake it up. :class:`gpusleep.Allocator` is one.

    ``sleep`` and ``wake_up`` are blocking calls; the control plane runs them in a worker thread, one at
    a time, never while a protected request is running. They may return a report
    (:class:`gpusleep.SleepReport` / :class:`gpusleep.WakeReport`, or any object with the same fields),
    which the control plane returns in the HTTP body and exports in ``/metrics``. A controller that also
    has ``stats() -> gpusleep.AllocatorStats`` gets per-tag memory figures in ``/metrics``.

    Optional: ``check_sleep(level) -> None`` raises the error ``sleep(level)`` would raise for a reason
    known in advance (no CUDA device, say), without changing anything. The control plane calls it
    before it stops admitting requests, so a sleep that cannot happen never turns clients away.

    Errors the control plane turns into clear HTTP answers: ``ValueError`` (400: bad level, unknown
    tag), :class:`gpusleep.OutOfMemoryError` (409: not enough GPU memory to wake, the model stays
    asleep), :class:`gpusleep.HostOutOfMemoryError` (507: not enough host memory for a level-1
    sleep, the model keeps serving), :class:`gpusleep.CaptureInProgressError` and
    :class:`gpusleep.SleepStateError` (409), :class:`gpusleep.DriverUnavailableError` (501: no CUDA
    device). Anything else is a 500 with the exception's message.
    """

    def sleep(self, level: int) -> Any: ...

    def wake_up(self, tags: Sequence[str] | None) -> Any: ...

    @property
    def is_sleeping(self) -> bool: ...


def read_is_sleeping(controller: SleepController) -> bool:
    """``controller.is_sleeping`` as a bool, whether the controller made it a property or a method."""
    value = controller.is_sleeping
    if callable(value):
        value = value()
    return bool(value)
