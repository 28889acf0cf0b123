"""A sleep reports the GPU memory it measured free afterwards, not only what it meant to release (issue 20, part
4; review 2026-12-06 finding 11): memory that something else still holds (an NCCL user-buffer registration, a
dma-buf export, cuMemRetainAllocationHandle) is released by gpusleep yet stays allocated, and only a
measurement shows it."""

from __future__ import annotations

import logging

from helpers import MiB, assert_blobs_intact, pattern, write_blobs


def test_a_sleep_reports_the_free_memory_it_measured_on_every_device(alloc, fake):
    blobs = write_blobs(alloc, fake, [8 * MiB + 3, MiB], seed=1)
    alloc.allocate(4 * MiB, tag="kv_cache", device=1)
    used = fake.used_bytes(0) + fake.used_bytes(1)
    report = alloc.sleep(level=1)
    assert report.bytes_freed == used
    assert report.bytes_freed_measured == used, "the double's free memory rose by exactly what was released"
    assert alloc.stats().last_sleep.bytes_freed_measured == used
    assert "measured" in report.summary()
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)
    assert alloc.sleep(level=2).bytes_freed_measured == used


def test_a_sleep_that_frees_nothing_measures_nothing(alloc, fake):
    alloc.allocate(MiB, tag="weights")
    alloc.set_policy("weights", "keep")
    report = alloc.sleep(level=1)
    assert report.bytes_freed == 0 and report.bytes_freed_measured == 0


def test_memory_still_held_by_a_registration_is_measured_as_not_freed_and_a_warning_says_why(alloc, fake, caplog):
    weights = alloc.allocate(8 * MiB, tag="weights")
    fake.write(weights, pattern(8 * MiB, 2))
    with fake.retained_allocation(weights):  # the weights are registered with NCCL (or exported as dma-buf)
        with caplog.at_level(logging.WARNING, logger="gpusleep"):
            report = alloc.sleep(level=1)
        assert report.bytes_freed == fake.granularity_bytes * -(-8 * MiB // fake.granularity_bytes)
        assert report.bytes_freed_measured == 0, "the registration kept the memory allocated"
        warning = caplog.text
        assert "measured" in warning and "registration" in warning, warning
        assert fake.used_bytes(0) > 0
    assert fake.used_bytes(0) == 0, "dropping the registration freed the old memory"
    alloc.wake_up()
    assert fake.read(weights, 8 * MiB) == pattern(8 * MiB, 2)


def test_no_warning_when_the_measurement_matches(alloc, fake, caplog):
    alloc.allocate(8 * MiB, tag="weights")
    with caplog.at_level(logging.WARNING, logger="gpusleep"):
        alloc.sleep(level=1)
    assert "measured" not in caplog.text
