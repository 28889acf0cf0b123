"""``gpusleep switch`` as a user runs it (issue 13): the ``gpusleep switch`` command in its own process,
in front of backend processes that each serve a model whose weights live in a ``gpusleep.Allocator`` on
the driver double, with ``gpusleep.server`` installed over it. Every answer reports whether the
backend's weights read back bit-exact, so a switch that loses a byte fails here."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _server_testkit import wait_until
from helpers import load_benchmark

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = pathlib.Path(__file__).resolve().parents[1]
bench_switch = load_benchmark("bench_switch")  # its switch driving runs here against the driver double

# A backend process: one allocator on the double, 3 MiB of patterned weights and 2 MiB of KV cache. Its
# answer's text is the prompt reversed while the weights read back bit-exact, "weights lost" otherwise.
BACKEND = r"""
import os, sys, uvicorn
from fastapi import FastAPI
sys.path.insert(0, sys.argv[2])
from fakecuda import harness
from helpers import MiB, write_blobs
import gpusleep, gpusleep.server

model, idle, keep_host_copy = sys.argv[1], sys.argv[3], sys.argv[4] == "keep"
port = int(sys.argv[sys.argv.index("--port") + 1])
fake = harness.FakeCuda(os.environ["GPUSLEEP_CUDA_DRIVER"])
fake.configure(devices=1, capacity_bytes=64 * MiB, granularity_bytes=2 * MiB, seed=len(model))
alloc = gpusleep.Allocator()
alloc.set_policy("weights", "offload", keep_host_copy=keep_host_copy)
alloc.set_policy("kv_cache", "discard")
blobs = write_blobs(alloc, fake, [3 * MiB, 4096], seed=sum(map(ord, model)), tag="weights")
alloc.allocate(2 * MiB, tag="kv_cache")
app = FastAPI()

@app.get("/health")
def health() -> dict:
    return {"status": "ok"}

@app.get("/v1/models")
def models() -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model"}]}

@app.post("/v1/completions")
def completions(body: dict) -> dict:
    intact = all(fake.read(a, len(d)) == d for a, d in blobs.items())
    text = body["prompt"][::-1] if intact else "weights lost"
    return {"model": model, "text": text, "weights_intact": intact, "choices": [{"index": 0, "text": text}],
            "gpu_bytes_used": fake.used_bytes(0)}

options = gpusleep.server.SleepModeOptions(idle_sleep_s=float(idle), wake_on_request=True) if idle else None
gpusleep.server.install(app, alloc, options)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen) -> None:
    def up() -> bool:
        assert proc.poll() is None, f"{url}: the process exited: {proc.communicate()[1][-2000:]}"
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(up, f"{url} to answer", timeout_s=30)


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def backend_command(model: str, idle_sleep_s: str = "", keep_host_copy: bool = False) -> list[str]:
    """The command of a backend process; ``--port P`` goes after it."""
    return [sys.executable, "-c", BACKEND, model, str(TESTS_DIR), idle_sleep_s, "keep" if keep_host_copy else "copy"]


