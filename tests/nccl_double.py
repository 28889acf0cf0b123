"""Stand-ins for NCCL in the multi-rank tests (CI's torch has no NCCL), as strict as NCCL where it matters.

:class:`BarrierCommunicator` stands for a ProcessGroupNCCL backend whose ``suspend()``/``resume()`` call
``ncclCommSuspend``/``ncclCommResume`` (NCCL >= 2.29.7). Those are collectives: each has an internal
bootstrap barrier that every rank of the communicator must reach, and no timeout. So the stand-in's
``suspend()`` and ``resume()`` meet the same call of the other ranks at a barrier through the process
group's store and wait for them for ever (the test's parent kills a child that hangs, and says so). A
rank's n-th call pairs with the other ranks' n-th call of the same communicator, as NCCL pairs by issue
order; calls of a different kind paired together are an error. Faults: ``before_barrier`` runs on this
rank before it joins (raise there to refuse without joining, as a local argument check of NCCL does, or
``os._exit`` to die inside the call).

:func:`pretend_world_is_nccl` makes the default (gloo) group look like an NCCL-only world to the code under
test: ``torch.distributed.get_backend()`` says ``"nccl"`` for it, and a collective of CPU tensors on it
fails as ProcessGroupNCCL fails ("No backend type associated with device type cpu"). Every group the code
creates with ``new_group`` is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class BarrierCommunicator:
    """An NCCL communicator's suspend/resume, collective like NCCL's (see the module docstring)."""

    def __init__(
        self, name: str, store: Any, rank: int, world: int, before_barrier: Callable[[str], None] | None = None
    ) -> None:
        self.name, self._store, self._rank, self._world = name, store, rank, world
        self.before_barrier = before_barrier
        self.suspended = False
        self.calls: list[str] = []  #: "suspend"/"resume", in call order, including refused calls
        self._issued = 0

    def suspend(self) -> None:
        self.calls.append("suspend")
        if self.suspended:
            raise RuntimeError(f"ncclCommSuspend: communicator {self.name} is already suspended")
        self._collective("suspend")
        self.suspended = True

    def resume(self) -> None:
        self.calls.append("resume")
        if not self.suspended:
            raise RuntimeError(f"ncclCommResume: communicator {self.name} is not suspended")
        self._collective("resume")
        self.suspended = False

    def arrived(self, call_number: int) -> int:
        """How many ranks have reached the barrier of this communicator's ``call_number``-th call."""
        return self._store.add(self._key(call_number), 0)

    def _key(self, call_number: int) -> str:
        return f"nccl-double/{self.name}/{call_number}"

    def _collective(self, kind: str) -> None:
        if self.before_barrier is not None:
            self.before_barrier(kind)
        key = self._key(self._issued)
        self._issued += 1
        self._store.set(f"{key}/rank{self._rank}", kind)
        self._store.add(key, 1)
        while self._store.add(key, 0) < self._world:  # no deadline: ncclCommSuspend/Resume have none
            time.sleep(0.005)
        kinds = {self._store.get(f"{key}/rank{r}").decode() for r in range(self._world)}
        if kinds != {kind}:
            raise RuntimeError(f"{self.name}: mismatched collectives paired at one barrier: {sorted(kinds)}")


class NcclWorld:
    """What :func:`pretend_world_is_nccl` installed: the groups the code under test created."""

    def __init__(self) -> None:
        self.new_groups: list[tuple] = []  #: (backend argument, group) per new_group call


def pretend_world_is_nccl(dist: Any) -> NcclWorld:
    """Make the default group (whichever is the default now, also after a re-init) look like NCCL."""
    real_get_backend, real_all_gather, real_new_group = dist.get_backend, dist.all_gather, dist.new_group
    world = NcclWorld()

    def is_world(group: Any) -> bool:
        return group is None or group is dist.group.WORLD

    def get_backend(group: Any = None) -> str:
        return "nccl" if is_world(group) else real_get_backend(group)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if is_world(group) and tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")  # ProcessGroupNCCL's words
        return real_all_gather(tensor_list, tensor, group=group, async_op=async_op)

    def new_group(*args, **kwargs):
        group = real_new_group(*args, **kwargs)
        world.new_groups.append((kwargs.get("backend"), group))
        return group

    dist.get_backend, dist.all_gather, dist.new_group = get_backend, all_gather, new_group
    return world
