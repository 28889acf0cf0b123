"""benchmarks/bench_sleep_wake.py --fake, as its users run it: through the driver double it reports every
level-1 row bit-exact, at a size that does not split evenly into its tensors too (0.03 GiB: the last small
tensor is rounded down to whole 8-byte words, and the check once compared it with bytes no tensor held)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import load_benchmark

pytest.importorskip("numpy")

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_the_fake_run_reports_every_level_1_row_bit_exact_at_an_uneven_size(tmp_path, fakecuda_driver):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}  # the script builds its own
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_sleep_wake.py"),
            "--fake",
            "--sizes-gib",
            "0.03",
            "--levels",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"][0]["rows"]
    assert len(rows) == 2  # few-large and many-small
    assert [r["bit_exact"] for r in rows] == [True, True], rows
    # Issue 24 part 4: pinning GB/s along each path, measured in the same run.
    pinning = {p["path"]: p for p in json.loads(out.read_text())["results"][0]["pinning"]}
    assert set(pinning) == {"parallel pieces", "single registration", "cuMemHostAlloc"}, pinning
    assert all(p["num_bytes"] > 0 and p["seconds"] > 0 for p in pinning.values()), pinning
    assert pinning["cuMemHostAlloc"]["numa_node"] == -1, "that row is the unplaced path"
    assert "Pinning paths" in proc.stdout and "parallel pieces" in proc.stdout


def test_the_fake_run_draws_its_chart_beside_the_json_marked_simulated(tmp_path, fakecuda_driver):
    """Issue 22, part 6: a PNG of what was measured, beside the JSON, that says it was simulated."""
    pytest.importorskip("matplotlib")
    from PIL import Image  # matplotlib's own dependency

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_sleep_wake.py"),
            "--fake",
            "--sizes-gib",
            "0.03",
            "--levels",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = Image.open(png).info
    assert info["Description"] == "simulated" and "SIMULATED GPU" in info["Title"]
    assert "bench_sleep_wake" in info["Title"]


def test_a_chart_without_matplotlib_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    _common = load_benchmark("_common")

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    _common.write_json(tmp_path / "r.json", {"x": 1}, _common.Chart("t", "GB/s", [("a", 1.0)], simulated=True))
    assert (tmp_path / "r.json").exists() and not (tmp_path / "r.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_bench_switch_charts_each_systems_median_switch_beside_the_copy_floor(monkeypatch):
    _common = load_benchmark("_common")
    bench_switch = load_benchmark("bench_switch")

    row = bench_switch.Row(
        system="kept host copy",
        gib=8,
        switches=6,
        first_s=2.0,
        median_s=0.4,
        request_s=0.45,
        min_s=0.3,
        max_s=0.5,
        sleep_s=0.01,
        wake_s=0.39,
        copied_gib=8,
        reused_gib=8,
        vs_copy_floor=1.1,
        speedup_vs_cold_start=50.0,
        under_goal=True,
        answers_ok=True,
    )
    floor = _common.CopyBaseline("pinned", 8 << 30, 0.2, 0.17)
    chart = bench_switch.switch_chart([row], floor, {"card": "H100"})
    assert chart.bars == [("kept host copy", 0.4), ("copy floor (pinned, both ways)", 0.2 + 0.17)]
    assert chart.unit == "seconds" and "8 GiB" in chart.title and "H100" in chart.title and not chart.simulated
