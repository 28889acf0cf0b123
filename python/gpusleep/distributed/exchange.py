"""``exchange(obj)``: every rank's object, on every rank, or an error within a timeout.

The only collective the sleep protocol uses. It is ``all_gather_object`` with a deadline: two
``all_gather`` calls (payload sizes, then the padded payloads) started with ``async_op=True`` and
waited on with ``Work.wait(timeout)``, so a rank that died or hangs makes the others fail after
``timeout_seconds`` instead of blocking forever. The tensors are on the CPU: ``group`` is a gloo group
(:func:`~gpusleep.distributed.control_group.control_group` chose it; Note [Control traffic on gloo])."""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

from ..errors import GpusleepError

__all__ = ["CollectiveFailedError", "StepMismatch", "exchange"]


class CollectiveFailedError(RuntimeError, GpusleepError):
    """The all-gather did not complete: timeout, a peer closed its connection, or a mismatched step."""


CollectiveFailed = CollectiveFailedError  # the name before every exception ended in Error


class StepMismatch(CollectiveFailedError):
    """The all-gather completed, but the ranks were at different steps (different operations)."""


def exchange(obj: Any, *, step: str, group: Any | None, timeout_seconds: float) -> list[Any]:
    """All ranks' ``obj`` in group-rank order. ``step`` names the protocol step; every rank must be at
    the same step, or :class:`CollectiveFailedError` says which step each rank was at."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    device = torch.device("cpu")
    payload = pickle.dumps((step, obj))
    timeout = timedelta(seconds=timeout_seconds)
    try:
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, size, group=group, async_op=True).wait(timeout)
        max_size = max(int(s.item()) for s in sizes)
        mine = torch.zeros(max_size, dtype=torch.uint8, device=device)
        mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        gathered = [torch.zeros(max_size, dtype=torch.uint8, device=device) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group, async_op=True).wait(timeout)
    except RuntimeError as error:  # gloo: "Operation timed out!", "Connection closed by peer", ...
        raise CollectiveFailedError(
            f"step {step!r}: not every one of the {world} ranks answered within {timeout_seconds:g} s "
            f"({str(error).splitlines()[0][:200]})"
        ) from error
    results = []
    for rank, (tensor, sz) in enumerate(zip(gathered, sizes, strict=False)):
        their_step, their_obj = pickle.loads(bytes(tensor[: int(sz.item())].cpu().tolist()))
        if their_step != step:
            raise StepMismatch(
                f"step {step!r}: group rank {rank} was at step {their_step!r}; the ranks are out of step "
                "(a rank timed out earlier and came back late?)"
            )
        results.append(their_obj)
    return results
