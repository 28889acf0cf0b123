"""The pinned host memory a collective level-1 sleep needs, summed per node, against what the node allows.

Note [Host memory per node]
---------------------------
Pinned pages cannot be reclaimed: pinning more than the host (MemAvailable) or the container (its cgroup
limit) allows brings the kernel's OOM killer, inside ``cuMemHostRegister``, with no error to catch. A
single allocator checks before it pins (``check_host_memory_for_pinning`` in csrc/host_memory_budget.cpp).
But the ranks of one node, often in one container, read the same MemAvailable at the same moment: each
would approve its own share, and their sum could exceed it.

So before any rank pins, each rank sends in the prepare exchange a :class:`HostClaim`: its node (hostname
and kernel boot id), the new host bytes its level-1 sleep must pin (the core's own count, which leaves out
segments whose host copy is kept and pinned memory the arena already holds), and the budget it reads (the
core's own reading: MemAvailable and the cgroup limit). Every rank then sums the claims of each node and
asks the core's rule (``HostMemoryBudget.fits``: the sum plus a headroom within the tightest reading of
that node's ranks). If a node's sum does not fit, every rank raises the same
:class:`ModelHostOutOfMemoryError` naming that node's ranks, and nothing was pinned anywhere. Only then do
the ranks pin (``reserve_host_memory()``), each still checking its own share as it pins.

Limitations: ranks of one host in containers with different hostnames count as different nodes (their
cgroup limits still hold for each, but their common MemAvailable is not summed); ranks in different cgroups
on one node are summed against the tightest of their limits, which may refuse a sleep each cgroup alone
could hold. Host memory taken by anything else between the exchange and the pinning is caught only by
each rank's own check.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..stats import format_bytes
from .errors import RankFailure

__all__ = ["HostClaim", "host_claim", "node_identity", "node_shortfalls"]

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class HostClaim:
    """One rank's share of its node's host memory for a level-1 sleep, and what it reads the node allows."""

    node: str  #: hostname and boot id (node_identity())
    bytes_to_pin: int  #: new pinned host memory this rank's level-1 sleep needs
    host_available_bytes: int | None  #: MemAvailable as this rank read it; None when unreadable
    cgroup_available_bytes: int | None  #: this rank's cgroup limit less its usage; None without a limit


def node_identity() -> str:
    """The machine this process runs on: hostname plus the kernel's boot id (unique per boot)."""
    try:
        with open(_BOOT_ID) as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}" if boot_id else socket.gethostname()


def host_claim(alloc: Any) -> HostClaim | None:
    """This rank's claim, or None when ``alloc`` cannot tell what a level-1 sleep would pin."""
    from .. import _C

    to_pin = getattr(alloc, "host_bytes_to_pin_for_level1", None)
    if to_pin is None:
        return None
    budget = _C.read_host_memory_budget()
    return HostClaim(node_identity(), int(to_pin()), budget.host_available_bytes, budget.cgroup_available_bytes)


def _tightest(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def node_shortfalls(claims: Sequence[HostClaim | None], ranks: tuple[int, ...]) -> list[RankFailure]:
    """One :class:`RankFailure` for every rank of every node whose ranks together need more than the node
    allows (``claims`` and ``ranks`` in group order; ranks without a claim are left out)."""
    from .. import _C

    by_node: dict[str, list[tuple[int, HostClaim]]] = {}
    for rank, claim in zip(ranks, claims, strict=False):
        if claim is not None:
            by_node.setdefault(claim.node, []).append((rank, claim))
    failures: list[RankFailure] = []
    for node, members in by_node.items():
        needed = sum(claim.bytes_to_pin for _, claim in members)
        budget = _C.HostMemoryBudget(
            _tightest([c.host_available_bytes for _, c in members]),
            _tightest([c.cgroup_available_bytes for _, c in members]),
        )
        if budget.fits(needed):
            continue
        available = budget.available_bytes
        node_ranks = [rank for rank, _ in members]
        limit = (
            "its cgroup (memory.max - memory.current)" if budget.limited_by == "cgroup" else "the host (MemAvailable)"
        )
        for rank, claim in members:
            failures.append(
                RankFailure(
                    rank,
                    "prepare",
                    "HostOutOfMemoryError",
                    f"the {len(members)} ranks {node_ranks} on node {node} together need {format_bytes(needed)} of new "
                    f"pinned host memory for a level-1 sleep (this rank {format_bytes(claim.bytes_to_pin)}), more "
                    f"than {limit} allows: {format_bytes(available)}, of which gpusleep keeps "
                    f"{format_bytes(budget.headroom_bytes)} free. Nothing was pinned",
                    needed,
                    available,
                )
            )
    return failures
