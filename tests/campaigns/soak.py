#!/usr/bin/env python3
"""Soak: thousands of sleep/wake/free/close cycles on the host-memory driver double, most with one random
driver call failing, each checked against the transaction promise (tests/campaign_model.py). Not part of
CI: it runs for minutes. Prints progress, then one summary line; exits 1 if any cycle broke the promise.

    .venv/bin/python tests/campaigns/soak.py                      # 10,000 cycles
    .venv/bin/python tests/campaigns/soak.py --cycles 500 --seed 7 --failures-file /tmp/soak-failures.txt

Each cycle picks a scenario (level-1 or level-2 sleep, deepening, wake, staged wake, global-mode sleep
with cached segments, free while asleep, close), a size (1 to 3 times the CI scenario), a granularity
(2 or 4 MiB) and, with --fault-probability, one of the driver calls the step makes and an error
(CUDA_ERROR_OUT_OF_MEMORY or CUDA_ERROR_UNKNOWN) to fail it with.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import random
import sys
import time

# A script inside tests/: the shared test modules (campaign_model, fakecuda, helpers) are one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

GRANULARITIES_BYTES = (2 << 20, 4 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10_000, help="cycles to run (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed replays the same cycles")
    parser.add_argument(
        "--fault-probability", type=float, default=0.9, help="share of cycles with a fault (default 0.9)"
    )
    parser.add_argument("--max-scale", type=int, default=3, help="largest scenario size, in CI scenarios (default 3)")
    parser.add_argument("--progress-every", type=int, default=500, help="print progress every N cycles (default 500)")
    parser.add_argument("--failures-file", type=pathlib.Path, help="write every failure there, one per line")
    args = parser.parse_args(argv)
    if args.cycles < 1 or not 0 <= args.fault_probability <= 1 or args.max_scale < 1:
        parser.error("need --cycles >= 1, 0 <= --fault-probability <= 1 and --max-scale >= 1")

    from fakecuda import harness

    driver_path = harness.build()
    os.environ["GPUSLEEP_CUDA_DRIVER"] = str(driver_path)
    fake = harness.FakeCuda(driver_path)

    import campaign_model as cm

    # The allocator logs a warning for every release the driver refuses; thousands of injected faults
    # would drown the progress lines. The failures that matter are counted below.
    logging.getLogger("gpusleep").setLevel(logging.ERROR)

    rng = random.Random(args.seed)
    totals = cm.CampaignFigures("soak")
    failures: list[str] = []
    baselines: dict[tuple[str, int, int], cm.Baseline] = {}
    start = time.monotonic()
    for cycle in range(1, args.cycles + 1):
        scenario = rng.choice(cm.SCENARIOS)
        scale = rng.randint(1, args.max_scale)
        granularity = rng.choice(GRANULARITIES_BYTES)
        seed = rng.randrange(1 << 32)
        if fake.granularity_bytes != granularity:
            fake.configure(devices=len(cm.DEVICES), capacity_bytes=cm.CAPACITY_BYTES, granularity_bytes=granularity)
        key = (scenario.name, scale, granularity)
        if key not in baselines:
            baselines[key] = cm.run_baseline(fake, scenario, scale, seed)
        baseline = baselines[key]
        fault = None
        if rng.random() < args.fault_probability:
            fault = rng.choice(baseline.fault_points())
        outcome = cm.run_fault_case(fake, scenario, baseline, fault, scale, seed)
        totals.add(outcome.figures)
        if outcome.failure is not None:
            failures.append(
                f"cycle {cycle} (scale {scale}, granularity {granularity >> 20} MiB, seed {seed}): {outcome.failure}"
            )
        if cycle % args.progress_every == 0 or cycle == args.cycles:
            elapsed = time.monotonic() - start
            print(
                f"cycle {cycle}/{args.cycles}: cases={totals.cases} faults_injected={totals.faults_injected} "
                f"bytes_checked={totals.bytes_checked} leaks={totals.leaks} failures={len(failures)} "
                f"({elapsed:.0f} s)",
                flush=True,
            )

    for line in failures[:20]:
        print("FAILED", line)
    if len(failures) > 20:
        print(f"... and {len(failures) - 20} more failures")
    if args.failures_file:
        args.failures_file.write_text("".join(line + "\n" for line in failures), encoding="utf-8")
    print(
        f"soak summary: cycles={args.cycles} cases={totals.cases} faults_injected={totals.faults_injected} "
        f"bytes_checked={totals.bytes_checked} leaks={totals.leaks} failures={len(failures)} "
        f"seconds={time.monotonic() - start:.0f} seed={args.seed}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
