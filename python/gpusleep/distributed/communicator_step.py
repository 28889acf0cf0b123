"""Suspending or resuming the NCCL communicators of a model: a collective step of its own, run last.

Note [Communicators move last]
------------------------------
``ncclCommSuspend`` and ``ncclCommResume`` (what ``suspend()``/``resume()`` of a PyTorch NCCL backend call)
are collectives: each has an internal bootstrap barrier that every rank of the communicator must reach,
and no timeout. Two consequences shape the collective sleep and wake:

* **Only when every rank will call it.** A rank that enters the call while another rank does not (its own
  allocator step failed, so it went on to the exchange instead) waits at the barrier for ever, most
  likely holding the GIL, so its HTTP server and heartbeats freeze with it. So the communicators are
  never touched inside a rank's own commit: the protocol first exchanges every rank's allocator outcome,
  rolls the allocators back everywhere if any failed (no communicator was touched, so nothing hangs),
  and only when every rank's allocator slept (or woke) does every rank suspend (or resume) them, here.
* **No local undo.** Once some ranks are past the barrier, a rank that resumes on its own after a failed
  suspend enters another barrier that the others never reach. A failure in this step therefore undoes
  nothing: the outcomes are exchanged, and every rank raises :class:`CommunicatorsInconsistentError`
  (the communicators' state is unknown on every rank; abort them with ``ncclCommAbort`` and create them
  again). The allocators keep the state they reached on every rank, which is consistent.

Approach: each rank calls the communicators in a helper thread and waits for it up to a deadline
(``deadline_seconds``). A rank whose peer never joins (it refused before the barrier, or died inside the
call) stops waiting at the deadline and reports a ``TimeoutError`` for its own rank; the helper thread is
left waiting inside the call (a daemon thread: only ``ncclCommAbort`` can release it). The exchange that
follows waits ``deadline_seconds`` longer than the protocol's others, since a rank may arrive that late;
if a rank never arrives (it died) every other rank raises :class:`RanksUnresponsiveError`, which says the
communicators must be aborted too.

Limitation: the deadline needs the GIL. A ``suspend()`` binding that keeps the GIL while it waits at the
barrier (PyTorch's did, pytorch #176300) freezes the whole process until the peers arrive or the
communicator is aborted from another process; nothing in Python can bound that.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CommunicatorsInconsistentError, RankFailure, RanksUnresponsiveError
from .exchange import CollectiveFailedError, exchange

__all__ = ["move_communicators"]


@dataclass(frozen=True)
class _Moved:
    """One rank's answer to the suspend or resume step."""

    failure: RankFailure | None  #: None when every communicator returned within the deadline


class _Call:
    """Calls ``method`` of each communicator in order, in a daemon thread; remembers how it ended."""

    def __init__(self, communicators: Sequence[Any], method: str) -> None:
        self._communicators, self._method = tuple(communicators), method
        self.error: BaseException | None = None
        self.done = 0  #: communicators whose call returned
        self._thread = threading.Thread(target=self._run, name=f"gpusleep-communicators-{method}", daemon=True)

    def _run(self) -> None:
        try:
            for communicator in self._communicators:
                getattr(communicator, self._method)()
                self.done += 1
        except BaseException as error:  # reported to every rank by the caller
            self.error = error

    def finished_within(self, deadline_seconds: float) -> bool:
        self._thread.start()
        self._thread.join(deadline_seconds)
        return not self._thread.is_alive()


def _call_with_deadline(
    communicators: Sequence[Any], method: str, *, rank: int, deadline_seconds: float
) -> RankFailure | None:
    call = _Call(communicators, method)
    if not call.finished_within(deadline_seconds):
        return RankFailure(
            rank,
            method,
            "TimeoutError",
            f"{method}() of communicator {call.done + 1} of {len(communicators)} did not return within "
            f"{deadline_seconds:g} s: a rank did not join its barrier (the call still waits on this rank)",
        )
    if call.error is not None:
        return RankFailure.of(rank, method, call.error)
    return None


def move_communicators(
    operation: str,
    communicators: Sequence[Any],
    method: str,
    *,
    rank: int,
    ranks: tuple[int, ...],
    group: Any,
    deadline_seconds: float,
    timeout_seconds: float,
    allocator_state: str,
) -> None:
    """Call ``method`` ("suspend" or "resume") on every communicator, on every rank of ``group``, and
    exchange the outcomes (Note [Communicators move last]). Every rank calls it with the same number of
    communicators, after the exchange that showed every rank's allocator ``allocator_state``. Returns when
    every rank succeeded; raises :class:`CommunicatorsInconsistentError` on every rank when one did not,
    :class:`RanksUnresponsiveError` when a rank did not answer."""
    mine = _call_with_deadline(communicators, method, rank=rank, deadline_seconds=deadline_seconds)
    undo = "resume" if method == "suspend" else "suspend"
    abort = (
        f"ncclComm{method.capitalize()} is a collective with an internal barrier, so a local {undo}() cannot put "
        "it back and none was tried. Abort the communicators on every rank (ncclCommAbort: "
        "torch.distributed.destroy_process_group(), or the group's abort()) and create them again, or restart "
        "the model."
    )
    try:
        answers = exchange(_Moved(mine), step=method, group=group, timeout_seconds=deadline_seconds + timeout_seconds)
    except CollectiveFailedError as error:
        failures = (mine,) if mine is not None else ()
        raise RanksUnresponsiveError(
            f"{operation}: every rank's allocator {allocator_state}, but {error} after the communicators' "
            f"{method}(): a rank died, hangs or left the group. The communicators' state is unknown: {abort} "
            "The process group is unusable after a timed-out collective: destroy and re-create it.",
            operation=operation,
            failures=failures + (RankFailure(rank, method, "CollectiveFailedError", str(error)),),
            inconsistent_ranks=(rank,),
        ) from error
    failures = tuple(a.failure for a in answers if a.failure is not None)
    if failures:
        failed = sorted({f.rank for f in failures})
        raise CommunicatorsInconsistentError(
            f"{operation}: every rank's allocator {allocator_state}, but {method}() of the NCCL communicators "
            f"failed on rank(s) {failed}: {'; '.join(f.describe() for f in failures)}. Their state is unknown on "
            f"every rank: {abort}",
            operation=operation,
            failures=failures,
            inconsistent_ranks=tuple(ranks),
        )
