"""The simulated GPU (issue 22, part 1) as a user meets it: ``gpusleep.simulated_gpu.enable()`` in a fresh process,
``gpusleep serve --simulate-gpu`` and ``gpusleep doctor --simulate-gpu`` as commands. Each runs in its own process:
the simulated GPU must be enabled before the process first opens a driver, and this test process may already
have opened the tests' double (conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest
from _server_testkit import wait_until

pytestmark = pytest.mark.timeout(180)

pytest.importorskip("gpusleep.simulated_gpu")


def _library_or_skip() -> str:
    from gpusleep import simulated_gpu

    try:
        return str(simulated_gpu.library_path())
    except simulated_gpu.SimulatedGpuUnavailableError as exc:  # a _C copied in without the second CMake target
        pytest.skip(str(exc))


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GPUSLEEP_CUDA_DRIVER", "GPUSLEEP_SIMULATE_GPU")}
    env.update(extra)
    return env


def run_python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, returned."""
    _library_or_skip()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, env=_env(**env)
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_weights_keep_their_address_and_bytes_and_a_sleep_really_frees_simulated_memory():
    facts = run_python("""
        import json, os, gpusleep, gpusleep.simulated_gpu as sim
        gpu = sim.enable(devices=1, memory_bytes=256 << 20)
        alloc = gpusleep.Allocator()
        pattern = bytes(range(256)) * (3 << 14)            # 12 MiB, not a multiple of the granularity
        weights = alloc.allocate(len(pattern), tag="weights")
        kv = alloc.allocate(4 << 20, tag="kv_cache")
        alloc.write_device(weights, pattern)
        alloc.write_device(kv, b"\\x07" * (4 << 20))
        used_awake, free_awake = gpu.used_bytes(), gpu.free_bytes()
        report = alloc.sleep(level=1)
        used_asleep, free_asleep = gpu.used_bytes(), gpu.free_bytes()
        alloc.wake_up()
        restored = alloc.read_device(weights, len(pattern)) == pattern
        kv_zeroed = alloc.read_device(kv, 4 << 20) == bytes(4 << 20)
        alloc.sleep(level=2); alloc.wake_up()
        discarded = alloc.read_device(weights, 4096) == bytes(4096)
        print(json.dumps(dict(driver=os.environ["GPUSLEEP_CUDA_DRIVER"], library=str(sim.library_path()),
                              used_awake=used_awake, used_asleep=used_asleep, free_awake=free_awake,
                              free_asleep=free_asleep, offloaded=report.bytes_offloaded, restored=restored,
                              kv_zeroed=kv_zeroed, discarded=discarded, violations=gpu.violations(),
                              name=gpusleep._C.device_info(0).name)))
    """)
    assert facts["driver"] == facts["library"] and facts["library"].endswith("libgpusleep_simulated_gpu.so")
    assert facts["used_awake"] >= (12 << 20) + (4 << 20) and facts["used_asleep"] == 0
    assert facts["free_asleep"] - facts["free_awake"] == facts["used_awake"]
    assert facts["offloaded"] >= 12 << 20
    assert facts["restored"] and facts["kv_zeroed"] and facts["discarded"]
    assert facts["violations"] == []
    assert facts["name"].startswith("fakecuda")  # the double's own device name: the doctor labels it


def test_enable_refuses_what_it_cannot_honour():
    facts = run_python("""
        import json, gpusleep.simulated_gpu as sim
        out = {"before": sim.is_enabled()}
        try:
            sim.enable(devices=0)
        except ValueError as e:
            out["zero_devices"] = str(e)
        gpu = sim.enable(devices=1, memory_bytes=128 << 20)
        out["same_again"] = sim.enable(devices=1, memory_bytes=128 << 20) is gpu
        try:
            sim.enable(devices=2, memory_bytes=128 << 20)
        except RuntimeError as e:
            out["changed"] = str(e)
        print(json.dumps(out))
    """)
    assert facts["before"] is False and "1 to 16" in facts["zero_devices"]
    assert facts["same_again"] is True and "already enabled" in facts["changed"]


def test_enable_refuses_once_another_driver_is_in_use(fakecuda_driver):
    facts = run_python(
        """
        import ctypes, json, os, gpusleep.simulated_gpu as sim
        ctypes.CDLL(os.environ["GPUSLEEP_CUDA_DRIVER"])   # as if gpusleep had opened this driver already
        try:
            sim.enable()
            print(json.dumps({"refused": None}))
        except sim.SimulatedGpuUnavailableError as e:
            print(json.dumps({"refused": str(e)}))
    """,
        GPUSLEEP_CUDA_DRIVER=str(fakecuda_driver.path),
    )
    assert facts["refused"] and "already uses the CUDA driver" in facts["refused"]


