"""Errors of the collective sleep and wake: the same error, naming the same ranks, on every rank."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GpusleepError, HostOutOfMemoryError, OutOfMemoryError

__all__ = [
    "CommunicatorsInconsistentError",
    "DistributedSleepError",
    "InvalidModelRequestError",
    "ModelHostOutOfMemoryError",
    "ModelOutOfMemoryError",
    "RankFailure",
    "RanksUnresponsiveError",
]


@dataclass(frozen=True)
class RankFailure:
    """Why one rank could not go ahead (or could not roll back)."""

    rank: int  #: global rank in the default process group
    phase: str  #: "prepare", "commit", "rollback", or "suspend"/"resume" (of the communicators)
    error_type: str  #: the exception's class name, e.g. "OutOfMemoryError"
    message: str  #: the exception's message, as the rank raised it
    bytes_needed: int = 0  #: from OutOfMemoryError / HostOutOfMemoryError, else 0
    bytes_free: int | None = None  #: GPU bytes free (OutOfMemoryError) or host bytes available (HostOutOfMemoryError)

    def describe(self) -> str:
        return f"rank {self.rank} ({self.phase}): {self.error_type}: {self.message}"

    @classmethod
    def of(cls, rank: int, phase: str, error: BaseException) -> RankFailure:
        """The record of ``error``, raised on ``rank`` in ``phase``, with the bytes a memory error carries."""
        if isinstance(error, OutOfMemoryError):
            needed, free = error.bytes_needed, error.bytes_free
        elif isinstance(error, HostOutOfMemoryError):
            needed, free = error.bytes_needed, error.bytes_available
        else:
            needed, free = 0, None
        return cls(rank, phase, type(error).__name__, str(error), needed, free)


class DistributedSleepError(RuntimeError, GpusleepError):
    """A collective sleep or wake did not happen on every rank.

    Every rank raises it with the same ``failures`` (the ranks that could not, and why), after putting
    itself back in its previous state. ``rolled_back_ranks`` are the ranks that had changed state and
    were put back; ``inconsistent_ranks`` the ranks whose roll back itself failed (empty when the model
    is consistent again: then the call can simply be retried once the cause is gone)."""

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        failures: tuple[RankFailure, ...] = (),
        rolled_back_ranks: tuple[int, ...] = (),
        inconsistent_ranks: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.failures = tuple(failures)
        self.rolled_back_ranks = tuple(rolled_back_ranks)
        self.inconsistent_ranks = tuple(inconsistent_ranks)

    @property
    def failed_ranks(self) -> tuple[int, ...]:
        return tuple(sorted({f.rank for f in self.failures}))


class ModelOutOfMemoryError(DistributedSleepError, OutOfMemoryError):
    """A collective wake found too little free GPU memory on some rank; every rank stays asleep.

    It is a :class:`gpusleep.OutOfMemoryError` (the HTTP control plane answers 409); ``bytes_needed``
    and ``bytes_free`` are those of the first rank that ran out."""

    def __init__(self, message: str, **kwargs) -> None:
        DistributedSleepError.__init__(self, message, **kwargs)
        first = next((f for f in self.failures if f.error_type == "OutOfMemoryError"), None)
        self.bytes_needed = first.bytes_needed if first else 0
        self.bytes_free = first.bytes_free if first else None
        self.device = -1


class ModelHostOutOfMemoryError(DistributedSleepError, HostOutOfMemoryError):
    """A collective level-1 sleep could not pin host memory on some rank; every rank keeps serving.

    It is a :class:`gpusleep.HostOutOfMemoryError` (the HTTP control plane answers 507)."""

    def __init__(self, message: str, **kwargs) -> None:
        DistributedSleepError.__init__(self, message, **kwargs)
        first = next((f for f in self.failures if f.error_type == "HostOutOfMemoryError"), None)
        self.bytes_needed = first.bytes_needed if first else 0
        self.bytes_available = first.bytes_free if first else None
        self.limited_by = ""


class InvalidModelRequestError(DistributedSleepError, ValueError):
    """Some rank found the request invalid (a level that does not exist, a tag it does not know); nothing
    changed anywhere. It is a :class:`ValueError` (the HTTP control plane answers 400)."""


class RanksUnresponsiveError(DistributedSleepError):
    """A collective step did not complete in time: a rank died, hung or left the group.

    The ranks that answered have put themselves back in their previous state. The process group is not
    usable afterwards (a timed-out torch.distributed collective leaves it broken): destroy it and create
    it again, or restart the model."""


class CommunicatorsInconsistentError(DistributedSleepError):
    """Suspending or resuming the NCCL communicators (``communicators=``) failed or timed out on some rank,
    after every rank's allocator had slept or woken (Note [Communicators move last], communicator_step.py).

    ``ncclCommSuspend``/``ncclCommResume`` are collectives with an internal barrier: once some ranks are
    past it, no local call can undo it, so nothing was undone and nothing was resumed on one rank alone.
    The communicators' state is unknown on every rank (``inconsistent_ranks`` names them all); the
    allocator's state is the one the message names (the same on every rank). Abort the communicators on
    every rank (``ncclCommAbort``: ``torch.distributed.destroy_process_group()`` or the group's
    ``abort()``) and create them again, or restart the model."""
