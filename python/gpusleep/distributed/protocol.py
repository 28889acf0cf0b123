"""Collective sleep and wake: every rank of a process group, or none (two phases, roll back on failure).

Each call runs the same steps on every rank, each step ending with one timed :func:`exchange`:

1. **prepare**: check what can be checked without changing the model's state (a valid level, known
   tags) and exchange the votes. If a rank cannot go ahead, every rank raises the same error and
   nothing changed anywhere. Before a level-1 sleep each vote also carries the rank's
   :class:`HostClaim` (its node, the host bytes it must pin, the budget it reads): when the ranks of one
   node together need more than the node allows, every rank refuses before anything is pinned (Note [Host
   memory per node] in host_claims.py). Otherwise every rank reserves what the commit needs
   (``reserve_host_memory()`` pins the host memory the copies will use) and a second exchange
   ("reserve") shares how that went.
2. **commit**: every rank sleeps (or wakes) its own allocator, a transaction of its own. Exchange the
   outcomes (the reports are gathered, so every rank knows the model's bytes, time and slowest rank).
3. **rollback**, only when a commit failed somewhere: the ranks whose state changed put it back
   (wake what the sleep put to sleep; sleep again, at the same level, what the wake woke), and a last
   exchange tells every rank which ranks are consistent. Every rank raises the same error.
4. **suspend** (after a sleep) or **resume** (after a wake) of ``communicators=``, only when every rank's
   commit succeeded: a collective of its own, with a deadline, never undone locally
   (Note [Communicators move last] in communicator_step.py). A failure there is a
   :class:`CommunicatorsInconsistentError` on every rank.

A step that does not complete within ``timeout_seconds`` (a rank died or hangs) is a
:class:`RanksUnresponsiveError` on every rank that is still there, after it has put its own state back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import OutOfMemoryError
from ..stats import format_bytes
from .communicator_step import move_communicators
from .control_group import control_group
from .errors import (
    DistributedSleepError,
    InvalidModelRequestError,
    ModelHostOutOfMemoryError,
    ModelOutOfMemoryError,
    RankFailure,
    RanksUnresponsiveError,
)
from .exchange import CollectiveFailedError, StepMismatch, exchange
from .host_claims import HostClaim, host_claim, node_shortfalls
from .reports import ModelSleepReport, ModelWakeReport

__all__ = ["DEFAULT_TIMEOUT_SECONDS", "sleep", "wake_up"]

log = logging.getLogger("gpusleep.distributed")

#: How long each exchange waits for every rank. It covers the slowest rank's own sleep or wake (the copies
#: of its weights at PCIe speed), so size it to the model: 60 s covers ~1 TB per rank at 20 GB/s.
DEFAULT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class _Vote:
    """One rank's answer to the prepare step."""

    request: tuple[Any, ...]  #: what this rank was asked (operation, level or tags): must match on every rank
    failure: RankFailure | None
    host_claim: HostClaim | None = None  #: before a level-1 sleep: the host memory this rank must pin
    state: tuple[int, str] = (-1, "")  #: (rank, its state before the call): a refusal says where every rank stands


@dataclass(frozen=True)
class _Outcome:
    """One rank's answer to the commit step."""

    report: Any  #: SleepReport / WakeReport, or None when it failed
    failure: RankFailure | None


@dataclass(frozen=True)
class _Rollback:
    """One rank's answer to the rollback step."""

    changed: bool  #: the commit had changed this rank's state (so it rolled back)
    failure: RankFailure | None  #: the rollback itself failed: this rank is not in its previous state


def _group_ranks(group: Any) -> tuple[tuple[int, ...], int]:
    """The global ranks of ``group`` (a control group), in group order, and this rank's."""
    import torch.distributed as dist

    return tuple(dist.get_process_group_ranks(group)), dist.get_rank()


def _state_of(alloc: Any, rank: int) -> tuple[int, str]:
    """This rank's sleep state in words, for the votes: "awake", or "asleep (tags ...)"."""
    asleep = sorted(alloc.sleeping_tags)
    return rank, f"asleep ({', '.join(asleep)})" if asleep else "awake"


