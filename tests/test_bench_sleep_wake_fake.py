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

pytest.importorskip("numpy")

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_fake_run_reports_every_level_1_row_bit_exact_at_an_uneven_size(tmp_path, fakecuda_driver):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}  # the script builds its own
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_sleep_wake.py"), "--fake",
                           "--sizes-gib", "0.03", "--levels", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"][0]["rows"]
    assert len(rows) == 2  # few-large and many-small
    assert [r["bit_exact"] for r in rows] == [True, True], rows
