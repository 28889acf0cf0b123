"""Sleep controllers of the demo server: the gpusleep allocator on CUDA, a clear refusal on the CPU."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import DriverUnavailableError
from .extra_weights import ExtraWeights

__all__ = ["AllocatorController", "CpuOnlyController"]

log = logging.getLogger("gpusleep.demo")


class CpuOnlyController:
    """The controller of a model served on the CPU: never asleep; ``sleep`` and ``wake_up`` raise
    :class:`gpusleep.DriverUnavailableError` (the control plane answers 501) because sleep mode
    releases GPU memory and there is none. Stateless and thread-safe."""

    def __init__(self, device: str) -> None:
        self.device = device

    @property
    def is_sleeping(self) -> bool:
        return False

    def _refuse(self, what: str) -> None:
        raise DriverUnavailableError(
            f"{what} is not available: sleep mode needs a CUDA device and this server runs its model on "
            f"{self.device!r}, which has no GPU memory to release. Start it with --device cuda on a "
            "machine with an NVIDIA GPU."
        )

    def check_sleep(self, level: int) -> None:
        """Refuses before the control plane stops admitting requests (the sleep could never happen)."""
        self._refuse(f"sleep(level={level})")

    def sleep(self, level: int) -> None:
        self._refuse(f"sleep(level={level})")

    def wake_up(self, tags: Sequence[str] | None) -> None:
        self._refuse("wake_up")


class AllocatorController:
    """A :class:`gpusleep.Allocator` plus what the demo model needs around it: after a level-2 sleep
    discarded the weights, waking the ``"weights"`` tag reloads them in place (``engine.reload_weights``,
    and ``extra_weights.fill``) and tells the allocator they changed (``mark_changed``, which a kept host
    copy needs). After a wake that restored the weights from host memory, ``extra_weights`` (when given:
    ``gpusleep serve --extra-weights-gib``) are checked, and a wake that brought back other bytes raises
    :class:`~gpusleep.demo.extra_weights.ExtraWeightsCorruptedError` (the control plane answers 500).

    Thread safety: calls are serialized by an internal lock (the control plane also serializes them)."""

    def __init__(self, allocator: Any, engine: Any, extra_weights: ExtraWeights | None = None) -> None:
        self.allocator = allocator
        self.engine = engine
        self.extra_weights = extra_weights
        self._weights_discarded = False
        self._lock = threading.Lock()

    @property
    def is_sleeping(self) -> bool:
        return self.allocator.is_sleeping

    @property
    def known_tags(self) -> frozenset[str]:
        return self.allocator.known_tags

    def stats(self) -> Any:
        return self.allocator.stats()

    def sleep(self, level: int) -> Any:
        import torch

        with self._lock:
            if self.engine.device.type == "cuda":  # the engine's last kernels are done before memory moves
                torch.cuda.synchronize(self.engine.device)
            report = self.allocator.sleep(level)
            if level == 2 and "weights" in self.allocator.sleeping_tags:
                self._weights_discarded = True
            return report

    def wake_up(self, tags: Sequence[str] | None) -> Any:
        with self._lock:
            weights_were_asleep = "weights" in self.allocator.sleeping_tags
            report = self.allocator.wake_up(tags)
            if "weights" in self.allocator.sleeping_tags:
                return report
            if self._weights_discarded:  # also retried by the next wake if the last reload failed
                log.info("weights were discarded by a level-2 sleep: reloading them in place")
                self.engine.reload_weights()
                if self.extra_weights is not None:
                    self.extra_weights.fill()
                self.allocator.mark_changed("weights")
                self._weights_discarded = False
            elif weights_were_asleep and self.extra_weights is not None:
                started = time.perf_counter()
                self.extra_weights.verify()
                log.info("extra weights checked after the wake in %.1f ms", (time.perf_counter() - started) * 1e3)
            return report
