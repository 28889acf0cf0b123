"""What a collective sleep or wake did on the whole model: one record per rank, summed for the model."""

from __future__ import annotations

from dataclasses import dataclass

from ..stats import SleepReport, WakeReport, format_bytes

__all__ = ["ModelSleepReport", "ModelWakeReport"]


class _AcrossRanks:
    """What both model reports derive from ``ranks`` and ``per_rank`` (each rank's own report)."""

    ranks: tuple[int, ...]
    per_rank: tuple[SleepReport | WakeReport, ...]

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(sorted({t for r in self.per_rank for t in r.tags}))

    def _total(self, field_name: str) -> int:
        return sum(getattr(r, field_name) for r in self.per_rank)

    def _slowest(self) -> tuple[int, float]:
        pairs = tuple(zip(self.ranks, (r.seconds for r in self.per_rank), strict=False))
        return max(pairs, key=lambda rank_seconds: rank_seconds[1]) if pairs else (-1, 0.0)

    @property
    def slowest_rank(self) -> int:
        return self._slowest()[0]

    @property
    def slowest_rank_seconds(self) -> float:
        return self._slowest()[1]


@dataclass(frozen=True)
class ModelSleepReport(_AcrossRanks):
    """A collective sleep. Has the fields of :class:`gpusleep.SleepReport` (summed over ranks), so the
    HTTP control plane reports and exports it like a single allocator's."""

    level: int
    ranks: tuple[int, ...]  #: global ranks, in group order
    per_rank: tuple[SleepReport, ...]  #: each rank's own report, same order
    seconds: float  #: wall time of the collective call on this rank (prepare + commit + exchanges)
    prepare_seconds: float  #: of which the prepare phase (pinning host memory included)

    @property
    def bytes_offloaded(self) -> int:
        return self._total("bytes_offloaded")

    @property
    def bytes_reused(self) -> int:
        return self._total("bytes_reused")

    @property
    def bytes_discarded(self) -> int:
        return self._total("bytes_discarded")

    @property
    def bytes_freed(self) -> int:
        return self._total("bytes_freed")

    @property
    def bytes_release_pending(self) -> int:
        return self._total("bytes_release_pending")

    def summary(self) -> str:
        return (
            f"model sleep(level={self.level}) on {len(self.ranks)} ranks: offloaded "
            f"{format_bytes(self.bytes_offloaded)}, discarded {format_bytes(self.bytes_discarded)}, GPU memory "
            f"freed {format_bytes(self.bytes_freed)} in {self.seconds:.3f} s (prepare {self.prepare_seconds:.3f} s); "
            f"slowest rank {self.slowest_rank} ({self.slowest_rank_seconds:.3f} s)"
        )


@dataclass(frozen=True)
class ModelWakeReport(_AcrossRanks):
    """A collective wake. Has the fields of :class:`gpusleep.WakeReport` (summed over ranks)."""

    ranks: tuple[int, ...]
    per_rank: tuple[WakeReport, ...]
    seconds: float
    prepare_seconds: float

    @property
    def bytes_restored(self) -> int:
        return self._total("bytes_restored")

    @property
    def bytes_zeroed(self) -> int:
        return self._total("bytes_zeroed")

    @property
    def bytes_mapped(self) -> int:
        return self._total("bytes_mapped")

    def summary(self) -> str:
        return (
            f"model wake_up(tags={list(self.tags)}) on {len(self.ranks)} ranks: restored "
            f"{format_bytes(self.bytes_restored)}, zero-filled {format_bytes(self.bytes_zeroed)}, GPU memory mapped "
            f"{format_bytes(self.bytes_mapped)} in {self.seconds:.3f} s (prepare {self.prepare_seconds:.3f} s); "
            f"slowest rank {self.slowest_rank} ({self.slowest_rank_seconds:.3f} s)"
        )
