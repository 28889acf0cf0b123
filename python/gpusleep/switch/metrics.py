"""Prometheus metrics of ``gpusleep switch`` (``gpusleep_switch_`` prefix), in their own registry.

* ``switches_total{model}``: wake-ups of ``model`` for a request (each after putting others to sleep as
  needed); ``switch_duration_seconds``: histogram of their time, the sleeps of the others included;
* ``backend_call_seconds{model,action}`` (``action``: ``sleep`` or ``wake_up``): histogram of each
  successful call's round trip, so a slow switch shows which side was slow;
* ``sleeps_total{model,reason}`` (``reason``: ``make_room`` or ``idle``), ``failures_total{model,action}``;
* ``requests_total{model}``, ``awake_backends``, ``awake_gpu_memory_bytes`` (awake and starting backends),
  ``asleep_host_memory_bytes`` (level-1 sleepers);
* ``backend_state{model,state}``: 1 for each backend's state (``awake``, ``asleep_l1``, ``asleep_l2``,
  ``stopped``, ``starting``, ``unknown``), 0 for the others;
* ``demotions_total{model,to}`` (``to``: ``level2`` or ``stopped``: host memory ran short),
  ``starts_total{model,reason}`` (``request`` or ``restart``), ``crashes_total{model}`` (launched backends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Every state ``backend_state`` reports.
STATES = ("awake", "asleep_l1", "asleep_l2", "stopped", "starting", "unknown")

__all__ = ["SwitchMetrics"]


class SwitchMetrics:
    """Thread-safe (prometheus_client metrics are)."""

    def __init__(
        self,
        awake_backends: Callable[[], int],
        awake_gpu_memory_bytes: Callable[[], int],
        asleep_host_memory_bytes: Callable[[], int] = lambda: 0,
        phases: Callable[[], Iterable[tuple[str, str]]] = lambda: (),
    ) -> None:
        self.registry = r = CollectorRegistry()
        self.switches = Counter(
            "gpusleep_switch_switches", "Wake-ups of a backend for a request", ["model"], registry=r
        )
        self.switch_seconds = Histogram(
            "gpusleep_switch_duration_seconds",
            "Time of a switch: the sleeps of the backends that made room plus the wake-up of the wanted one",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0),
            registry=r,
        )
        self.backend_call_seconds = Histogram(
            "gpusleep_switch_backend_call_seconds",
            "Round trip of a successful POST /sleep or POST /wake_up to a backend",
            ["model", "action"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.sleeps = Counter("gpusleep_switch_sleeps", "Backends put to sleep", ["model", "reason"], registry=r)
        self.failures = Counter(
            "gpusleep_switch_failures", "Failed sleeps and wake-ups of a backend", ["model", "action"], registry=r
        )
        self.requests = Counter("gpusleep_switch_requests", "Requests forwarded to a backend", ["model"], registry=r)
        Gauge("gpusleep_switch_awake_backends", "Backends awake now", registry=r).set_function(awake_backends)
        Gauge(
            "gpusleep_switch_awake_gpu_memory_bytes",
            "GPU memory the awake backends hold (configured figures)",
            registry=r,
        ).set_function(awake_gpu_memory_bytes)
        Gauge(
            "gpusleep_switch_asleep_host_memory_bytes",
            "Host memory the level-1 sleepers hold (configured figures)",
            registry=r,
        ).set_function(asleep_host_memory_bytes)
        self.demotions = Counter(
            "gpusleep_switch_demotions",
            "Level-1 sleepers moved to level 2 or stopped for lack of host memory",
            ["model", "to"],
            registry=r,
        )
        self.starts = Counter("gpusleep_switch_starts", "Starts of launched backends", ["model", "reason"], registry=r)
        self.crashes = Counter(
            "gpusleep_switch_crashes", "Launched backends that exited unasked", ["model"], registry=r
        )
        r.register(_StateCollector(phases))


class _StateCollector(Collector):
    def __init__(self, phases: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self.phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gpusleep_switch_backend_state", "1 for the state each backend is in", labels=["model", "state"]
        )
        for model, phase in self.phases():
            for state in STATES:
                family.add_metric([model, state], 1.0 if phase == state else 0.0)
        yield family
