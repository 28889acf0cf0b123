"""Fault sweep: every driver call of every sleep and wake scenario fails in turn, and the transaction promise
holds each time (DESIGN.md invariants 2 and 3, issue 9).

For each scenario (tests/campaign_model.py SCENARIOS) the step is first run without a fault to count its
driver calls per entry point and to see the state it leads to. Then, for each of those calls and for
CUDA_ERROR_OUT_OF_MEMORY and CUDA_ERROR_UNKNOWN, the scenario is built afresh and that one call fails.
Afterwards the allocator must be exactly in its previous state or in the complete new one (sleeping tags,
per-tag bytes, GPU memory the driver counts, pinned host memory holding backups), the bytes of awake tags
must read back unchanged at the same addresses, an error must carry its real code and measured values, and
once the fault is cleared a wake_up() must bring every tag back with its bytes and close() must leave no
GPU memory and no driver object. A close() that failed is retried once, as a user would.

All cases run and all failures are reported together, grouped by entry point, so one run says exactly
which positions break the promise. $GPUSLEEP_CAMPAIGN_SCALE enlarges the scenarios (more allocations,
hence more driver calls to fail) and runs each at both granularities.
"""

from __future__ import annotations

import collections

import pytest

from campaign_model import (
    CAPACITY_BYTES,
    DEVICES,
    SCENARIOS,
    CampaignFigures,
    campaign_scale,
    run_baseline,
    run_fault_case,
)
from conftest import GRANULARITIES

MAX_FAILURES_SHOWN = 40


def _sweeps():
    """At the CI scale each scenario runs at one of the two granularities, in turn (the sweep is the
    costliest campaign); from $GPUSLEEP_CAMPAIGN_SCALE=2 on, every scenario runs at both, and the
    scenarios kept out of CI run too."""
    both = campaign_scale() > 1
    for i, scenario in enumerate(s for s in SCENARIOS if s.in_ci or both):
        for granularity_bytes in GRANULARITIES if both else [GRANULARITIES[i % len(GRANULARITIES)]]:
            yield pytest.param(scenario, granularity_bytes, id=f"{scenario.name}-gran{granularity_bytes >> 20}MiB")


@pytest.mark.parametrize("scenario, granularity_bytes", list(_sweeps()))
def test_every_driver_call_of_the_step_can_fail_and_the_promise_holds(fakecuda_driver, scenario, granularity_bytes):
    fake = fakecuda_driver
    try:
        fake.configure(devices=len(DEVICES), capacity_bytes=CAPACITY_BYTES, granularity_bytes=granularity_bytes)
    except AssertionError:
        pass  # objects leaked by an earlier test, which failed for it; configure() has reset them
    scale = campaign_scale()
    baseline = run_baseline(fake, scenario, scale)
    points = baseline.fault_points()
    assert points, f"{scenario.name} makes no driver call: nothing to sweep"

    figures = CampaignFigures(f"fault_sweep/{scenario.name}/gran{granularity_bytes >> 20}MiB")
    failures: list[str] = []
    for point in points:
        outcome = run_fault_case(fake, scenario, baseline, point, scale)
        figures.add(outcome.figures)
        if outcome.failure is not None:
            failures.append(outcome.failure)
    figures.publish()

    assert figures.faults_injected == len(points), "every planned fault reached its driver call"
    if failures:
        by_entry_point = collections.Counter(f.split(": ", 1)[1].split(" call #")[0] for f in failures)
        shown = "\n".join(failures[:MAX_FAILURES_SHOWN])
        more = len(failures) - MAX_FAILURES_SHOWN
        pytest.fail(
            f"{scenario.name}: {len(failures)} of {len(points)} fault cases broke the promise "
            f"(by entry point: {dict(by_entry_point)}):\n{shown}" + (f"\n... and {more} more" if more > 0 else ""),
            pytrace=False,
        )
