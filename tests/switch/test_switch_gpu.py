"""``gpusleep switch`` on a real GPU (marker ``gpu``): two ``gpusleep serve`` demo servers on one card behind
the switch, each with 256 MiB of extra weights (checked after every wake: a wake that loses a byte answers
500 and the switch 502). Seed 1 keeps its host copy (``--keep-host-copy``), seed 2 does not and pins its
host memory at start (``--reserve-host-memory``). Alternating
requests force a switch each time; every answer matches the one its model gave before any switch (same
seed), only one server holds its weights at a time, seed 1's re-sleeps copy nothing while seed 2's copy
everything, and each switch's time (sleep of one plus wake of the other) is printed. The figures for
8 GB models come from benchmarks/bench_switch.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn", reason="gpusleep serve and switch need gpusleep[serve]")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(150),
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

COMPLETION = {"prompt": "The GPU went to sleep and", "max_tokens": 16, "temperature": 0.8, "seed": 7}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env) -> tuple:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpusleep.cli", *args, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"gpusleep {args[0]} exited: {proc.stderr.read()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"gpusleep {args[0]} did not answer /health within 180 s"
        time.sleep(0.2)


def test_two_demo_servers_on_one_gpu_switch_and_answer_the_same(tmp_path):
    env = dict(os.environ)
    env.pop("GPUSLEEP_CUDA_DRIVER", None)  # the real driver, never the test double
    env.pop("GPUSLEEP_TOKEN", None)
    procs = []
    try:
        backends = {}
        for seed in (1, 2):
            kept = ["--keep-host-copy"] if seed == 1 else ["--reserve-host-memory"]
            proc, url = start(
                ["serve", "--device", "cuda", "--seed", str(seed), "--extra-weights-gib", "0.25", *kept], env
            )
            procs.append(proc)
            backends[seed] = url
        names = {seed: httpx.get(f"{url}/v1/models").json()["data"][0]["id"] for seed, url in backends.items()}
        expected = {}
        for seed, url in backends.items():
            answer = httpx.post(f"{url}/v1/completions", json={**COMPLETION, "model": names[seed]}, timeout=60)
            assert answer.status_code == 200, answer.text
            expected[seed] = answer.json()["choices"][0]["text"]
        config = tmp_path / "switch.toml"  # both demo servers serve the same name: the switch tells them apart
        config.write_text(
            "".join(
                f'[[backends]]\nmodel = "seed-{s}"\nurl = "{u}"\nserved_model = "{names[s]}"\n'
                for s, u in backends.items()
            )
        )
        proc, switch_url = start(["switch", "--config", str(config)], env)
        procs.append(proc)
        with httpx.Client(base_url=switch_url, timeout=120) as client:
            for i in range(10):
                seed = 1 + i % 2
                answer = client.post("/v1/completions", json={**COMPLETION, "model": f"seed-{seed}"})
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["text"] == expected[seed]
                awake = [s for s, u in backends.items() if not httpx.get(f"{u}/is_sleeping").json()["is_sleeping"]]
                assert awake == [seed]
            metrics = client.get("/metrics").text
            records = client.get("/switch/status").json()["recent_switches"]
        assert len(records) == 9  # the first request only put seed-2 to sleep: seed-1 was awake
        for record in records[1:]:  # from each server's second sleep on
            sleep = record["sleeps"][0]
            if sleep["model"] == "seed-1":
                assert sleep["bytes_copied"] == 0 and sleep["bytes_reused"] >= 256 << 20, sleep
            else:
                assert sleep["bytes_copied"] >= 256 << 20 and sleep["bytes_reused"] == 0, sleep
            assert record["wake"]["bytes_copied"] >= 256 << 20, record
        count = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("gpusleep_switch_duration_seconds_count")
        )
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("gpusleep_switch_duration_seconds_sum")
        )
        assert count >= 9
        print(
            f"\n{torch.cuda.get_device_name()}: {int(count)} switches of the demo model with 256 MiB of extra "
            f"weights, {total / count * 1e3:.1f} ms each on average; last: "
            + ", ".join(f"{r['wake']['model']} {r['seconds'] * 1e3:.1f} ms" for r in records[-2:])
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