def start_backend(model: str, idle_sleep_s: str = "", keep_host_copy: bool = False) -> tuple:
    port = free_port()
    proc = subprocess.Popen(
        [*backend_command(model, idle_sleep_s, keep_host_copy), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def switch_in_front(
    tmp_path: pathlib.Path, models: list[str], extra_config: str = "", keep_host_copy: Sequence[str] = ()
) -> Iterator[httpx.Client]:
    """The ``gpusleep switch`` command in front of a backend per model (those in ``keep_host_copy`` keep
    their weights' host copy); yields a client of the switch."""
    with processes() as started:
        lines = [extra_config]
        backends = [start_backend(model, keep_host_copy=model in keep_host_copy) for model in models]  # in parallel
        started += [proc for proc, _ in backends]
        for model, (proc, url) in zip(models, backends, strict=False):
            wait_for_http(f"{url}/is_sleeping", proc)
            lines += ["[[backends]]", f'model = "{model}"', f'url = "{url}"', "gpu_memory_bytes = 8_000_000_000"]
        config = tmp_path / "switch.toml"
        config.write_text("\n".join(lines) + "\n")
        port = free_port()
        switch = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpusleep.cli",
                "switch",
                "--config",
                str(config),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(switch)
        wait_for_http(f"http://127.0.0.1:{port}/health", switch)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client


def sleeping(client: httpx.Client) -> dict:
    return {s["model"]: s["awake"] is False for s in client.get("/switch/status").json()["backends"]}


def test_switching_between_allocator_backends_keeps_every_weight_and_one_model_awake(fakecuda_driver, tmp_path):
    models = ["alpha", "beta", "gamma"]
    with switch_in_front(tmp_path, models) as client:
        jobs = [(models[i % 3] if i < 12 else models[(i * 7) % 3], f"p{i}") for i in range(30)]

        def ask(job):
            model, prompt = job
            answer = client.post("/v1/completions", json={"model": model, "prompt": prompt})
            assert answer.status_code == 200, answer.text
            return answer.json()

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, jobs))
        for (model, prompt), answer in zip(jobs, answers, strict=False):
            assert (answer["model"], answer["text"], answer["weights_intact"]) == (model, prompt[::-1], True)
        awake = [m for m, asleep in sleeping(client).items() if not asleep]
        assert len(awake) == 1
        switches = sum(
            float(line.rsplit(" ", 1)[1])
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("gpusleep_switch_switches_total{")
        )
        assert switches >= 3


def test_kept_host_copies_make_re_sleeps_copy_nothing_and_the_switch_benchmark_reads_it(fakecuda_driver, tmp_path):
    """alpha keeps its host copy, beta does not: after its first sleep, every sleep of alpha reuses the kept
    copy (no device-to-host copy), every sleep of beta copies; every wake restores, and no byte is lost.
    The switch's records are read by benchmarks/bench_switch.py, whose driving and summary run here."""
    with switch_in_front(tmp_path, ["alpha", "beta"], keep_host_copy=["alpha"]) as client:
        result = bench_switch.SystemResult("mixed", weights_gib=0.0)
        bench_switch.drive_switches(str(client.base_url), ["alpha", "beta"], 7, result)
    records, answers_ok = result.records, result.answers_ok
    assert answers_ok  # the backends answer "weights lost" when a byte did not come back
    assert [r["model"] for r in records] == ["beta", "alpha"] * 3 + ["beta"]
    sleeps = [
        (r["sleeps"][0]["model"], r["sleeps"][0]["bytes_copied"], r["sleeps"][0]["bytes_reused"]) for r in records
    ]
    first_alpha_copy = sleeps[0][1]
    assert sleeps[0] == ("alpha", first_alpha_copy, 0) and first_alpha_copy > 0  # nothing kept yet
    for model, copied, reused in sleeps[1:]:
        assert (copied, reused) == ((0, first_alpha_copy) if model == "alpha" else (first_alpha_copy, 0))
    assert all(r["wake"]["bytes_copied"] == first_alpha_copy for r in records)
    for r in records:
        assert r["seconds"] >= r["sleeps"][0]["seconds"] + r["wake"]["seconds"] > 0

    row = bench_switch.summarize(result, floor=None, cold=None)
    assert row.switches == 7 and row.answers_ok and row.min_s <= row.median_s <= row.max_s
    assert len(result.request_seconds) == 7 and row.request_s >= row.min_s  # the client waits for the switch
    gib = first_alpha_copy / bench_switch.GiB
    assert row.reused_gib == pytest.approx(gib * 3 / 6)  # 3 of the 6 steady sleeps were alpha's
    assert row.copied_gib == pytest.approx(gib * (3 + 6) / 6)  # beta's 3 sleeps and 6 wakes copied