def _states_text(votes: Sequence[_Vote]) -> str:
    """Where every rank stands, from the gathered votes (the same text on every rank): "every rank is awake
    as before", or, when they differ, each group of ranks with its state."""
    by_state: dict = {}
    for rank, state in (v.state for v in votes):
        by_state.setdefault(state, []).append(rank)
    if len(by_state) == 1:
        return f"every rank is {next(iter(by_state))} as before"
    return "nothing changed: " + ", ".join(f"rank(s) {ranks} {state}" for state, ranks in by_state.items())


def _error(
    operation: str,
    failures: list[RankFailure],
    *,
    before: str,
    rolled_back=(),
    inconsistent=(),
    states: str | None = None,
) -> DistributedSleepError:
    """The error every rank raises: the same class, message and fields, from the same gathered facts.
    ``states``: where every rank stands, from the votes (else "every rank is ``before`` as before")."""
    ranks = sorted({f.rank for f in failures})
    state = (
        f"ranks {list(inconsistent)} could not be put back and are NOT in their previous state; the model is "
        "inconsistent: restart it"
        if inconsistent
        else (states or f"every rank is {before} as before")
        + (f" (ranks {list(rolled_back)} were rolled back)" if rolled_back else "")
    )
    lines = "; ".join(f.describe() for f in failures)
    kinds = {f.error_type for f in failures if f.phase != "rollback"}
    advice = (
        "Correct the call (the same on every rank) and retry."
        if kinds == {"ValueError"}
        else "Fix the cause on those ranks (free GPU or host memory there) and retry."
    )
    message = (
        f"{operation} did not happen on the whole model: {len(ranks)} rank(s) {ranks} could not go ahead; {state}. "
        f"{lines}. {advice}"
    )
    cls = DistributedSleepError
    if not inconsistent and kinds == {"OutOfMemoryError"}:
        cls = ModelOutOfMemoryError
    elif not inconsistent and kinds == {"HostOutOfMemoryError"}:
        cls = ModelHostOutOfMemoryError
    elif not inconsistent and kinds == {"ValueError"}:
        cls = InvalidModelRequestError
    return cls(
        message,
        operation=operation,
        failures=tuple(failures),
        rolled_back_ranks=tuple(rolled_back),
        inconsistent_ranks=tuple(inconsistent),
    )


def _unresponsive(
    operation: str,
    step: str,
    error: CollectiveFailedError,
    rank: int,
    rolled_back: bool,
    rollback_failure: BaseException | None,
) -> RanksUnresponsiveError:
    if rollback_failure is not None:
        mine = f"this rank ({rank}) changed state and could NOT put it back ({rollback_failure})"
    elif rolled_back:
        mine = f"this rank ({rank}) had changed state and put it back"
    else:
        mine = f"this rank ({rank}) did not change state"
    return RanksUnresponsiveError(
        f"{operation}: {error}; {mine}. A rank died, hangs or left the group; the process group is unusable "
        "after a timed-out collective: destroy and re-create it (or restart the model), then retry.",
        operation=operation,
        failures=(RankFailure(rank, step, "CollectiveFailedError", str(error)),),
        rolled_back_ranks=(rank,) if rolled_back and rollback_failure is None else (),
        inconsistent_ranks=(rank,) if rollback_failure is not None else (),
    )


