"""The ``gpusleep switch`` command and the idle-sleep options of ``gpusleep serve`` as a user types them:
bad values are usage errors (exit 2, a message, no traceback); good values reach the server's options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpusleep import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpusleep.cli", *args], capture_output=True, text=True, timeout=60)


BAD_SERVE_VALUES = [
    (["--idle-sleep", "0"], "greater than 0"),
    (["--idle-sleep", "-1"], "greater than 0"),
    (["--idle-sleep", "inf"], "greater than 0"),
    (["--idle-sleep", "later"], "not a number of seconds"),
    (["--idle-level", "3"], "give 1"),
    (["--idle-level", "one"], "give 1"),
    (["--max-body-bytes", "0"], "greater than 0"),
    (["--max-body-bytes", "32MiB"], "not a number of bytes"),
]


@pytest.mark.parametrize("args,message", BAD_SERVE_VALUES, ids=[" ".join(a) for a, _ in BAD_SERVE_VALUES])
def test_bad_serve_values_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: gpusleep serve" in err


def test_serve_options_parse_and_default_to_the_spec_behaviour():
    parser = cli.build_parser()
    defaults = parser.parse_args(["serve"])
    assert (defaults.idle_sleep, defaults.idle_level, defaults.wake_on_request) == (None, 1, False)
    assert defaults.max_body_bytes == 32 * 1024 * 1024
    args = parser.parse_args(
        ["serve", "--idle-sleep", "300", "--idle-level", "2", "--wake-on-request", "--max-body-bytes", "1048576"]
    )
    assert (args.idle_sleep, args.idle_level, args.wake_on_request, args.max_body_bytes) == (300.0, 2, True, 1048576)


def test_switch_needs_a_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["switch"])
    assert exited.value.code == 2 and "--config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["switch", "--config", str(tmp_path / "missing.toml")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "is not a file" in err and "usage: gpusleep switch" in err


def test_switch_with_a_bad_config_exits_2_with_the_reason_and_no_traceback(tmp_path):
    path = tmp_path / "switch.toml"
    path.write_text('[[backends]]\nmodel = "a"\nurl = "ftp://host"\n')
    proc = run_cli("switch", "--config", str(path), "--port", "1")
    assert proc.returncode == 2, proc.stderr
    assert "url must be an http:// or https:// address" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_switch_help_exits_zero_and_names_the_config():
    proc = run_cli("switch", "--help")
    assert proc.returncode == 0 and "TOML" in proc.stdout and "docs/switching.md" in proc.stdout
