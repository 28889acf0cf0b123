"""``gpusleep switch`` as the front door of any engine (issue 23): backends of every kind, launched by the
switch from their commands, on loopback. vLLM and SGLang cannot run without a GPU, so their dialects are
spoken by stand-ins (switch_standin_engine.py); the ``gpusleep`` backends keep their weights in a
``gpusleep.Allocator`` on the driver double (switch_standin_gpusleep.py). All of them keep their memory in
one shared ledger (switch_ledger.py): a start-up refuses to run when the GPU lacks what it needs, as vLLM's
does, and the ledger's peaks show whether a budget was ever exceeded. Every answer is checked (the alias
asked for, the prompt reversed, the weights intact), and after each test's shutdown no process the switch
started is left."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _server_testkit import wait_until
from switch_ledger import Ledger

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = pathlib.Path(__file__).resolve().parent
ENGINE = str(TESTS_DIR / "switch_standin_engine.py")
GPUSLEEP_BACKEND = str(TESTS_DIR / "switch_standin_gpusleep.py")
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


class Setup:
    """A switch configuration under construction, with the ledger its backends share."""

    def __init__(self, tmp_path: pathlib.Path, capacity: int, top: str = "") -> None:
        self.tmp = tmp_path
        self.ledger_dir = str(tmp_path / "ledger")
        self.ledger = Ledger(self.ledger_dir, capacity)
        self.capacity = capacity
        self.lines = [top, f'log_dir = "{tmp_path / "logs"}"']

    def engine(
        self,
        alias: str,
        kind: str,
        dialect: str,
        served: str,
        gpu: int,
        host: int = 0,
        extra: str = "",
        startup_s: float = 0.0,
    ) -> None:
        port = free_port()
        command = [
            sys.executable,
            ENGINE,
            "--dialect",
            dialect,
            "--model",
            served,
            "--port",
            str(port),
            "--ledger",
            self.ledger_dir,
            "--capacity",
            str(self.capacity),
            "--gpu-bytes",
            str(gpu),
            "--host-bytes",
            str(host),
            "--startup-s",
            str(startup_s),
        ]
        self._backend(alias, kind, port, command, gpu, host, served, extra)

    def allocator(self, alias: str, kind: str, gpu: int, host: int = 0, extra: str = "") -> None:
        port = free_port()
        command = [
            sys.executable,
            GPUSLEEP_BACKEND,
            "--model",
            alias,
            "--port",
            str(port),
            "--ledger",
            self.ledger_dir,
            "--capacity",
            str(self.capacity),
            "--gpu-bytes",
            str(gpu),
        ]
        self._backend(alias, kind, port, command, gpu, host, None, extra)

    def failing(self, alias: str) -> None:
        self._backend(
            alias,
            "vllm",
            free_port(),
            [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"],
            1,
            0,
            None,
            "",
        )

    def _backend(self, alias, kind, port, command, gpu, host, served, extra) -> None:
        self.lines += [
            "[[backends]]",
            f'model = "{alias}"',
            f'kind = "{kind}"',
            f'url = "http://127.0.0.1:{port}"',
            f"command = {toml_list(command)}",
            f"gpu_memory_bytes = {gpu}",
            "ready_timeout_s = 60",
        ]
        if host:
            self.lines.append(f"host_memory_bytes = {host}")
        if served:
            self.lines.append(f'served_model = "{served}"')
        if extra:
            self.lines.append(extra)


class Switch:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.pids: set[int] = set()

    def status(self) -> dict:
        status = self.client.get("/switch/status").json()
        self.pids |= {b["pid"] for b in status["backends"] if b["pid"]}
        return status

    def backend(self, alias: str) -> dict:
        return next(b for b in self.status()["backends"] if b["model"] == alias)

    def states(self) -> dict:
        return {b["model"]: b["state"] for b in self.status()["backends"]}

    def ask(self, alias: str, prompt: str) -> dict:
        answer = self.client.post("/v1/completions", json={"model": alias, "prompt": prompt})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model"], body["text"], body["weights_intact"]) == (alias, prompt[::-1], True), body
        assert body.get("prefix_cache_ok", True), body
        self.status()
        return body

    def metric(self, name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.client.get("/metrics").text.splitlines()
            if line.startswith(name)
        )


@contextlib.contextmanager
def switch_running(setup: Setup) -> Iterator[Switch]:
    config = setup.tmp / "switch.toml"
    config.write_text("\n".join(setup.lines) + "\n")
    port = free_port()
    with open(setup.tmp / "switch.log", "wb") as log:
        proc = subprocess.Popen(
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
                "info",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    switch = None
    try:

        def up() -> bool:
            assert proc.poll() is None, (setup.tmp / "switch.log").read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, "the switch to answer", timeout_s=30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            switch = Switch(client)
            yield switch
            switch.status()
    finally:
        proc.send_signal(signal.SIGTERM)  # the switch stops what it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        left = [pid for pid in (switch.pids if switch else ()) if alive(pid)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        assert not left, f"processes left running after the switch's shutdown: {left}"
    # uvicorn re-raises the SIGTERM it handled once its shutdown (the backends' stop included) is complete
    assert proc.returncode in (0, -signal.SIGTERM), (setup.tmp / "switch.log").read_text()[-3000:]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def calls_of(url: str) -> list[str]:
    return httpx.get(f"{url}/standin/calls").json()


def url_of(switch: Switch, alias: str) -> str:
    return switch.backend(alias)["url"]


def test_launched_vllm_sglang_and_gpusleep_backends_start_in_turn_and_switch_in_their_dialects(
    fakecuda_driver, tmp_path
):
    """Four engines, room for two on the GPU: the third starts only after the least recently used one sleeps
    (its start-up check would refuse otherwise), and each one is switched in its own dialect; beta is a
    gpusleep server driven in the SGLang dialect."""
    setup = Setup(tmp_path, capacity=2000, top="gpu_memory_budget_bytes = 2000")
    setup.engine("llama", "vllm", "vllm", served="org/llama-8b", gpu=1000, startup_s=0.2)
    setup.engine("qwen", "sglang", "sglang", served="Qwen/Qwen2.5-7B", gpu=1000)
    setup.allocator("alpha", "gpusleep", gpu=1000)
    setup.allocator("beta", "sglang", gpu=1000)
    models = ["llama", "qwen", "alpha", "beta"]
    with switch_running(setup) as switch:
        assert set(switch.states().values()) == {"stopped"}  # started on first need
        for i, alias in enumerate(["llama", "qwen", "alpha", "llama", "beta", "qwen", "alpha", "beta", "llama"]):
            switch.ask(alias, f"p{i}")
            assert switch.status()["gpu_memory_held_bytes"] <= 2000
        records = switch.status()["recent_switches"]
        alpha_start = next(r for r in records if r["model"] == "alpha" and r["wake"]["action"] == "start")
        assert [s["model"] for s in alpha_start["sleeps"]] == ["llama"]  # made room before its start-up
        assert {r["kind"] for r in records} == {"vllm", "sglang", "gpusleep"}
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: switch.ask(models[i % 4 if i < 12 else (i * 7) % 4], f"c{i}"), range(28)))
        states = switch.states()
        assert sorted(states.values()) == ["asleep_l1", "asleep_l1", "awake", "awake"], states

        beta_log = pathlib.Path(switch.backend("beta")["log_file"]).read_text()
        assert "starting" in beta_log

        qwen_calls = calls_of(url_of(switch, "qwen"))
        releases = [i for i, c in enumerate(qwen_calls) if c == "POST /release_memory_occupation"]
        assert releases and all(qwen_calls[i - 1] == "POST /flush_cache" for i in releases)
        assert "POST /resume_memory_occupation" in qwen_calls
        llama_calls = calls_of(url_of(switch, "llama"))
        assert set(llama_calls) == {"POST /sleep?level=1", "POST /wake_up"}
        assert switch.metric('gpusleep_switch_starts_total{model="alpha",reason="request"}') == 1

    peaks = setup.ledger.peaks()
    assert peaks["gpu"] <= 2000, setup.ledger.events()  # the GPU budget, as the backends themselves saw it
    assert "refused" not in setup.ledger.events()


def test_vllm_level_two_wakes_by_vllms_sequence(tmp_path):
    """sleep_level = 2: each wake-up of a vLLM backend is weights, reload_weights, KV cache, prefix-cache reset;
    an answer after it has its weights back and a fresh prefix cache."""
    setup = Setup(tmp_path, capacity=1000, top="sleep_level = 2")
    setup.engine("llama", "vllm", "vllm", served="org/llama-8b", gpu=1000)
    setup.engine("mistral", "vllm", "vllm", served="org/mistral-7b", gpu=1000)
    with switch_running(setup) as switch:
        for i, alias in enumerate(["llama", "mistral", "llama", "mistral", "llama"]):
            switch.ask(alias, f"p{i}")
        assert switch.states() == {"llama": "awake", "mistral": "asleep_l2"}
        wake = [
            "POST /wake_up?tags=weights",
            "POST /collective_rpc",
            "POST /wake_up?tags=kv_cache",
            "POST /reset_prefix_cache",
        ]
        assert calls_of(url_of(switch, "llama")) == ["POST /sleep?level=2", *wake, "POST /sleep?level=2", *wake]
        assert calls_of(url_of(switch, "mistral")) == ["POST /sleep?level=2", *wake, "POST /sleep?level=2"]
    assert setup.ledger.peaks()["gpu"] <= 1000


def test_the_host_budget_demotes_the_least_recently_used_sleepers(fakecuda_driver, tmp_path):
    """Room in host memory for one level-1 sleeper: the gpusleep backends go to level 2 in place and come back
    by a staged wake-up with their reload (weights intact); the vLLM one, which cannot deepen a sleep, is
    stopped and started again."""
    host = 8 * MiB
    setup = Setup(tmp_path, capacity=1000, top=f"host_memory_budget_bytes = {host + host // 2}")
    reload = 'reload = { path = "/collective_rpc", json = { method = "reload_weights" } }'
    setup.allocator("alpha", "gpusleep", gpu=1000, host=host, extra=reload)
    setup.engine("llama", "vllm", "vllm", served="org/llama-8b", gpu=1000, host=host)
    setup.allocator("gamma", "gpusleep", gpu=1000, host=host, extra=reload)
    with switch_running(setup) as switch:
        switch.ask("alpha", "a0")
        switch.ask("llama", "l0")
        assert switch.states() == {"alpha": "asleep_l1", "llama": "awake", "gamma": "stopped"}
        switch.ask("gamma", "g0")  # llama sleeps at level 1: alpha makes room in host memory first
        assert switch.states() == {"alpha": "asleep_l2", "llama": "asleep_l1", "gamma": "awake"}
        assert switch.backend("alpha")["reason"] == "host_memory"
        llama_pid = switch.backend("llama")["pid"]
        switch.ask("alpha", "a1")  # from level 2: wake weights, reload, wake the rest; llama is stopped
        assert switch.states() == {"alpha": "awake", "llama": "stopped", "gamma": "asleep_l1"}
        assert switch.backend("llama")["reason"] == "host_memory"
        switch.ask("llama", "l1")  # started again
        assert switch.backend("llama")["pid"] not in (None, llama_pid)
        assert switch.states() == {"alpha": "asleep_l1", "llama": "awake", "gamma": "asleep_l2"}
        switch.ask("gamma", "g1")
        assert switch.status()["host_memory_held_bytes"] <= host + host // 2
        assert switch.metric('gpusleep_switch_demotions_total{model="alpha",to="level2"}') >= 1
        assert switch.metric('gpusleep_switch_demotions_total{model="llama",to="stopped"}') == 1
        assert switch.metric('gpusleep_switch_backend_state{model="gamma",state="awake"}') == 1
    peaks = setup.ledger.peaks()
    assert peaks["host"] <= host + host // 2, setup.ledger.events()  # the allocators' own backed-up bytes
    assert peaks["gpu"] <= 1000


def test_process_backends_are_stopped_and_started_and_a_crashed_one_is_restarted(tmp_path):
    setup = Setup(tmp_path, capacity=1000, top="restart_backoff_s = 0.2")
    setup.engine("tiny", "process", "none", served="tiny.gguf", gpu=1000)
    setup.engine("llama", "vllm", "vllm", served="org/llama-8b", gpu=1000)
    setup.failing("broken")
    with switch_running(setup) as switch:
        first = switch.ask("tiny", "t0")["pid"]
        switch.ask("llama", "l0")
        assert switch.states()["tiny"] == "stopped" and not alive(first)  # no sleep API: stopped to make room
        assert switch.ask("tiny", "t1")["pid"] != first  # started again
        assert switch.states()["llama"] == "asleep_l1"

        llama = switch.ask("llama", "l1")["pid"]
        os.kill(llama, signal.SIGKILL)  # a crash while awake: restarted after its back-off
        wait_until(
            lambda: switch.backend("llama")["crashes"] == 1 and switch.backend("llama")["state"] == "awake",
            "llama's restart",
            timeout_s=30,
        )
        restarted = switch.ask("llama", "l2")["pid"]
        assert restarted != llama
        assert switch.metric('gpusleep_switch_crashes_total{model="llama"}') == 1
        assert switch.metric('gpusleep_switch_starts_total{model="llama",reason="restart"}') == 1

        answer = switch.client.post("/v1/completions", json={"model": "broken", "prompt": "x"})
        assert answer.status_code == 502
        error = answer.json()["error"]
        assert (error["backend"], error["backend_action"]) == ("broken", "start")
        assert "exited with status 3" in error["message"] and "no model here" in error["message"]
        assert switch.backend("broken")["state"] == "stopped"
        switch.ask("llama", "l3")  # the others stay usable
    assert setup.ledger.peaks()["gpu"] <= 1000, setup.ledger.events()