def _prepare(
    operation: str,
    request: tuple[Any, ...],
    check: Callable[[], Any],
    *,
    alloc: Any,
    rank: int,
    group,
    timeout_seconds: float,
    step: str = "prepare",
    claim: Callable[[], HostClaim | None] = lambda: None,
) -> tuple[Any, tuple[HostClaim | None, ...], str]:
    """Step 1: run ``check`` (this rank's checks and reservations; it changes no state) and ``claim``, and
    exchange the votes at ``step``. Every rank raises the same error when the ranks were asked different
    things (``request``) or any rank refused (the error says where every rank stands: each vote carries its
    rank's state). Returns what ``check`` returned, every rank's claim in group order, and where the ranks stand."""
    checked, failure, claimed = None, None, None
    try:
        checked = check()
        claimed = claim()
    except Exception as error:  # reported to every rank, raised by all below
        failure = RankFailure.of(rank, "prepare", error)
    vote = _Vote(request, failure, claimed, _state_of(alloc, rank))
    try:
        votes = exchange(vote, step=step, group=group, timeout_seconds=timeout_seconds)
    except StepMismatch as error:
        raise DistributedSleepError(
            f"{operation}: the ranks are not running the same operation ({error}); call the same one on every "
            "rank. Nothing changed.",
            operation=operation,
        ) from error
    except CollectiveFailedError as error:
        raise _unresponsive(operation, "prepare", error, rank, False, None) from error
    if any(v.request != vote.request for v in votes):
        asked = sorted({repr(v.request) for v in votes})
        raise DistributedSleepError(
            f"{operation}: the ranks were asked different things ({', '.join(asked)}); call it with the same "
            "arguments on every rank. Nothing changed.",
            operation=operation,
        )
    failures = [v.failure for v in votes if v.failure is not None]
    states = _states_text(votes)
    if failures:
        raise _error(operation, failures, before="", states=states)
    return checked, tuple(v.host_claim for v in votes), states


def _commit(
    operation: str,
    alloc: Any,
    before: frozenset[str],
    commit: Callable[[], Any],
    undo: Callable[[], None],
    *,
    rank: int,
    ranks: tuple[int, ...],
    group,
    timeout_seconds: float,
    rolled_back_state: str,
) -> tuple[Any, ...]:
    """Step 2, and step 3 when a commit failed anywhere: run ``commit`` (this rank's own sleep or wake of its
    allocator, nothing else; it returns the rank's report) and exchange the outcomes. If a rank failed,
    every rank puts its own state back with ``undo`` and raises the same error (naming
    ``rolled_back_state``); if the exchange fails, this rank puts its state back and raises
    :class:`RanksUnresponsiveError`. Returns every rank's report, in group order."""
    report, failure = None, None
    try:
        report = commit()
    except Exception as error:
        failure = RankFailure.of(rank, "commit", error)
    try:
        outcomes = exchange(_Outcome(report, failure), step="commit", group=group, timeout_seconds=timeout_seconds)
    except CollectiveFailedError as error:
        changed, rollback_error = _undo(undo, alloc, before)
        raise _unresponsive(operation, "commit", error, rank, changed, rollback_error) from error
    failures = [o.failure for o in outcomes if o.failure is not None]
    if failures:
        _roll_back_everywhere(
            operation,
            failures,
            alloc,
            before,
            undo,
            rank=rank,
            ranks=ranks,
            group=group,
            timeout_seconds=timeout_seconds,
            state=rolled_back_state,
        )
    return tuple(o.report for o in outcomes)


