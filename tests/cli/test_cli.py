"""The ``gpusleep`` command as a user runs it: bad values are usage errors (exit 2, a message, no traceback), a
missing dependency names the extra to install (exit 1), good values parse."""

from __future__ import annotations

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