def test_the_demo_computes_from_the_weights_in_simulated_device_memory():
    pytest.importorskip("torch")
    facts = run_python("""
        import json, gpusleep.simulated_gpu as sim
        gpu = sim.enable(devices=1, memory_bytes=256 << 20)
        from gpusleep.demo import SamplingParams, build_runtime
        rt = build_runtime(seed=3)
        engine, alloc = rt.engine, rt.allocator
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        prompt = engine.tokenize("Hello")
        first = engine.generate(prompt, greedy).text
        address = engine.weights.address
        rt.controller.sleep(1)
        asleep_used = gpu.used_bytes()
        rt.controller.wake_up(None)
        after_level1 = engine.generate(prompt, greedy).text
        good = alloc.read_device(address, engine.weights.num_bytes)
        alloc.write_device(address, bytes(len(good)))      # zero the weights in device memory
        zeroed = engine.generate(prompt, greedy).text
        alloc.write_device(address, good)
        rt.controller.sleep(2); rt.controller.wake_up(["kv_cache"]); rt.controller.wake_up(["weights"])
        after_level2 = engine.generate(prompt, greedy).text
        host_copy_scrubbed = all(t.isnan().all().item() for _, t in engine.weights.tensors if t.is_floating_point())
        print(json.dumps(dict(first=first, after_level1=after_level1, zeroed=zeroed, after_level2=after_level2,
                              same_address=engine.weights.address == address, asleep_used=asleep_used,
                              scrubbed=host_copy_scrubbed, simulated=rt.simulated_gpu is not None,
                              violations=gpu.violations())))
    """)
    assert facts["simulated"] and facts["same_address"] and facts["asleep_used"] == 0
    assert facts["after_level1"] == facts["first"] and facts["after_level2"] == facts["first"]
    assert facts["zeroed"] != facts["first"]  # the model reads device memory, not a host copy
    assert facts["scrubbed"] and facts["violations"] == []


def start_simulated_server(*args: str, **env: str):
    from _server_testkit import start_cli_server

    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(_env(**env))
    try:
        return start_cli_server(*args)
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.fixture(scope="module")
def simulated_server():
    pytest.importorskip("torch")
    _library_or_skip()
    from _server_testkit import stop_cli_server

    proc, url = start_simulated_server("--simulate-gpu", "--seed", "5", "--log-level", "info")
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http, proc
    finally:
        stop_cli_server(proc)


def complete(http: httpx.Client) -> httpx.Response:
    return http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})


def test_serve_simulate_gpu_sleeps_and_wakes_for_real_and_labels_every_answer(simulated_server):
    http, _ = simulated_server
    version = http.get("/version")
    assert version.json()["gpu"] == "simulated" and version.headers["x-gpusleep-gpu"] == "simulated"
    before = complete(http)
    assert before.status_code == 200 and before.headers["x-gpusleep-gpu"] == "simulated"
    slept = http.post("/sleep", params={"level": 1})
    body = slept.json()
    assert slept.status_code == 200 and body["is_sleeping"] is True and slept.headers["x-gpusleep-gpu"] == "simulated"
    assert body["bytes_offloaded"] > 0 and body["report"]["bytes_freed_measured"] == body["bytes_freed"] > 0
    refused = complete(http)
    assert refused.status_code == 503 and refused.headers["x-gpusleep-gpu"] == "simulated"
    woke = http.post("/wake_up")
    assert woke.status_code == 200 and woke.json()["bytes_restored"] == body["bytes_offloaded"]
    assert complete(http).json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    assert http.post("/sleep", params={"level": 2}).json()["bytes_offloaded"] == 0
    assert http.post("/wake_up").status_code == 200
    assert complete(http).json()["choices"][0]["text"] == before.json()["choices"][0]["text"]  # reloaded in place


def test_every_log_line_of_a_simulated_server_says_so():
    pytest.importorskip("torch")
    from _server_testkit import stop_cli_server

    proc, url = start_simulated_server("--log-level", "info", GPUSLEEP_SIMULATE_GPU="1")  # the variable alone
    try:
        assert httpx.post(f"{url}/sleep").status_code == 200
    finally:
        stop_cli_server(proc)
    lines = [line for line in proc.stdout.read().splitlines() if line.strip()]
    assert any("sleep(level=1)" in line for line in lines)
    unlabelled = [line for line in lines if "SIMULATED GPU" not in line]
    assert not unlabelled, unlabelled


def test_idle_sleep_and_wake_on_request_on_the_simulated_gpu():
    pytest.importorskip("torch")
    from _server_testkit import stop_cli_server

    proc, url = start_simulated_server("--simulate-gpu", "--idle-sleep", "0.5", "--wake-on-request")
    try:
        wait_until(lambda: httpx.get(f"{url}/is_sleeping").json()["is_sleeping"], "the idle sleep", timeout_s=60)
        served = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
        assert served.status_code == 200 and served.json()["choices"][0]["text"]
    finally:
        stop_cli_server(proc)


def test_sleep_mode_options_need_sleep_mode_unless_simulated():
    pytest.importorskip("torch")
    from _server_testkit import stop_cli_server

    refused = subprocess.run(
        [sys.executable, "-m", "gpusleep.cli", "serve", "--device", "cpu", "--keep-host-copy", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert refused.returncode == 2 and "--simulate-gpu" in refused.stderr
    both = subprocess.run(
        [sys.executable, "-m", "gpusleep.cli", "serve", "--simulate-gpu", "--device", "cuda:0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert both.returncode == 2 and "leave --device out" in both.stderr
    proc, url = start_simulated_server("--simulate-gpu", "--keep-host-copy", "--reserve-host-memory")
    try:
        first = httpx.post(f"{url}/sleep", timeout=60).json()
        httpx.post(f"{url}/wake_up", timeout=60)
        second = httpx.post(f"{url}/sleep", timeout=60).json()
        assert first["bytes_offloaded"] > 0 and second["report"]["bytes_reused"] == first["bytes_offloaded"]
    finally:
        stop_cli_server(proc)


def test_doctor_on_the_simulated_gpu(tmp_path):
    _library_or_skip()
    out = tmp_path / "doctor.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpusleep.cli",
            "doctor",
            "--simulate-gpu",
            "--size-gib",
            "0.0625",
            "--no-torch",
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SIMULATED GPU" in proc.stdout and "SIMULATED GPU" in proc.stderr
    report = json.loads(out.read_text())
    assert report["simulated"] is True and report["exit_code"] == 0
