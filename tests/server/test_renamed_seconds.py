"""One spelling per unit (issue 27 part 5): durations are spelled ``_seconds`` in the control plane, the switch,
the client and the commands; the former ``_s`` spellings still work, deprecated (Note [One spelling per unit] in
gpusleep/_renamed.py): a Python keyword or attribute with a DeprecationWarning, a switch configuration key with a
warning in the log. Environment variables ending in ``_S`` keep their names."""

from __future__ import annotations

import logging
import pathlib
import tokenize
import warnings

import pytest

pytest.importorskip("starlette")

from _server_testkit import FakeController  # noqa: E402

from gpusleep import client, remote  # noqa: E402
from gpusleep.server import DrainTimeoutError, SleepGate, SleepGateMiddleware, SleepModeOptions  # noqa: E402
from gpusleep.server.idle import IdleSleeper  # noqa: E402
from gpusleep.switch import ConfigError, load_config, parse_config  # noqa: E402
from gpusleep.switch.router import SwitchTimeoutError  # noqa: E402

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "python" / "gpusleep"
RENAMED_MODULES = [
    *sorted((PACKAGE / "server").glob("*.py")),
    *sorted((PACKAGE / "switch").glob("*.py")),
    PACKAGE / "cli.py",
    PACKAGE / "client.py",
    PACKAGE / "remote.py",
    PACKAGE / "doctor.py",
]
#: The deprecated aliases themselves, which must keep their old names.
ALIAS_NAMES = {"backoff_s", "retry_after_s"}

OPTIONS_RENAMES = {
    "drain_timeout_s": ("drain_timeout_seconds", 12.0),
    "retry_after_s": ("retry_after_seconds", 7),
    "idle_sleep_s": ("idle_sleep_seconds", 300.0),
    "wake_on_request_timeout_s": ("wake_on_request_timeout_seconds", 9.0),
}
ONE = {"model": "m", "url": "http://127.0.0.1:1"}
CONFIG_RENAMES = {
    "switch_timeout_s": "switch_timeout_seconds",
    "request_timeout_s": "request_timeout_seconds",
    "backend_call_timeout_s": "backend_call_timeout_seconds",
    "idle_sleep_s": "idle_sleep_seconds",
    "restart_backoff_s": "restart_backoff_seconds",
    "stop_timeout_s": "stop_timeout_seconds",
}


def test_no_duration_is_spelled_s_in_the_renamed_modules():
    found = []
    for path in RENAMED_MODULES:
        with open(path, "rb") as f:
            for token in tokenize.tokenize(f.readline):
                if token.type == tokenize.NAME and token.string.endswith("_s") and token.string.islower():
                    if token.string not in ALIAS_NAMES:
                        found.append(f"{path.relative_to(PACKAGE)}:{token.start[0]}: {token.string}")
    assert not found, "\n".join(found)


def test_options_take_the_seconds_spelling_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        options = SleepModeOptions(**{new: value for new, value in OPTIONS_RENAMES.values()})
    for new, value in OPTIONS_RENAMES.values():
        assert getattr(options, new) == value


@pytest.mark.parametrize("old", sorted(OPTIONS_RENAMES))
def test_options_still_take_the_former_spelling_with_a_deprecation_warning(old):
    new, value = OPTIONS_RENAMES[old]
    with pytest.warns(DeprecationWarning, match=f"use {new}"):
        options = SleepModeOptions(**{old: value})
    assert getattr(options, new) == value
    with pytest.warns(DeprecationWarning, match=f"SleepModeOptions.{new}"):
        assert getattr(options, old) == value
    with pytest.raises(TypeError, match="give only"):
        SleepModeOptions(**{old: value, new: value})


def test_options_check_the_renamed_values_as_before():
    with pytest.raises(ValueError, match="drain_timeout_seconds must be > 0"):
        SleepModeOptions(drain_timeout_seconds=0)
    with pytest.raises(ValueError, match="idle_sleep_seconds"), pytest.warns(DeprecationWarning):
        SleepModeOptions(idle_sleep_s=float("inf"))


