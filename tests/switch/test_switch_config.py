"""The ``gpusleep switch`` configuration file: what a user writes, what it means, and clear errors for
what it cannot mean (each names the key and says what to write instead)."""

from __future__ import annotations

import pytest

from gpusleep.switch import BackendConfig, ConfigError, load_config, parse_config
from gpusleep.switch.config import ReloadCall

GOOD = """
gpu_memory_budget_bytes = 20_000_000_000
switch_timeout_s = 30
idle_sleep_s = 600

[[backends]]
model = "llama"
url = "http://127.0.0.1:8001/"
gpu_memory_bytes = 12_000_000_000
token_env = "LLAMA_TOKEN"

[[backends]]
model = "qwen"
url = "http://127.0.0.1:8002"
gpu_memory_bytes = 8_000_000_000
"""


def test_a_good_file_reads_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TOKEN", "s3cret")
    path = tmp_path / "switch.toml"
    path.write_text(GOOD)
    config = load_config(str(path))
    assert config.backends == (
        BackendConfig("llama", "http://127.0.0.1:8001", 12_000_000_000, "s3cret"),
        BackendConfig("qwen", "http://127.0.0.1:8002", 8_000_000_000, None),
    )
    assert (config.gpu_memory_budget_bytes, config.switch_timeout_seconds, config.idle_sleep_seconds) == (
        20e9,
        30.0,
        600.0,
    )
    assert config.sleep_level == 1 and config.request_timeout_seconds == 600.0
    assert config.response_buffer_bytes == 16 << 20 and config.max_body_bytes == 32 << 20  # the defaults
    assert config.backend_call_timeout_seconds == 600.0
    assert parse_config({"backends": [ONE], "backend_call_timeout_s": 2.5}).backend_call_timeout_seconds == 2.5
    assert parse_config({"backends": [ONE], "response_buffer_bytes": 1024}).response_buffer_bytes == 1024
    assert config.backend("qwen").url == "http://127.0.0.1:8002" and config.backend("mistral") is None


def test_without_a_budget_memory_figures_are_optional():
    config = parse_config({"backends": [{"model": "a", "url": "http://h:1"}, {"model": "b", "url": "http://h:2"}]})
    assert config.gpu_memory_budget_bytes is None and [b.gpu_memory_bytes for b in config.backends] == [0, 0]


ONE = {"model": "a", "url": "http://127.0.0.1:8001"}
BAD = [
    ({}, "no backends"),
    ({"backends": []}, "no backends"),
    ({"backends": [ONE], "budget": 1}, "unknown key(s) ['budget']"),
    ({"backends": [dict(ONE, port=1)]}, "unknown key(s) ['port']"),
    ({"backends": [ONE, ONE]}, "more than one backend"),
    ({"backends": [dict(ONE, model="")]}, "model must be a non-empty string"),
    ({"backends": [dict(ONE, url="127.0.0.1:8001")]}, "url must be an http:// or https:// address"),
    ({"backends": [ONE], "gpu_memory_budget_bytes": 10}, "every backend needs gpu_memory_bytes"),
    (
        {"backends": [dict(ONE, gpu_memory_bytes=11)], "gpu_memory_budget_bytes": 10},
        "more GPU memory than the whole budget",
    ),
    ({"backends": [dict(ONE, gpu_memory_bytes=-1)]}, "gpu_memory_bytes must be a positive whole number"),
    ({"backends": [dict(ONE, gpu_memory_bytes=1.5)]}, "gpu_memory_bytes must be a positive whole number"),
    ({"backends": [ONE], "gpu_memory_budget_bytes": True}, "gpu_memory_budget_bytes must be a positive"),
    ({"backends": [ONE], "switch_timeout_s": 0}, "switch_timeout_s must be a finite number of seconds > 0"),
    ({"backends": [ONE], "idle_sleep_s": float("nan")}, "idle_sleep_s must be a finite number"),
    ({"backends": [ONE], "sleep_level": 3}, "sleep_level must be 1 or 2"),
    ({"backends": [ONE], "response_buffer_bytes": 0}, "response_buffer_bytes must be a positive whole number"),
    ({"backends": [ONE], "max_body_bytes": -5}, "max_body_bytes must be a positive whole number"),
    ({"backends": [ONE], "backend_call_timeout_s": 0}, "backend_call_timeout_s must be a finite number of seconds > 0"),
    ({"backends": [ONE], "backend_call_timeout_s": float("inf")}, "backend_call_timeout_s must be a finite number"),
    ({"backends": [ONE], "response_buffer_bytes": "16MiB"}, "response_buffer_bytes must be a positive whole number"),
    ({"backends": [dict(ONE, token_env="GPUSLEEP_NO_SUCH_VARIABLE")]}, "not set in the environment"),
    ({"backends": [dict(ONE, token=" ")]}, "the token is empty"),
    ({"backends": ["a"]}, "must be a table"),
    ({"backends": [dict(ONE, served_model="")]}, "served_model must be a non-empty string"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m for _, m in BAD])
def test_what_cannot_be_meant_is_a_clear_error(raw, message):
    with pytest.raises(ConfigError) as error:
        parse_config(raw, environ={})
    assert message in str(error.value)


