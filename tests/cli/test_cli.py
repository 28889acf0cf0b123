"""The ``gpusleep`` command as a user runs it: bad values are usage errors (exit 2, a message, no traceback), a
missing dependency names the extra to install (exit 1), good values parse."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from gpusleep import cli


def run_cli(*args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``gpusleep ARGS`` in a fresh interpreter; modules in ``block`` look uninstalled there."""
    code = (
        "import sys\n"
        f"for name in {list(block)!r}: sys.modules[name] = None\n"
        "from gpusleep.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


BAD_VALUES = [
    (["--port", "99999"], "out of range"),
    (["--port", "0"], "out of range"),
    (["--port", "http"], "not a port number"),
    (["--drain-timeout", "0"], "greater than 0"),
    (["--drain-timeout", "-5"], "greater than 0"),
    (["--drain-timeout", "nan"], "greater than 0"),
    (["--drain-timeout", "soon"], "not a number of seconds"),
    (["--seed", "-1"], "out of range"),
    (["--seed", "1.5"], "not an integer seed"),
    (["--host", ""], "not a host address"),
    (["--model", "/nonexistent/model/dir"], "is not a directory"),
    (["--token", " "], "token is empty"),
    (["--log-level", "loud"], "invalid choice"),
    (["--max-body-bytes", "0"], "greater than 0"),
    (["--max-body-bytes", "1MB"], "not a number of bytes"),
    (["--served-model-name", ""], "model name is empty"),
    (["--served-model-name", " tiny"], "whitespace"),
    (["--idle-sleep", "inf"], "greater than 0"),
    (["--extra-weights-gib", "-1"], "0 or more"),
    (["--extra-weights-gib", "inf"], "0 or more"),
    (["--extra-weights-gib", "8GB"], "not a number of GiB"),
    (["--pinned-budget", "40GB"], "not a size"),
    (["--pinned-budget", "lots"], "not a size"),
    (["--pinned-budget", "0"], "greater than 0"),
    (["--pinned-budget=-1GiB"], "not a size"),
    (["--pageable-budget", "1.5KiB3"], "not a size"),
    (["--pageable-budget", "nanGiB"], "not a size"),
    (["--staging-size", "0MiB"], "greater than 0"),
    (["--host-tier", "weights"], "TAG=TIER"),
    (["--host-tier", "weights=ssd"], "pinned, pageable or file"),
    (["--host-tier", "lora=pinned"], "weights or kv_cache"),
    (["--file-dir", ""], "not a directory path"),
]


@pytest.mark.parametrize("args,message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: gpusleep serve" in err


def test_bad_value_from_the_command_line_has_no_traceback():
    proc = run_cli("serve", "--port", "99999")
    assert proc.returncode == 2
    assert "port 99999 is out of range" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_command_is_a_usage_error():
    proc = run_cli()
    assert proc.returncode == 2 and "usage: gpusleep" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("module,distribution", [("torch", "torch"), ("fastapi", "fastapi"), ("uvicorn", "uvicorn")])
def test_serve_without_a_dependency_names_the_extra(module, distribution):
    proc = run_cli("serve", block=(module,))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"missing {distribution}" in proc.stderr
    assert 'pip install "gpusleep[serve]"' in proc.stderr


def test_missing_modules_lists_only_what_cannot_be_imported():
    assert cli.missing_modules({"sys": "python", "gpusleep_no_such_module": "no-such-dist"}) == ["no-such-dist"]


def test_good_values_parse():
    args = cli.build_parser().parse_args(
        ["serve", "--port", "8080", "--drain-timeout", "0.5", "--device", "cuda:1", "--seed", "7", "--host", "::1"]
    )
    assert (args.port, args.drain_timeout, args.device, args.seed, args.host) == (8080, 0.5, "cuda:1", 7, "::1")
    assert (args.extra_weights_gib, args.keep_host_copy) == (0.0, False)
    args = cli.build_parser().parse_args(["serve", "--extra-weights-gib", "0.5", "--keep-host-copy"])
    assert (args.extra_weights_gib, args.keep_host_copy) == (0.5, True)


@pytest.mark.parametrize("flag", [["--extra-weights-gib", "1"], ["--keep-host-copy"], ["--reserve-host-memory"]])
def test_sleep_mode_options_on_the_cpu_are_refused_with_the_reason(flag):
    proc = run_cli("serve", "--device", "cpu", *flag)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA device" in proc.stderr and "--device cuda" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_exits_zero_and_names_the_extra():
    proc = run_cli("serve", "--help")
    assert proc.returncode == 0
    assert "gpusleep[serve]" in proc.stdout


@pytest.mark.parametrize(
    "text,num_bytes",
    [
        ("40GiB", 40 << 30),
        ("512MiB", 512 << 20),
        ("512 MiB", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("64KiB", 64 << 10),
        ("2TiB", 2 << 40),
        ("4096", 4096),
        ("4096B", 4096),
        ("1gib", 1 << 30),
    ],
)
def test_sizes_parse_with_binary_units(text, num_bytes):
    args = cli.build_parser().parse_args(["serve", "--pinned-budget", text])
    assert args.pinned_budget == num_bytes


def test_host_tier_flags_parse():
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--pinned-budget",
            "40GiB",
            "--pageable-budget",
            "512MiB",
            "--file-dir",
            "/tmp/gs",
            "--staging-size",
            "32MiB",
            "--host-tier",
            "weights=pageable",
            "--host-tier",
            "kv_cache=file",
        ]
    )
    assert (args.pinned_budget, args.pageable_budget, args.file_dir, args.staging_size) == (
        40 << 30,
        512 << 20,
        "/tmp/gs",
        32 << 20,
    )
    assert args.host_tier == [("weights", "pageable"), ("kv_cache", "file")]
    defaults = cli.build_parser().parse_args(["serve"])
    assert (defaults.pinned_budget, defaults.pageable_budget, defaults.file_dir, defaults.staging_size) == (
        None,
        None,
        None,
        None,
    )
    assert defaults.host_tier is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _capture_build(monkeypatch) -> dict:
    """Make ``gpusleep serve`` stop right after it asks for the runtime; returns what it asked with."""
    import gpusleep.demo

    asked: dict = {}

    def build_runtime(*args, **kwargs):
        asked.update(kwargs)
        raise ValueError("stopped by the test before building the model")

    monkeypatch.setattr(gpusleep.demo, "build_runtime", build_runtime)
    monkeypatch.setattr(gpusleep.demo, "sleep_mode_supported", lambda device: True)
    return asked


def test_serve_passes_the_host_tiers_to_the_allocator(monkeypatch, capsys):
    pytest.importorskip("torch")
    asked = _capture_build(monkeypatch)
    code = cli.main(
        [
            "serve",
            "--port",
            str(_free_port()),
            "--device",
            "cpu",
            "--pinned-budget",
            "1GiB",
            "--pageable-budget",
            "2GiB",
            "--file-dir",
            "/tmp/gpusleep-cli-test",
            "--staging-size",
            "8MiB",
            "--host-tier",
            "weights=file",
        ]
    )
    assert code == 2 and "stopped by the test" in capsys.readouterr().err
    assert asked["allocator_options"] == {
        "pinned_budget_bytes": 1 << 30,
        "pageable_budget_bytes": 2 << 30,
        "file_dir": "/tmp/gpusleep-cli-test",
        "staging_bytes": 8 << 20,
    }
    assert asked["host_tiers"] == {"weights": "file"}


def test_serve_without_host_tier_flags_asks_for_the_allocators_defaults(monkeypatch, capsys):
    pytest.importorskip("torch")
    asked = _capture_build(monkeypatch)
    assert cli.main(["serve", "--port", str(_free_port()), "--device", "cpu"]) == 2
    assert asked["allocator_options"] == {} and asked["host_tiers"] == {}


def test_the_file_tier_needs_a_file_dir(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--host-tier", "weights=file"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--file-dir" in err and "usage: gpusleep serve" in err


@pytest.mark.parametrize(
    "flag", [["--pinned-budget", "1GiB"], ["--file-dir", "/tmp/x"], ["--host-tier", "weights=pageable"]]
)
def test_host_tier_options_on_the_cpu_are_refused_with_the_reason(flag):
    proc = run_cli("serve", "--device", "cpu", *flag)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA device" in proc.stderr and flag[0] in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_demo_runtime_puts_the_weights_in_the_tier_asked_on_the_simulated_gpu(tmp_path):
    """What the flags reach: the demo's allocator on the simulated GPU, in a fresh process."""
    pytest.importorskip("torch")
    from gpusleep import simulated_gpu

    try:
        simulated_gpu.library_path()
    except simulated_gpu.SimulatedGpuUnavailableError as exc:
        pytest.skip(str(exc))
    code = f"""
import json, gpusleep.simulated_gpu as sim
sim.enable(devices=1, memory_bytes=256 << 20)
from gpusleep.demo import build_runtime
rt = build_runtime(seed=1, allocator_options={{"file_dir": {str(tmp_path)!r}, "pinned_budget_bytes": 1 << 30}},
                   host_tiers={{"weights": "file", "kv_cache": "pageable"}})
rt.controller.sleep(1)
tags = rt.allocator.stats().tags
host = rt.allocator.stats().host
print(json.dumps(dict(weights_file=tags["weights"].bytes_file, weights_pinned=tags["weights"].bytes_pinned,
                      kv_pageable=tags["kv_cache"].bytes_pageable, budget=host.pinned_budget_bytes)))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUSLEEP_CUDA_DRIVER", "GPUSLEEP_SIMULATE_GPU")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["weights_file"] > 0 and facts["weights_pinned"] == 0
    assert facts["kv_pageable"] > 0
    assert facts["budget"] == 1 << 30


def test_the_demo_allocator_gets_the_options_and_tiers_the_flags_give(fake, tmp_path):
    """``_new_allocator`` (what ``build_runtime`` makes on CUDA and on the simulated GPU), on the driver double:
    the budget is the allocator's, and a level-1 sleep puts each tag in the tier asked."""
    pytest.importorskip("torch")
    from gpusleep.demo.runtime import _new_allocator

    alloc = _new_allocator(
        None,
        True,
        {"pinned_budget_bytes": 1 << 30, "file_dir": str(tmp_path)},
        {"weights": "file", "kv_cache": "pageable"},
    )
    try:
        alloc.allocate(4 << 20, "weights")
        alloc.allocate(4 << 20, "kv_cache")
        alloc.sleep(1)
        tags, host = alloc.stats().tags, alloc.stats().host
        assert tags["weights"].bytes_file > 0 and tags["weights"].bytes_pinned == 0
        assert tags["kv_cache"].bytes_pageable > 0, "kv_cache is offloaded once given a tier"
        assert host.pinned_budget_bytes == 1 << 30
        alloc.wake_up()
    finally:
        alloc.close()
