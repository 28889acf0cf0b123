"""Start a GPU-suite script in a fresh process, without the driver double, and read back its facts.

Each worker prints one line ``GPUSLEEP_RESULT {json}``; anything else on stdout/stderr is shown when the
run fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "GPUSLEEP_RESULT "
WORKER_TIMEOUT_S = 600


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    return env


def parse_result(stdout: str) -> dict | None:
    """The facts of the last result line in a worker's stdout, or None if it printed none."""
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None


def run_script(args: list[str], timeout_s: int = WORKER_TIMEOUT_S) -> dict:
    """Run ``python ARGS`` from tests/gpu and return the JSON fact line it printed."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=HERE, env=worker_env(), capture_output=True, text=True, timeout=timeout_s
    )
    facts = parse_result(proc.stdout)
    assert facts is not None, (
        f"{args} printed no result (exit {proc.returncode})\nstdout:\n"
        f"{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    )
    assert "error" not in facts and proc.returncode == 0, f"{args} failed:\n{facts.get('error')}\n{proc.stderr[-8000:]}"
    return facts


def emit_result(facts: dict) -> None:
    """Print the fact line that run_script() reads (called by the worker scripts)."""
    print(RESULT_PREFIX + json.dumps(facts), flush=True)
