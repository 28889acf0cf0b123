"""Host tiers (Note [Host tiers] in csrc/host_copy.h, docs/host-tiers.md): level-1 host copies in pinned memory,
pageable memory or files, under a pinned budget, through the staging ring (Note [Staging ring])."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import gpusleep
from gpusleep import _C
from helpers import MiB, assert_blobs_intact, pattern, write_blobs

ODD_SIZES = [3 * MiB + 5, MiB, 7, 5 * MiB + 4093]
TOTAL = sum(ODD_SIZES)


@pytest.fixture(autouse=True)
def _no_faults_left():
    yield
    _C._clear_host_tier_faults()


def make_alloc(fake, tmp_path, **options):
    options.setdefault("file_dir", str(tmp_path / "spill"))
    options.setdefault("staging_bytes", MiB)  # small slots: every odd size crosses several pieces
    return gpusleep.Allocator(**options)


@pytest.fixture(params=["full", "off"])
def tier_alloc(request, fake, tmp_path):
    allocator = make_alloc(fake, tmp_path, verify=request.param)
    yield allocator
    allocator.close()
    for device in (0, 1):
        assert fake.used_bytes(device) == 0, fake.live_objects()
    assert list((tmp_path / "spill").iterdir()) == [], "no host copy file is left"


def spill_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "spill").iterdir())


@pytest.mark.parametrize("tier", ["pinned", "pageable", "file"])
def test_each_tier_round_trips_odd_sizes_bit_exact(tier_alloc, fake, tmp_path, tier):
    alloc = tier_alloc
    alloc.set_policy("weights", "offload", host_tier=tier)
    blobs = write_blobs(alloc, fake, ODD_SIZES, seed=11)
    pageable_before = fake.pageable_copy_count()
    report = alloc.sleep(level=1)
    assert report.bytes_offloaded == TOTAL
    assert {"pinned": report.bytes_pinned_tier, "pageable": report.bytes_pageable_tier,
            "file": report.bytes_file_tier}[tier] == TOTAL
    assert report.placements == (("weights", tier, TOTAL),)
    host = alloc.stats().host
    assert (host.bytes_pageable, host.bytes_file) == ({"pageable": TOTAL}.get(tier, 0), {"file": TOTAL}.get(tier, 0))
    assert alloc.stats().tags["weights"].bytes_backed_up == TOTAL
    assert fake.used_bytes(0) == 0
    assert spill_files(tmp_path) == [], "file copies are unlinked as soon as they are open"
    for address, data in blobs.items():
        assert alloc.read_host_backup(address, len(data)) == data
    wake = alloc.wake_up()
    assert wake.bytes_restored == TOTAL
    if alloc.stats().verify == "full":
        assert wake.bytes_verified_by_hash + wake.bytes_verified_by_read_back == TOTAL
    assert_blobs_intact(fake, blobs)
    assert fake.pageable_copy_count() == pageable_before, "every device copy went through pinned memory"
    assert alloc.stats().host.bytes_pageable == 0 and alloc.stats().host.bytes_file == 0
    if tier != "pinned":
        assert alloc.stats().host.bytes_staging == 2 * MiB
    assert fake.violations() == []