def test_a_file_that_is_not_toml_names_the_file(tmp_path):
    path = tmp_path / "switch.toml"
    path.write_text("[[backends]\nmodel = 'a'\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(path) in str(error.value) and "not valid TOML" in str(error.value)


GOOD_YAML = """
gpu_memory_budget_bytes: 20000000000
switch_timeout_s: 30
idle_sleep_s: 600
backends:
  - model: llama
    url: http://127.0.0.1:8001/
    gpu_memory_bytes: 12000000000
    token_env: LLAMA_TOKEN
  - model: qwen
    url: http://127.0.0.1:8002
    gpu_memory_bytes: 8000000000
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_a_yaml_file_means_the_same_as_its_toml(tmp_path, monkeypatch, suffix):
    pytest.importorskip("yaml")
    monkeypatch.setenv("LLAMA_TOKEN", "s3cret")
    (tmp_path / "switch.toml").write_text(GOOD)
    (tmp_path / f"switch{suffix}").write_text(GOOD_YAML)
    assert load_config(str(tmp_path / f"switch{suffix}")) == load_config(str(tmp_path / "switch.toml"))


@pytest.mark.parametrize(
    "text,message",
    [
        ("backends: [model: a\n", "not valid YAML"),
        ("- model: a\n", "must hold a mapping"),
        ("backends:\n  - model: a\n    url: http://h:1\n    port: 2\n", "unknown key(s) ['port']"),
    ],
)
def test_a_yaml_file_that_cannot_be_meant_names_the_file(tmp_path, text, message):
    pytest.importorskip("yaml")
    path = tmp_path / "switch.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(path) in str(error.value) and message in str(error.value)


def test_without_pyyaml_a_yaml_file_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails as if not installed
    path = tmp_path / "switch.yml"
    path.write_text(GOOD_YAML)
    with pytest.raises(ConfigError, match=r"needs PyYAML \(pip install pyyaml\)"):
        load_config(str(path))


KINDS = """
host_memory_budget_bytes = 64_000_000_000
log_dir = "/var/log/switch"
restart_backoff_s = 2

[[backends]]
model = "llama"
kind = "vllm"
url = "http://127.0.0.1:8001"
served_model = "meta-llama/Llama-3.1-8B-Instruct"
command = ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct", "--port", "8001", "--enable-sleep-mode"]
env = { VLLM_SERVER_DEV_MODE = "1" }
host_memory_bytes = 16_000_000_000

[[backends]]
model = "qwen"
kind = "sglang"
url = "http://127.0.0.1:30000"
command = "python -m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct --port 30000 --enable-memory-saver"
ready_timeout_s = 900

[[backends]]
model = "tiny"
kind = "process"
url = "http://127.0.0.1:8080"
command = ["llama-server", "-m", "tiny.gguf", "--port", "8080"]

[[backends]]
model = "alpha"
url = "http://127.0.0.1:8002"
reload = { path = "/collective_rpc", json = { method = "reload_weights" } }
"""


def test_backend_kinds_and_launch_keys_read_as_written(tmp_path):
    path = tmp_path / "switch.toml"
    path.write_text(KINDS)
    config = load_config(str(path))
    llama, qwen, tiny, alpha = config.backends
    assert (llama.kind, llama.launched, llama.env, llama.host_memory_bytes) == (
        "vllm",
        True,
        (("VLLM_SERVER_DEV_MODE", "1"),),
        16_000_000_000,
    )
    assert llama.command[:2] == ("vllm", "serve") and llama.ready_path == "/health"
    assert llama.reload == ReloadCall("/collective_rpc", {"method": "reload_weights"})  # vLLM's default
    assert qwen.command[:3] == ("python", "-m", "sglang.launch_server") and qwen.ready_timeout_seconds == 900.0
    assert qwen.reload is None and tiny.kind == "process" and tiny.launched
    assert (alpha.kind, alpha.launched, alpha.reload) == ("gpusleep", False, llama.reload)
    assert (config.host_memory_budget_bytes, config.log_dir, config.restart_backoff_seconds) == (
        64_000_000_000,
        "/var/log/switch",
        2.0,
    )


@pytest.mark.parametrize(
    "backend, message",
    [
        ({"kind": "ollama"}, "kind must be one of ['gpusleep', 'vllm', 'sglang', 'process']"),
        ({"kind": "process"}, 'a backend of kind "process" (no sleep API) needs a command'),
        ({"command": []}, "command must be a non-empty list of strings"),
        ({"command": ["x", 3]}, "command must be a non-empty list of strings"),
        ({"env": {"A": "1"}}, "env is for a launched backend"),
        ({"command": ["x"], "env": {"A": 1}}, "env must be a table of strings"),
        ({"command": ["x"], "ready_path": "health"}, "ready_path must be a path starting with /"),
        ({"command": ["x"], "ready_timeout_s": 0}, "(m): ready_timeout_s must be a finite number of seconds > 0"),
        ({"kind": "sglang", "reload": {"path": "/x"}}, "reload is for the level-2 wake-up of the vllm and gpusleep"),
        ({"reload": {"method": "reload_weights"}}, "reload must be a table like"),
        ({"host_memory_bytes": -1}, "host_memory_bytes must be a positive whole number"),
    ],
)
def test_what_a_backend_kind_cannot_mean_is_a_clear_error(backend, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": [{"model": "m", "url": "http://127.0.0.1:1", **backend}]})
    assert message in str(caught.value)


def test_a_backend_larger_than_the_host_budget_is_refused():
    with pytest.raises(ConfigError, match=r"\['m'\] hold more host memory asleep than host_memory_budget_bytes"):
        parse_config(
            {
                "host_memory_budget_bytes": 10,
                "backends": [{"model": "m", "url": "http://127.0.0.1:1", "host_memory_bytes": 11}],
            }
        )