def test_the_switch_benchmark_runs_end_to_end_with_backends_on_the_driver_double(
    fakecuda_driver, tmp_path, monkeypatch, capsys
):
    """benchmarks/bench_switch.py as the GPU check runs it, with its demo servers replaced by backend processes
    on the double (the GPU-only parts, the card's facts and the copy floor, by figures): it starts the servers
    and the switches, drives them and reports both systems, kept host copies showing as reused bytes."""
    monkeypatch.setattr(bench_switch, "cuda_available", lambda: True)
    monkeypatch.setattr(bench_switch, "gpu_facts", lambda: ("driver double", 1 << 40))
    monkeypatch.setattr(
        bench_switch, "measure_copy_floor", lambda n: bench_switch.CopyBaseline("pinned copy_", n, 0.5, 0.5)
    )
    driver = f"GPUSLEEP_CUDA_DRIVER={os.environ['GPUSLEEP_CUDA_DRIVER']}"  # the benchmark's launch drops it
    monkeypatch.setattr(
        bench_switch,
        "serve_command",
        lambda gib, system, seed, reserve_host_memory=True: [
            "env",
            driver,
            *backend_command(f"{system}-{seed}", keep_host_copy=system == "kept host copy"),
        ],
    )
    out, logs = tmp_path / "bench_switch.json", tmp_path / "logs"
    assert (
        bench_switch.main(["--weights-gib", "0.001", "--switches", "4", "--json", str(out), "--logs", str(logs)]) == 0
    )
    printed = capsys.readouterr().out
    assert "copying" in printed and "kept host copy" in printed and "cold start of one server" in printed
    result = json.loads(out.read_text())
    rows = {row["system"]: row for row in result["rows"]}
    assert sorted(rows) == ["copying", "kept host copy"]
    for row in rows.values():
        assert row["switches"] == 4 and row["answers_ok"] and row["copied_gib"] > 0
    # a copying switch against both copies of the floor (0.5 s each), a kept-copy one against the way back only
    assert rows["copying"]["vs_copy_floor"] == pytest.approx(rows["copying"]["median_s"] / 1.0)
    assert rows["kept host copy"]["vs_copy_floor"] == pytest.approx(rows["kept host copy"]["median_s"] / 0.5)
    assert rows["copying"]["reused_gib"] == 0 and rows["kept host copy"]["reused_gib"] > 0
    assert rows["kept host copy"]["copied_gib"] < rows["copying"]["copied_gib"]
    assert 0 < result["cold_start"]["ready_seconds"] <= result["cold_start"]["first_answer_seconds"]
    assert all(not r["error"] for r in result["results"])
    assert len(list(logs.glob("*.log"))) == 6  # 4 servers and 2 switches, kept for a look afterwards


def test_the_switch_benchmark_says_when_kept_host_copies_were_not_reused():
    """A kept-copy system whose sleeps still copied would report copying times under the wrong name."""
    record = {
        "model": "m",
        "seconds": 0.5,
        "wake": {"seconds": 0.3, "bytes_copied": 1 << 30},
        "sleeps": [{"seconds": 0.2, "bytes_copied": 1 << 30, "bytes_reused": 0}],
    }
    result = bench_switch.SystemResult("kept host copy", weights_gib=1.0, records=[record] * 3)
    bench_switch.check_reuse(result)
    assert "kept host copies were not reused" in result.error
    reused = {**record, "sleeps": [{"seconds": 0.01, "bytes_copied": 0, "bytes_reused": 1 << 30}]}
    result = bench_switch.SystemResult("kept host copy", weights_gib=1.0, records=[record, reused, reused])
    bench_switch.check_reuse(result)
    assert result.error == ""


def test_the_switch_puts_an_idle_backend_to_sleep(fakecuda_driver, tmp_path):
    with switch_in_front(tmp_path, ["alpha", "beta"], extra_config="idle_sleep_s = 0.5") as client:
        answer = client.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
        assert answer.status_code == 200 and answer.json()["weights_intact"]
        wait_until(lambda: sleeping(client) == {"alpha": True, "beta": True}, "the idle backends to sleep")
        answer = client.post("/v1/completions", json={"model": "alpha", "prompt": "y"})
        assert answer.status_code == 200 and answer.json()["weights_intact"]


