"""The ``gpusleep`` command as an operator uses it: ``--version``; ``status``, ``sleep`` and ``wake`` against a
running server; an unknown flag shows the subcommand's usage; a busy port is found before the model is built;
sleep-mode options are refused at start on a server without sleep mode; a 501 is no failed transition."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("torch")

from _server_testkit import FakeController, loopback_server  # noqa: E402

from gpusleep import __version__, cli  # noqa: E402
from gpusleep.demo import TinyEngine, TinyTransformerConfig, create_app  # noqa: E402
from gpusleep.demo.controller import CpuOnlyController  # noqa: E402
from gpusleep.server import SleepModeOptions  # noqa: E402

SMALL = TinyTransformerConfig(d_model=16, n_heads=2, d_ff=32, max_seq_len=32)
TOKEN = "operator-token"


def gpusleep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpusleep.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def loopback():
    with loopback_server() as server:
        yield server


@pytest.fixture
def demo(loopback):
    """A demo server whose sleep mode works (a fake controller with two tags and their figures)."""
    controller = FakeController(with_stats=True)
    app = create_app(TinyEngine(SMALL), controller, SleepModeOptions(control_token=TOKEN))
    with loopback.mount(app) as url:
        yield url, controller


def test_version():
    proc = gpusleep("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gpusleep {__version__}"


def test_status_sleep_wake_round_trip(demo, capsys):
    url, controller = demo
    assert cli.main(["status", "--url", url]) == 0
    first = capsys.readouterr().out
    assert f"{url}: gpusleep-tiny: awake" in first and "weights" in first and "kv_cache" in first

    assert cli.main(["sleep", "--url", url, "--token", TOKEN, "--level", "2"]) == 0
    assert f"{url}: asleep at level 2" in capsys.readouterr().out
    assert controller.sleep_calls == [2]
    assert cli.main(["status", "--url", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["is_sleeping"] is True and status["level"] == 2 and status["models"] == ["gpusleep-tiny"]
    assert set(status["tags"]) == {"weights", "kv_cache"}

    assert cli.main(["wake", "--url", url, "--token", TOKEN, "--tags", "weights"]) == 0
    assert "woke weights" in capsys.readouterr().out
    assert controller.wake_calls == [["weights"]]
    assert cli.main(["wake", "--url", url, "--token", TOKEN, "--tags", "kv_cache,weights"]) == 0
    capsys.readouterr()
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}


def test_the_token_comes_from_the_environment_too(demo, capsys, monkeypatch):
    url, _ = demo
    assert cli.main(["sleep", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpusleep sleep: ") and "--token or the GPUSLEEP_TOKEN" in err
    monkeypatch.setenv("GPUSLEEP_TOKEN", TOKEN)
    assert cli.main(["sleep", "--url", url]) == 0
    assert cli.main(["wake", "--url", url]) == 0


def test_an_unknown_tag_is_refused_with_the_known_ones(demo, capsys):
    url, _ = demo
    assert cli.main(["sleep", "--url", url, "--token", TOKEN]) == 0
    assert cli.main(["wake", "--url", url, "--token", TOKEN, "--tags", "lora"]) == 1
    err = capsys.readouterr().err
    assert "lora" in err and "kv_cache" in err and "weights" in err
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}


def test_a_server_that_is_not_there_is_one_line_and_exit_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it
    proc = gpusleep("status", "--url", f"http://127.0.0.1:{port}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("gpusleep status: cannot reach") and len(proc.stderr.strip().splitlines()) == 1


def test_on_a_server_without_sleep_mode_the_501_is_said_and_not_counted_as_a_failure(loopback, capsys):
    app = create_app(TinyEngine(SMALL), CpuOnlyController("cpu"))
    with loopback.mount(app) as url:
        assert cli.main(["sleep", "--url", url]) == 1
        assert cli.main(["wake", "--url", url]) == 1
        err = capsys.readouterr().err
        assert err.count("needs a CUDA device") == 2
        metrics = httpx.get(f"{url}/metrics").text
    assert 'gpusleep_unavailable_transitions_total{action="sleep"} 1.0' in metrics
    assert 'gpusleep_unavailable_transitions_total{action="wake_up"} 1.0' in metrics
    assert "gpusleep_transition_failures_total{" not in metrics


def test_a_real_failure_is_still_counted(loopback):
    controller = FakeController(wake_error=RuntimeError("boom"))
    app = create_app(TinyEngine(SMALL), controller)
    with loopback.mount(app) as url:
        assert httpx.post(f"{url}/sleep").status_code == 200
        assert httpx.post(f"{url}/wake_up").status_code == 500
        metrics = httpx.get(f"{url}/metrics").text
    assert 'gpusleep_transition_failures_total{action="wake_up"} 1.0' in metrics


@pytest.mark.parametrize("command", ["serve", "switch", "status", "sleep", "wake", "doctor"])
def test_an_unknown_flag_shows_the_subcommands_usage(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, *(["--config", __file__] if command == "switch" else []), "--no-such-flag"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert f"usage: gpusleep {command}" in err and "unrecognized arguments: --no-such-flag" in err


@pytest.mark.parametrize("args", [["--url", "127.0.0.1:8000"], ["--level", "3"], ["--url", "http://"]])
def test_bad_values_of_the_remote_commands_are_usage_errors(args, capsys):
    command = "sleep" if "--level" in args else "status"
    with pytest.raises(SystemExit) as exited:
        cli.main([command, *args])
    assert exited.value.code == 2 and f"usage: gpusleep {command}" in capsys.readouterr().err


def test_a_busy_port_is_found_before_the_model_is_built(monkeypatch, capsys):
    import gpusleep.demo

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built although the port is busy")

    monkeypatch.setattr(gpusleep.demo, "build_runtime", must_not_build)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--device", "cpu", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1 port {port}" in err and "--port" in err


@pytest.mark.parametrize(
    "flags", [["--idle-sleep", "60"], ["--wake-on-request"], ["--idle-sleep", "5", "--wake-on-request"]]
)
def test_idle_sleep_and_wake_on_request_need_sleep_mode(flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = gpusleep("serve", "--device", "cpu", "--port", str(port), *flags)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA device" in proc.stderr and all(f in proc.stderr for f in flags if f.startswith("--"))
    assert "Traceback" not in proc.stderr


def test_status_of_a_switch_lists_its_backends_with_unknown_states_as_unknown(loopback, tmp_path, capsys):
    from gpusleep.switch import create_switch_app, load_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gone = s.getsockname()[1]  # nothing listens there: the backend's state stays unknown
    (tmp_path / "switch.toml").write_text(f'[[backends]]\nmodel = "llama"\nurl = "http://127.0.0.1:{gone}"\n')
    with loopback.mount(create_switch_app(load_config(str(tmp_path / "switch.toml")))) as url:
        assert cli.main(["status", "--url", url]) == 0
    out = capsys.readouterr().out
    assert f"{url}: gpusleep switch, 1 backend(s)" in out
    assert re.search(rf"^llama\s+unknown\s+0\s+0\s+http://127.0.0.1:{gone}$", out, re.M), out


def test_status_of_a_switch_shows_each_models_state_and_why_it_moved():
    from gpusleep.remote import format_status

    backend = {
        "model": "qwen",
        "awake": False,
        "requests_in_flight": 0,
        "requests_waiting": 0,
        "url": "http://127.0.0.1:9",
        "state": "asleep_l2",
        "reason": "host memory budget",
    }
    out = format_status({"url": "http://switch", "kind": "switch", "backends": [backend]})
    assert re.search(r"^qwen\s+asleep_l2\s+0\s+0\s+http://127.0.0.1:9  \(host memory budget\)$", out, re.M), out
