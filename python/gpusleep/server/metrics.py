"""Prometheus metrics of the sleep mode, in their own registry (one per installed app).

Exported (``gpusleep_`` prefix):

* ``sleeping`` (1 while asleep), ``sleep_level`` (the depth the model sleeps at: 2 after a level-2
  sleep even when a level-1 sleep was asked next; 0 while awake), ``in_flight_requests`` (protected
  requests whose body has arrived and whose response is not sent yet);
* ``last_sleep_duration_seconds``, ``last_wake_duration_seconds``, ``last_drain_duration_seconds``;
* ``last_sleep_offloaded_bytes``, ``last_sleep_freed_bytes``, ``last_sleep_freed_measured_bytes`` (the rise
  of the device's free memory that the sleep measured), ``last_wake_restored_bytes`` and the
  counters ``offloaded_bytes_total``, ``freed_bytes_total``, ``sleeps_total``, ``wakes_total``,
  ``transition_failures_total{action}``, ``rejected_requests_total`` (the 503 answers),
  ``unavailable_transitions_total{action}`` (calls answered 501 because this server has no sleep mode: a model
  on the CPU; they are not failed transitions, nothing was tried);
* idle sleep and wake on request: ``idle_sleeps_total``, ``wakes_on_request_total`` and the histogram
  ``wake_on_request_first_byte_seconds`` (arrival of a request that found the model asleep to the
  first byte of its response: time to first token after an idle sleep);
* with a controller that has ``stats()`` (a :class:`gpusleep.Allocator`): per tag
  ``tag_mapped_bytes``, ``tag_asleep_bytes``, ``tag_backed_up_bytes``, and ``host_pinned_bytes``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..errors import DriverUnavailableError, WakeVerificationError


class GateView(Protocol):
    """What the metrics read from the gate (server/gate.py's SleepGate). A protocol, so that this module does
    not import gate.py, which imports this one: no import circle."""

    @property
    def in_flight(self) -> int: ...
    @property
    def is_sleeping(self) -> bool: ...
    @property
    def sleep_level(self) -> int: ...
    @property
    def transition(self) -> Any: ...


__all__ = ["SleepMetrics"]

log = logging.getLogger("gpusleep.server")


class SleepMetrics:
    """The sleep-mode metrics. ``registry`` holds them; serve it with ``prometheus_client``.

    Thread safety: the ``record_*`` methods and scrapes may run on any thread (prometheus_client
    metrics are thread-safe)."""

    def __init__(self, stats: Callable[[], Any] | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._gate: GateView | None = None
        self.sleeping = Gauge("gpusleep_sleeping", "1 while the model is asleep, else 0", registry=r)
        self.sleep_level = Gauge(
            "gpusleep_sleep_level", "Level of the current sleep (1 or 2); 0 while awake", registry=r
        )
        self.in_flight = Gauge("gpusleep_in_flight_requests", "Protected requests running now", registry=r)
        self.in_flight.set_function(lambda: self._gate.in_flight if self._gate is not None else 0)
        self.sleeping.set_function(lambda: 1 if self._gate is not None and self._gate.is_sleeping else 0)
        self.sleep_level.set_function(lambda: self._gate.sleep_level if self._gate is not None else 0)
        self.last_sleep_seconds = Gauge(
            "gpusleep_last_sleep_duration_seconds", "Duration of the last sleep call (controller.sleep)", registry=r
        )
        self.last_wake_seconds = Gauge(
            "gpusleep_last_wake_duration_seconds", "Duration of the last wake_up call (controller.wake_up)", registry=r
        )
        self.last_drain_seconds = Gauge(
            "gpusleep_last_drain_duration_seconds",
            "Time the last sleep waited for the requests in flight to finish",
            registry=r,
        )
        self.last_offloaded = Gauge(
            "gpusleep_last_sleep_offloaded_bytes", "Bytes copied to host memory by the last sleep", registry=r
        )
        self.last_freed = Gauge("gpusleep_last_sleep_freed_bytes", "GPU memory released by the last sleep", registry=r)
        self.last_freed_measured = Gauge(
            "gpusleep_last_sleep_freed_measured_bytes",
            "How much the devices' free memory rose over the last sleep (cuMemGetInfo)",
            registry=r,
        )
        self.last_restored = Gauge(
            "gpusleep_last_wake_restored_bytes", "Bytes copied back to the GPU by the last wake_up", registry=r
        )
        self.last_reused = Gauge(
            "gpusleep_last_sleep_reused_bytes",
            "Bytes the last sleep did not copy: their kept host copy held them",
            registry=r,
        )
        self.last_pieces_changed = Gauge(
            "gpusleep_last_sleep_changed_pieces",
            "4 MiB pieces of kept host copies the last sleep found changed by their hash, and copied",
            registry=r,
        )
        self.last_verified = Gauge(
            "gpusleep_last_wake_verified_bytes",
            "Restored bytes the last wake_up proved equal to their host copy before completing",
            registry=r,
        )
        self.verification_failures_total = Counter(
            "gpusleep_wake_verification_failures",
            "Wakes rolled back because restored bytes differed from their host copy",
            registry=r,
        )
        self.offloaded_total = Counter("gpusleep_offloaded_bytes", "Bytes copied to host memory by sleeps", registry=r)
        self.freed_total = Counter("gpusleep_freed_bytes", "GPU memory released by sleeps", registry=r)
        self.sleeps_total = Counter("gpusleep_sleeps", "Successful sleep calls", registry=r)
        self.wakes_total = Counter("gpusleep_wakes", "Successful wake_up calls", registry=r)
        self.failures_total = Counter(
            "gpusleep_transition_failures", "Failed sleep or wake_up calls", ["action"], registry=r
        )
        self.unavailable_total = Counter(
            "gpusleep_unavailable_transitions",
            "Sleep or wake_up calls answered 501: this server has no sleep mode (not counted as failures)",
            ["action"],
            registry=r,
        )
        self.rejected_total = Counter(
            "gpusleep_rejected_requests", "Protected requests answered 503 ModelSleepingError", registry=r
        )
        self.idle_sleeps_total = Counter("gpusleep_idle_sleeps", "Sleeps started by idle sleep", registry=r)
        self.wakes_on_request_total = Counter(
            "gpusleep_wakes_on_request", "Wake-ups started by a request that found the model asleep", registry=r
        )
        self.wake_on_request_first_byte = Histogram(
            "gpusleep_wake_on_request_first_byte_seconds",
            "From the arrival of a request that found the model asleep to the first byte of its response",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
            registry=r,
        )
        if stats is not None:
            r.register(_AllocatorStatsCollector(stats, self))

    def bind_gate(self, gate: GateView) -> None:
        self._gate = gate

    @property
    def transition_running(self) -> bool:
        return self._gate is not None and self._gate.transition is not None

    def record_sleep(self, level: int, seconds: float, drain_seconds: float, report: Any) -> None:
        self.sleeps_total.inc()
        self.last_sleep_seconds.set(seconds)
        self.last_drain_seconds.set(drain_seconds)
        offloaded = int(getattr(report, "bytes_offloaded", 0) or 0)
        freed = int(getattr(report, "bytes_freed", 0) or 0)
        self.last_offloaded.set(offloaded)
        self.last_freed.set(freed)
        self.last_freed_measured.set(int(getattr(report, "bytes_freed_measured", 0) or 0))
        self.last_reused.set(int(getattr(report, "bytes_reused", 0) or 0))
        self.last_pieces_changed.set(int(getattr(report, "pieces_changed", 0) or 0))
        self.offloaded_total.inc(offloaded)
        self.freed_total.inc(freed)

    def record_wake(self, seconds: float, report: Any) -> None:
        self.wakes_total.inc()
        self.last_wake_seconds.set(seconds)
        self.last_restored.set(int(getattr(report, "bytes_restored", 0) or 0))
        self.last_verified.set(int(getattr(report, "bytes_verified", 0) or 0))

    def record_failure(self, action: str, error: BaseException | None = None) -> None:
        """Count a failed ``action`` ("sleep" or "wake_up"). ``error``: what it raised; by default the exception
        being handled (the gate calls this from its ``except`` blocks). A refusal because sleep mode is not
        available here (:class:`gpusleep.DriverUnavailableError`, answered 501) is no failed transition:
        nothing was tried, and an alert on failures must not fire for every call to a CPU server; it counts
        in ``unavailable_transitions_total`` instead."""
        if error is None:
            error = sys.exc_info()[1]
        if isinstance(error, DriverUnavailableError):
            self.unavailable_total.labels(action=action).inc()
            return
        if isinstance(error, WakeVerificationError):
            self.verification_failures_total.inc()
        self.failures_total.labels(action=action).inc()

    def record_rejected(self) -> None:
        self.rejected_total.inc()

    def record_idle_sleep(self) -> None:
        self.idle_sleeps_total.inc()

    def record_wake_on_request(self) -> None:
        self.wakes_on_request_total.inc()

    def record_wake_on_request_first_byte(self, seconds: float) -> None:
        self.wake_on_request_first_byte.observe(seconds)


class _AllocatorStatsCollector(Collector):
    """Per-tag memory figures from ``controller.stats()`` at scrape time (skipped during a transition,
    which holds the allocator's lock, so that a scrape never waits for a sleep or a wake-up)."""

    def __init__(self, stats: Callable[[], Any], metrics: SleepMetrics) -> None:
        self._stats = stats
        self._metrics = metrics

    def describe(self) -> list:
        return []  # collected lazily: never call stats() at registration time

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._metrics.transition_running:
            return
        try:
            stats = self._stats()
        except Exception:
            log.exception("controller.stats() failed; per-tag metrics left out of this scrape")
            return
        mapped = GaugeMetricFamily("gpusleep_tag_mapped_bytes", "GPU memory mapped now, per tag", labels=["tag"])
        asleep = GaugeMetricFamily("gpusleep_tag_asleep_bytes", "GPU memory released by sleep, per tag", labels=["tag"])
        backed = GaugeMetricFamily(
            "gpusleep_tag_backed_up_bytes", "Bytes held in pinned host memory, per tag", labels=["tag"]
        )
        for name, tag in sorted(getattr(stats, "tags", {}).items()):
            mapped.add_metric([name], tag.bytes_mapped)
            asleep.add_metric([name], tag.bytes_asleep)
            backed.add_metric([name], tag.bytes_backed_up)
        tiered = GaugeMetricFamily(
            "gpusleep_tag_host_tier_bytes",
            "Host copies per tag and host tier (docs/host-tiers.md)",
            labels=["tag", "tier"],
        )
        for name, tag in sorted(getattr(stats, "tags", {}).items()):
            for tier in ("pinned", "pageable", "file"):
                tiered.add_metric([name, tier], getattr(tag, "bytes_" + tier, 0))
        yield mapped
        yield asleep
        yield backed
        yield tiered
        host = getattr(stats, "host", None)
        if host is not None:
            yield GaugeMetricFamily(
                "gpusleep_host_pinned_bytes", "Pinned host memory held for backups", value=host.bytes_pinned
            )
            tiers = GaugeMetricFamily(
                "gpusleep_host_tier_bytes",
                "Host memory (or disk) holding host copies, per tier; staging: the "
                "pinned staging rings of the pageable and file tiers",
                labels=["tier"],
            )
            tiers.add_metric(["pinned"], host.bytes_in_use)
            tiers.add_metric(["pageable"], getattr(host, "bytes_pageable", 0))
            tiers.add_metric(["file"], getattr(host, "bytes_file", 0))
            tiers.add_metric(["staging"], getattr(host, "bytes_staging", 0))
            yield tiers