def test_an_allocator_backend_idle_sleeps_and_a_request_wakes_it_with_its_weights_intact(fakecuda_driver):
    with processes() as started:
        proc, url = start_backend("alpha", idle_sleep_s="0.3")
        started.append(proc)
        wait_for_http(f"{url}/is_sleeping", proc)
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_until(lambda: client.get("/is_sleeping").json()["is_sleeping"], "the idle sleep")
            answer = client.post("/v1/completions", json={"model": "alpha", "prompt": "abc"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["weights_intact"] and answer.json()["gpu_bytes_used"] > 0
            metrics = client.get("/metrics").text
            assert "gpusleep_idle_sleeps_total 1.0" in metrics
            assert "gpusleep_wakes_on_request_total 1.0" in metrics
            assert "gpusleep_wake_on_request_first_byte_seconds_count 1.0" in metrics


def test_serve_refuses_idle_sleep_and_wake_on_request_where_there_is_no_sleep_mode():
    """``gpusleep serve --idle-sleep --wake-on-request`` on the CPU: sleep mode is unavailable there (no CUDA
    device), so the server refuses them at start (exit status 2, one message) instead of serving with an idle
    sleep that can only fail (tests/cli/test_cli_operator.py has the other sleep-mode options)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpusleep.cli",
            "serve",
            "--port",
            str(free_port()),
            "--device",
            "cpu",
            "--idle-sleep",
            "0.3",
            "--wake-on-request",
            "--max-body-bytes",
            "4096",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--idle-sleep, --wake-on-request are for sleep mode, which needs a CUDA device" in proc.stderr


def test_the_switch_benchmark_measures_the_sglang_dialect_and_the_process_kind(
    fakecuda_driver, tmp_path, monkeypatch, capsys
):
    """bench_switch's per-kind systems on the double: the sglang dialect over backends it starts, and the
    process kind, whose servers the switch itself launches, stops and starts at each switch."""
    monkeypatch.setattr(bench_switch, "cuda_available", lambda: True)
    monkeypatch.setattr(bench_switch, "gpu_facts", lambda: ("driver double", 1 << 40))
    monkeypatch.setattr(
        bench_switch, "measure_copy_floor", lambda n: bench_switch.CopyBaseline("pinned copy_", n, 0.5, 0.5)
    )
    driver = f"GPUSLEEP_CUDA_DRIVER={os.environ['GPUSLEEP_CUDA_DRIVER']}"
    monkeypatch.setattr(
        bench_switch,
        "serve_command",
        lambda gib, system, seed, reserve_host_memory=True: ["env", driver, *backend_command(f"{system}-{seed}")],
    )
    out, logs = tmp_path / "bench_switch.json", tmp_path / "logs"
    argv = [
        "--weights-gib",
        "0.001",
        "--switches",
        "3",
        "--json",
        str(out),
        "--logs",
        str(logs),
        "--systems",
        "sglang dialect",
        "process",
    ]
    assert bench_switch.main(argv) == 0, capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {row["system"]: row for row in result["rows"]}
    assert sorted(rows) == ["process", "sglang dialect"]
    assert all(row["switches"] == 3 and row["answers_ok"] for row in rows.values())
    records = {r["system"]: r["records"] for r in result["results"]}
    assert all(r["kind"] == "sglang" and r["wake"]["action"] == "wake_up" for r in records["sglang dialect"])
    assert all(
        r["kind"] == "process" and r["wake"]["action"] == "start" and r["sleeps"][0]["action"] == "stop"
        for r in records["process"]
    )
    assert {p.name for p in logs.glob("process-*.log")} == {"process-1.log", "process-2.log"}  # the switch's logs