def sleep(
    alloc: Any,
    level: int = 1,
    group: Any | None = None,
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    communicators: Sequence[Any] = (),
    communicator_timeout_seconds: float | None = None,
) -> ModelSleepReport:
    """Put ``alloc`` (this rank's :class:`gpusleep.Allocator`) to sleep at ``level`` on every rank of
    ``group``, or on none. Call it on every rank with the same ``level``. ``group`` carries the protocol's
    messages: a gloo group; None means every rank of the world, over a gloo group made once per world when
    the world's backend is NCCL; an NCCL group is refused with ``ValueError`` before anything changes
    (Note [Control traffic on gloo] in control_group.py).

    Returns the model's report on every rank. Raises, on every rank alike:
    :class:`ModelHostOutOfMemoryError` when some rank cannot pin the host memory of a level-1 sleep, or
    the ranks of one node together need more than it allows (nothing is pinned then),
    :class:`InvalidModelRequestError` for a level that does not exist,
    :class:`DistributedSleepError` for any other failure (each naming the ranks and their errors; every
    rank is awake as before), :class:`RanksUnresponsiveError` when a rank does not answer within
    ``timeout_seconds``.

    ``communicators`` (:func:`nccl_communicators`) are suspended after every rank's allocator slept, on
    every rank, each rank waiting at most ``communicator_timeout_seconds`` (default ``timeout_seconds``);
    if that fails anywhere every rank raises :class:`CommunicatorsInconsistentError` (the allocators stay
    asleep; abort the communicators). Pass the same number on every rank."""
    operation = f"sleep(level={level})"
    group = control_group(group)  # refuses an NCCL group before anything changes
    ranks, rank = _group_ranks(group)
    started = time.monotonic()
    before = frozenset(alloc.sleeping_tags)

    def check() -> None:
        if level not in (1, 2) or isinstance(level, bool):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")

    request = ("sleep", level, len(communicators))
    _, claims, states = _prepare(
        operation,
        request,
        check,
        alloc=alloc,
        rank=rank,
        group=group,
        timeout_seconds=timeout_seconds,
        claim=lambda: host_claim(alloc) if level == 1 else None,
    )
    if level == 1:
        shortfalls = node_shortfalls(claims, ranks)  # the same on every rank: computed from the same claims
        if shortfalls:
            raise _error(operation, shortfalls, before="", states=states)
        if any(c is None or c.bytes_to_pin > 0 for c in claims):
            # Pins what the copies need now; raises HostOutOfMemoryError if this rank cannot.
            _prepare(
                operation,
                request,
                alloc.reserve_host_memory,
                alloc=alloc,
                rank=rank,
                group=group,
                timeout_seconds=timeout_seconds,
                step="reserve",
            )
    prepare_seconds = time.monotonic() - started

    per_rank = _commit(
        operation,
        alloc,
        before,
        lambda: alloc.sleep(level=level),
        lambda: _undo_sleep(alloc, before),
        rank=rank,
        ranks=ranks,
        group=group,
        timeout_seconds=timeout_seconds,
        rolled_back_state="in its previous state"
        if level == 1
        else "awake again, but the ranks rolled back from level 2 hold zero-filled memory: reload their weights",
    )
    if communicators:
        move_communicators(
            operation,
            communicators,
            "suspend",
            rank=rank,
            ranks=ranks,
            group=group,
            deadline_seconds=_deadline(communicator_timeout_seconds, timeout_seconds),
            timeout_seconds=timeout_seconds,
            allocator_state="is asleep",
        )
    result = ModelSleepReport(level, ranks, per_rank, time.monotonic() - started, prepare_seconds)
    if rank == ranks[0]:
        log.info(result.summary())
    return result


def wake_up(
    alloc: Any,
    tags: Sequence[str] | None = None,
    group: Any | None = None,
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    communicators: Sequence[Any] = (),
    communicator_timeout_seconds: float | None = None,
) -> ModelWakeReport:
    """Wake ``tags`` (every sleeping tag when None) of ``alloc`` on every rank of ``group`` (chosen as for
    :func:`sleep`), or on none. Call it on every rank with the same ``tags``.

    If a rank cannot wake (:class:`gpusleep.OutOfMemoryError`: another tenant took its GPU memory), the
    ranks that did wake put exactly the tags it woke back to sleep at their previous level (offloaded
    tags copied to host again, bit-exact; tags awake before the call, as in a staged wake, stay awake)
    and every rank raises :class:`ModelOutOfMemoryError` naming the ranks and the bytes needed and free.
    ``communicators`` suspended by :func:`sleep` are resumed after every rank's allocator woke, as
    :func:`sleep` suspends them (a failure there is a :class:`CommunicatorsInconsistentError`)."""
    names = None if tags is None else tuple(sorted(tags))
    operation = f"wake_up(tags={list(names) if names is not None else None})"
    group = control_group(group)  # refuses an NCCL group before anything changes
    ranks, rank = _group_ranks(group)
    started = time.monotonic()
    before = frozenset(alloc.sleeping_tags)

    def check() -> frozenset[str]:
        """Returns the tags asleep with a host copy (level 1): a roll back copies them to host again."""
        if names is not None:
            unknown = sorted(set(names) - set(alloc.known_tags))
            if unknown:
                raise ValueError(f"unknown tag(s) {unknown}; this rank knows {sorted(alloc.known_tags)}")
        backed_up = frozenset(t for t, s in alloc.stats().tags.items() if s.is_sleeping and s.bytes_backed_up > 0)
        # A dry run: a rank whose GPU cannot hold what it would map refuses before any rank maps memory.
        for plan in getattr(alloc, "plan_wake", lambda _tags: ())(names):
            if not plan.fits:
                raise OutOfMemoryError(
                    f"wake_up(tags={list(names) if names is not None else None}) needs "
                    f"{format_bytes(plan.bytes_needed)} of GPU memory on device {plan.device} but only "
                    f"{format_bytes(plan.bytes_free)} is free (and {format_bytes(plan.bytes_reclaimable)} of "
                    "gpusleep's cache could be given back)",
                    plan.bytes_needed,
                    plan.bytes_free,
                    plan.device,
                )
        return backed_up

    backed_up, _, _ = _prepare(
        operation,
        ("wake_up", names, len(communicators)),
        check,
        alloc=alloc,
        rank=rank,
        group=group,
        timeout_seconds=timeout_seconds,
    )
    prepare_seconds = time.monotonic() - started

    per_rank = _commit(
        operation,
        alloc,
        before,
        lambda: alloc.wake_up(list(names) if names is not None else None),
        lambda: _undo_wake(alloc, before, backed_up),
        rank=rank,
        ranks=ranks,
        group=group,
        timeout_seconds=timeout_seconds,
        rolled_back_state="in its previous state (the tags this call woke are asleep again)",
    )
    if communicators:
        move_communicators(
            operation,
            communicators,
            "resume",
            rank=rank,
            ranks=ranks,
            group=group,
            deadline_seconds=_deadline(communicator_timeout_seconds, timeout_seconds),
            timeout_seconds=timeout_seconds,
            allocator_state="is awake",
        )
    result = ModelWakeReport(ranks, per_rank, time.monotonic() - started, prepare_seconds)
    if rank == ranks[0]:
        log.info(result.summary())
    return result


