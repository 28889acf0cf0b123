"""NCCL communicator memory across a sleep: what can be released, and how.

NCCL allocates its own GPU memory per communicator (channel buffers, proxy and P2P/NVLS buffers: tens
to hundreds of MiB per communicator, more with NVLS), through cudaMalloc or cuMem* directly, never
through gpusleep. A sleep of the allocator therefore leaves it mapped. NCCL 2.29.7 added
``ncclCommSuspend(comm, NCCL_SUSPEND_MEM)`` / ``ncclCommResume(comm)`` to release and restore it;
PyTorch builds that bind them expose ``suspend()`` / ``resume()`` on the NCCL backend of a process group
(``group._get_backend(torch.device("cuda"))``). The torch installed in CI (2.13, CPU) has no NCCL backend.

:func:`nccl_communicators` returns what can be suspended for the given process groups, or raises a clear
error when the running torch or NCCL cannot. The collective :func:`gpusleep.distributed.sleep` and
:func:`~gpusleep.distributed.wake_up` take the result as ``communicators=``: they suspend them after every
rank's allocator slept and resume them after every rank's allocator woke, on every rank together, each a
collective step of its own with a deadline (Note [Communicators move last] in communicator_step.py). A
failure there is not undone: every rank raises ``CommunicatorsInconsistentError``; abort the communicators.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

__all__ = ["SuspendableCommunicator", "nccl_communicators"]


@runtime_checkable
class SuspendableCommunicator(Protocol):
    """What the sleep protocol needs from a communicator: release and restore its GPU memory."""

    def suspend(self) -> Any: ...

    def resume(self) -> Any: ...


def nccl_communicators(groups: Iterable[Any]) -> list[SuspendableCommunicator]:
    """The NCCL backends of ``groups`` (process groups whose communicators were created on this rank's
    current CUDA device), ready to pass as ``communicators=``. Raises ``RuntimeError`` naming what is
    missing when a group has no NCCL backend or the backend cannot suspend."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    backends = []
    for group in groups:
        backend = group._get_backend(device)
        missing = [name for name in ("suspend", "resume") if not callable(getattr(backend, name, None))]
        if missing:
            raise RuntimeError(
                f"the {type(backend).__name__} backend of process group {getattr(group, 'group_name', group)!r} "
                f"has no {missing}: releasing NCCL communicator memory needs a torch whose NCCL backend binds "
                "ncclCommSuspend/ncclCommResume (NCCL >= 2.29.7). Sleep without communicators= instead; the "
                "communicators then keep their GPU memory while the model sleeps."
            )
        backends.append(backend)
    return backends
