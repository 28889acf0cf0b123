"""Verified wakes on a real GPU (docs/verified-wakes.md): the PTX kernel against its host twin, damage refused,
changed pieces found; the cost is measured by benchmarks/bench_sleep_wake.py."""

from __future__ import annotations

import pytest
from gpu_workers import run_script

pytestmark = pytest.mark.gpu
PIECE = 4 << 20


def test_the_gpu_hash_kernel_proves_wakes_refuses_damage_and_finds_changed_pieces():
    f = run_script(["_verify_worker.py"])
    assert f["fallback_reason"] == "", "this driver JIT-compiles the PTX kernel"
    assert f["kernel_mismatched_sizes"] == [], "the kernel equals its host twin"
    both = 512 * (1 << 20) + 3 + PIECE + 11
    assert f["sleep_bytes_hashed"] == both
    assert f["wake_verified_by_hash"] == both and f["wake_verified_by_read_back"] == 0
    assert f["round_trip_exact"] and f["second_exact"]
    assert len(f["damage"]) == 3 and all(d["refused"] and d["named"] and d["asleep"] for d in f["damage"]), f["damage"]
    assert f["repaired_exact"]
    assert f["resleep_pieces_changed"] == 1 and f["resleep_bytes_offloaded"] == PIECE
    assert f["in_place_write_kept"]