def _deadline(communicator_timeout_seconds: float | None, timeout_seconds: float) -> float:
    return float(timeout_seconds if communicator_timeout_seconds is None else communicator_timeout_seconds)


def _undo_sleep(alloc: Any, before: frozenset[str]) -> None:
    newly_asleep = sorted(frozenset(alloc.sleeping_tags) - before)
    if newly_asleep:
        alloc.wake_up(newly_asleep)


def _undo_wake(alloc: Any, before: frozenset[str], backed_up: frozenset[str]) -> None:
    """Put exactly the tags this wake woke back to sleep: those that had a host copy at level 1 (copied
    again, bit-exact), the others without a copy (they held none). Tags awake before stay awake."""
    woken = sorted(before - frozenset(alloc.sleeping_tags))
    if not woken:
        return
    offload = sorted(set(woken) & backed_up)
    if offload:
        alloc.sleep(level=1, offload_tags=offload, tags=woken)
    else:
        alloc.sleep(level=2, tags=woken)


def _undo(action, alloc: Any, before: frozenset[str]) -> tuple[bool, BaseException | None]:
    """Run ``action`` if this rank's state changed since ``before``. Returns (changed, error of the undo)."""
    changed = frozenset(alloc.sleeping_tags) != before
    if not changed:
        return False, None
    try:
        action()
    except Exception as error:  # reported to every rank as an inconsistent rank
        log.error("gpusleep.distributed: rolling back this rank failed: %s", error)
        return changed, error
    return changed, None


def _roll_back_everywhere(
    operation: str,
    failures: list[RankFailure],
    alloc: Any,
    before: frozenset[str],
    action,
    *,
    rank: int,
    ranks: tuple[int, ...],
    group,
    timeout_seconds: float,
    state: str,
) -> None:
    """Every rank undoes its own change, tells the others how it went, and raises the same error."""
    changed, rollback_error = _undo(action, alloc, before)
    mine = _Rollback(changed, RankFailure.of(rank, "rollback", rollback_error) if rollback_error is not None else None)
    try:
        answers = exchange(mine, step="rollback", group=group, timeout_seconds=timeout_seconds)
    except CollectiveFailedError as error:
        raise _unresponsive(operation, "rollback", error, rank, changed, rollback_error) from error
    rolled_back = tuple(r for r, a in zip(ranks, answers, strict=False) if a.changed and a.failure is None)
    inconsistent = tuple(r for r, a in zip(ranks, answers, strict=False) if a.failure is not None)
    all_failures = failures + [a.failure for a in answers if a.failure is not None]
    raise _error(operation, all_failures, before=state, rolled_back=rolled_back, inconsistent=inconsistent)