def test_gate_middleware_idle_sleeper_and_errors_keep_the_former_spelling():
    with pytest.warns(DeprecationWarning, match="drain_timeout_seconds"):
        gate = SleepGate(FakeController(), drain_timeout_s=3.0)
    assert gate.drain_timeout_seconds == 3.0
    with pytest.warns(DeprecationWarning):
        assert gate.drain_timeout_s == 3.0
    with pytest.warns(DeprecationWarning, match="retry_after_seconds"):
        middleware = SleepGateMiddleware(None, gate, (), retry_after_s=4)
    assert middleware.retry_after_seconds == 4
    with pytest.warns(DeprecationWarning, match="idle_seconds"):
        sleeper = IdleSleeper(gate, idle_s=60.0, level=1)
    assert sleeper.idle_seconds == 60.0
    error = DrainTimeoutError(2, 1.5)
    assert error.timeout_seconds == 1.5
    with pytest.warns(DeprecationWarning):
        assert error.timeout_s == 1.5
    switch_error = SwitchTimeoutError("m", 2.5)
    assert switch_error.timeout_seconds == 2.5
    with pytest.warns(DeprecationWarning):
        assert switch_error.timeout_s == 2.5


def test_the_switch_configuration_takes_the_seconds_keys():
    top = {new: 5.0 for new in CONFIG_RENAMES.values()}
    backend = dict(ONE, command=["x"], ready_timeout_seconds=7.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = parse_config({"backends": [backend], **top})
    for new in CONFIG_RENAMES.values():
        assert getattr(config, new) == 5.0
    assert config.backends[0].ready_timeout_seconds == 7.0


@pytest.mark.parametrize("old", sorted(CONFIG_RENAMES))
def test_the_switch_configuration_still_takes_the_former_keys_and_logs_it(old, caplog):
    new = CONFIG_RENAMES[old]
    with caplog.at_level(logging.WARNING, logger="gpusleep.switch"):
        config = parse_config({"backends": [ONE], old: 4.0})
    assert getattr(config, new) == 4.0
    assert f"{old} is a former spelling; write {new}" in caplog.text
    with pytest.warns(DeprecationWarning, match=f"SwitchConfig.{new}"):
        assert getattr(config, old) == 4.0
    with pytest.raises(ConfigError, match=f"{old} and {new} are the same setting"):
        parse_config({"backends": [ONE], old: 4.0, new: 4.0})
    with pytest.raises(ConfigError, match=f"{old} must be a finite number of seconds"):
        parse_config({"backends": [ONE], old: 0})


def test_a_backends_former_ready_timeout_key_works_too(caplog):
    with caplog.at_level(logging.WARNING, logger="gpusleep.switch"):
        config = parse_config({"backends": [dict(ONE, command=["x"], ready_timeout_s=9.0)]})
    assert config.backends[0].ready_timeout_seconds == 9.0 and "backends[0]: ready_timeout_s" in caplog.text
    with pytest.raises(ConfigError, match="ready_timeout_s is for a launched backend"):
        parse_config({"backends": [dict(ONE, ready_timeout_s=9.0)]})


@pytest.mark.parametrize("key", ["idle_sleep_seconds", "idle_sleep_s"])
def test_yaml_and_toml_files_take_both_spellings(tmp_path, key):
    pytest.importorskip("yaml")
    yaml_file = tmp_path / "switch.yaml"
    yaml_file.write_text(f"{key}: 60\nbackends:\n  - model: m\n    url: http://127.0.0.1:1\n")
    toml_file = tmp_path / "switch.toml"
    toml_file.write_text(f'{key} = 60\n[[backends]]\nmodel = "m"\nurl = "http://127.0.0.1:1"\n')
    for path in (yaml_file, toml_file):
        assert load_config(str(path)).idle_sleep_seconds == 60.0


def test_module_constants_keep_their_former_names():
    assert client.TRANSITION_WAIT_S == client.TRANSITION_WAIT_SECONDS
    assert (remote.TIMEOUT_S, remote.CONTROL_TIMEOUT_S) == (remote.TIMEOUT_SECONDS, remote.CONTROL_TIMEOUT_SECONDS)
    with pytest.warns(DeprecationWarning, match="backoff_seconds"):
        assert client._WakePolicy.backoff_s(3) == client._WakePolicy.backoff_seconds(3)


def test_the_deprecation_points_at_the_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SleepModeOptions(drain_timeout_s=1.0)
    assert caught and caught[0].filename == __file__, "stacklevel names the line that used the old spelling"
