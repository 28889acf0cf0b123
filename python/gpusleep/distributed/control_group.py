"""The process group that carries the sleep protocol's own messages: a gloo group, never an NCCL one.

Note [Control traffic on gloo]
------------------------------
The protocol's exchanges, the HTTP controller's commands and its heartbeats are small all-gathers of
CPU tensors with a deadline. Over an NCCL communicator they would be wrong three ways:

* the sleep suspends the model's NCCL communicators (``communicators=``), and a collective on a
  suspended communicator is an error (it faults the GPU in RCCL);
* the heartbeat and ``follow()`` threads would issue collectives concurrently with the model's own on the
  same communicator, from another thread; NCCL pairs operations by issue order, so the ranks would pair
  different operations (a hang or corrupted data);
* after ``Work.wait(timeout)`` expires, an NCCL all-gather is still queued on the GPU waiting for the dead
  peer, and the rollback's device synchronization waits for it for ever.

So :func:`control_group` refuses a group whose CPU tensors would go to NCCL, before anything changes, and
for ``group=None`` on a world whose default backend is NCCL creates a gloo group over the same ranks
(``new_group(backend="gloo")``), once per world, and reuses it. Creating it is itself a collective over
the world: every rank makes it at the same point, its first sleep, wake, ``ModelSleepController`` or
``follow()`` with ``group=None``, since every rank makes the same calls. A world whose default backend
carries CPU tensors over gloo (``"gloo"``, ``"cpu:gloo,cuda:nccl"``) is used as it is; if the model runs
CPU collectives of its own on it from other threads, pass a group of its own for control traffic.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["control_group"]

_lock = threading.Lock()
_made: tuple[Any, Any] | None = None  # (the world it was made for, its gloo group)


def _cpu_backend(group: Any) -> str | None:
    """The backend that carries ``group``'s CPU tensors ("gloo", ...), None when none does."""
    import torch.distributed as dist

    name = str(dist.get_backend(group)).lower()
    if ":" not in name:  # one backend for every device
        return name
    by_device = dict(pair.split(":", 1) for pair in name.split(",") if ":" in pair)
    return by_device.get("cpu")


def _carries_cpu_tensors(group: Any) -> bool:
    backend = _cpu_backend(group)
    return backend is not None and backend != "nccl"


def control_group(group: Any | None) -> Any:
    """The group the protocol's messages run on: ``group`` itself if its CPU tensors go over gloo (or
    another CPU backend), and for ``None`` the world, or a gloo group over the world's ranks when the
    world's default backend is NCCL (made once per world). Raises ``ValueError`` for a group passed
    explicitly whose CPU tensors would go to NCCL (Note [Control traffic on gloo])."""
    global _made
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "gpusleep.distributed needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    if group is not None:
        if not _carries_cpu_tensors(group):
            raise ValueError(
                f"group={getattr(group, 'group_name', group)!r} is an NCCL group (backend "
                f"{dist.get_backend(group)!r}): gpusleep.distributed sends its own messages over a gloo group, never "
                "over NCCL (its communicators may be suspended, its collectives would interleave with the model's, "
                "and a timed-out one stays queued on the GPU). Pass group=dist.new_group(backend='gloo') made on "
                "every rank, or group=None to have one made. Nothing was changed."
            )
        return group
    world = dist.group.WORLD
    if _carries_cpu_tensors(world):
        return world
    with _lock:
        if _made is None or _made[0] is not world:
            # The group's own default timeout (gloo's, long): each exchange waits with its own deadline.
            gloo = dist.new_group(backend="gloo")
            _made = (world, gloo)
        return _made[1]
