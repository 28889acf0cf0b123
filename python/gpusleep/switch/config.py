"""The configuration of ``gpusleep switch``: the backends behind the front door and how many may be awake.

A TOML file (or the same keys in a ``.yaml``/``.yml`` file, with PyYAML installed)::

    # switch.toml
    gpu_memory_budget_bytes = 150_000_000_000   # optional; without it: one backend awake at a time
    switch_timeout_seconds = 120                # how long a request waits for its model (default 120)
    request_timeout_seconds = 600               # one forwarded request, streaming included (default 600)
    backend_call_timeout_seconds = 600          # one POST /sleep or /wake_up of a backend (default 600)
    idle_sleep_seconds = 900                    # optional: sleep a backend unused this long
    response_buffer_bytes = 16_777_216          # a slow client's backlog the switch holds (default 16 MiB)
    max_body_bytes = 33_554_432                 # largest request body accepted; 413 above (default 32 MiB)

    [[backends]]
    model = "llama-8b"                          # the request's "model" that routes here
    url = "http://127.0.0.1:8001"
    gpu_memory_bytes = 20_000_000_000           # needed with a budget: what this backend holds awake
    token_env = "LLAMA_TOKEN"                   # optional: env variable with its /sleep, /wake_up token
    served_model = "meta-llama/Llama-3.1-8B"    # optional: the name the backend itself serves, when it differs
    kind = "vllm"                               # gpusleep (default), vllm, sglang or process: the sleep dialect
    command = ["vllm", "serve", "meta-llama/Llama-3.1-8B", "--port", "8001", "--enable-sleep-mode"]
    env = { VLLM_SERVER_DEV_MODE = "1" }        # optional, with command: added to the switch's environment
    host_memory_bytes = 16_000_000_000          # host memory it holds asleep at level 1 (host budget)

A backend with a ``command`` is launched by the switch (launcher.py); its ``url`` is where it will listen.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .._renamed import renamed_attributes
from ..errors import GpusleepError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["BACKEND_KINDS", "BackendConfig", "ConfigError", "ReloadCall", "SwitchConfig", "load_config", "parse_config"]

#: The sleep dialects a backend may speak (Note [Backend kinds] in kinds.py).
BACKEND_KINDS = ("gpusleep", "vllm", "sglang", "process")


log = logging.getLogger("gpusleep.switch")

#: Former spellings of configuration keys (Note [One spelling per unit] in gpusleep/_renamed.py): still
#: accepted, with a warning in the log that names the current key; both spellings at once are refused.
RENAMED_KEYS = {
    "switch_timeout_s": "switch_timeout_seconds",
    "request_timeout_s": "request_timeout_seconds",
    "backend_call_timeout_s": "backend_call_timeout_seconds",
    "idle_sleep_s": "idle_sleep_seconds",
    "restart_backoff_s": "restart_backoff_seconds",
    "stop_timeout_s": "stop_timeout_seconds",
}
RENAMED_BACKEND_KEYS = {"ready_timeout_s": "ready_timeout_seconds"}
_FORMER_KEYS = {new: old for old, new in {**RENAMED_KEYS, **RENAMED_BACKEND_KEYS}.items()}


class ConfigError(ValueError, GpusleepError):
    """The switch configuration is not valid; the message says where and what to write instead."""


@dataclass(frozen=True)
class ReloadCall:
    """The call that loads the weights again after a level-2 sleep, between the wake-up of the weights and
    the wake-up of the KV cache (vLLM: ``POST /collective_rpc {"method": "reload_weights"}``)."""

    path: str
    json: Any = None


#: vLLM's reload of the weights in place (docs/features/sleep_mode.md of vLLM, level 2).
VLLM_RELOAD = ReloadCall("/collective_rpc", {"method": "reload_weights"})


@renamed_attributes(RENAMED_BACKEND_KEYS)
@dataclass(frozen=True)
class BackendConfig:
    """One model server behind the switch, serving ``model`` on the OpenAI endpoints and speaking the sleep
    dialect of its ``kind`` (kinds.py); launched by the switch when it has a ``command`` (launcher.py)."""

    model: str
    url: str
    #: GPU memory the backend holds while awake, bytes; 0 when not given (only allowed without a budget).
    gpu_memory_bytes: int = 0
    #: Bearer token of the backend's ``/sleep`` and ``/wake_up`` (``None``: open).
    token: str | None = None
    #: The model name the backend serves, written into the forwarded request's ``"model"``; ``None``: ``model``.
    served_model: str | None = None
    #: The sleep dialect: ``gpusleep``, ``vllm``, ``sglang`` or ``process`` (no sleep API: stop and start).
    kind: str = "gpusleep"
    #: The command that starts the backend (``None``: it runs already, the switch only calls it).
    command: tuple[str, ...] | None = None
    #: Variables added to the switch's environment for ``command``.
    env: tuple[tuple[str, str], ...] = ()
    #: Path answered 200 once the launched backend is ready.
    ready_path: str = "/health"
    #: Longest wait for a launched backend to be ready, seconds.
    ready_timeout_seconds: float = 600.0
    #: The launched backend's log (its stdout and stderr); ``None``: ``<log_dir>/<model>.log``.
    log_file: str | None = None
    #: Host memory the backend holds while asleep at level 1, bytes (0: not counted against the host budget).
    host_memory_bytes: int = 0
    #: The reload call of a level-2 wake-up (``None``: none; vLLM's default is :data:`VLLM_RELOAD`).
    reload: ReloadCall | None = None

    @property
    def launched(self) -> bool:
        return self.command is not None


@renamed_attributes(RENAMED_KEYS)
@dataclass(frozen=True)
class SwitchConfig:
    backends: tuple[BackendConfig, ...]
    #: GPU memory the awake backends may hold together, bytes; ``None``: one backend awake at a time.
    gpu_memory_budget_bytes: int | None = None
    #: How long a request waits for its model to be awake (switches of other requests included), seconds.
    switch_timeout_seconds: float = 120.0
    #: How long one forwarded request may take, seconds (a stream: between two chunks).
    request_timeout_seconds: float = 600.0
    #: How long one ``POST /sleep`` or ``POST /wake_up`` of a backend may take, seconds (every switch waits
    #: meanwhile). Apart from request_timeout_seconds: cutting stalled streams short must not fail slow wake-ups.
    backend_call_timeout_seconds: float = 600.0
    #: Put a backend to sleep once no request has used it this long, seconds; ``None``: never.
    idle_sleep_seconds: float | None = None
    #: Level of the sleeps the switch asks for (1: weights kept in host memory, so a switch back is fast).
    sleep_level: int = 1
    #: Most bytes of one answer the switch holds for a client slower than its backend, so that the backend
    #: is free (to be put to sleep) once it has answered (Note [The lease ends with the backend's answer]).
    response_buffer_bytes: int = 16 << 20
    #: Largest request body the switch accepts, bytes; a larger one is answered 413 before any switch.
    max_body_bytes: int = 32 << 20
    #: Host memory the level-1 sleepers may hold together, bytes (their ``host_memory_bytes``); past it the
    #: least recently used go to level 2 or are stopped. ``None``: no host budget.
    host_memory_budget_bytes: int | None = None
    #: Where launched backends' logs go (``None``: a new temporary directory, named in the switch's log).
    log_dir: str | None = None
    #: First wait before a launched backend that died is started again, seconds; doubled after each death
    #: that follows a start within a minute, up to 60 s.
    restart_backoff_seconds: float = 1.0
    #: How long a launched backend may take to exit after SIGTERM before it is killed, seconds.
    stop_timeout_seconds: float = 30.0

    def backend(self, model: str) -> BackendConfig | None:
        for backend in self.backends:
            if backend.model == model:
                return backend
        return None


_TOP_KEYS = {
    "backends",
    "gpu_memory_budget_bytes",
    "switch_timeout_seconds",
    "request_timeout_seconds",
    "idle_sleep_seconds",
    "sleep_level",
    "response_buffer_bytes",
    "max_body_bytes",
    "backend_call_timeout_seconds",
    "host_memory_budget_bytes",
    "log_dir",
    "restart_backoff_seconds",
    "stop_timeout_seconds",
}
_BACKEND_KEYS = {
    "model",
    "url",
    "gpu_memory_bytes",
    "token",
    "token_env",
    "served_model",
    "kind",
    "command",
    "env",
    "ready_path",
    "ready_timeout_seconds",
    "log_file",
    "host_memory_bytes",
    "reload",
}


def load_config(path: str) -> SwitchConfig:
    """Read and check the configuration file at ``path``: TOML, or YAML when it ends in ``.yaml`` or
    ``.yml`` (the same keys; needs PyYAML). Raises :class:`ConfigError` (or ``OSError``)."""
    if path.endswith((".yaml", ".yml")):
        data = _load_yaml(path)
    else:
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _load_yaml(path: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            f"{path}: a YAML configuration needs PyYAML (pip install pyyaml), or write it as TOML"
        ) from None
    with open(path, "rb") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the YAML file must hold a mapping of the configuration's keys, not {type(data).__name__}"
        )
    return data


def parse_config(data: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> SwitchConfig:
    """Check a parsed configuration (the TOML file as a dict) and turn it into a :class:`SwitchConfig`."""
    _check_former_keys(data, RENAMED_KEYS, "")
    unknown = set(data) - _TOP_KEYS - set(RENAMED_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}; the known keys are {sorted(_TOP_KEYS)}")
    raw_backends = data.get("backends")
    if not isinstance(raw_backends, list) or not raw_backends:
        raise ConfigError("no backends: add at least one [[backends]] table with model and url")
    budget = _optional_bytes(data, "gpu_memory_budget_bytes")
    backends = tuple(_backend(i, raw, environ, budget is not None) for i, raw in enumerate(raw_backends))
    models = [b.model for b in backends]
    duplicates = sorted({m for m in models if models.count(m) > 1})
    if duplicates:
        raise ConfigError(f"model(s) {duplicates} appear in more than one backend; each model needs its own backend")
    if budget is not None:
        too_big = [b.model for b in backends if b.gpu_memory_bytes > budget]
        if too_big:
            raise ConfigError(
                f"backend(s) {too_big} need more GPU memory than the whole budget ({budget} bytes): raise "
                "gpu_memory_budget_bytes or lower their gpu_memory_bytes"
            )
    host_budget = _optional_bytes(data, "host_memory_budget_bytes")
    if host_budget is not None:
        too_big = [b.model for b in backends if b.host_memory_bytes > host_budget]
        if too_big:
            raise ConfigError(
                f"backend(s) {too_big} hold more host memory asleep than host_memory_budget_bytes "
                f"({host_budget} bytes): raise it or lower their host_memory_bytes"
            )
    log_dir = data.get("log_dir")
    if log_dir is not None and (not isinstance(log_dir, str) or not log_dir.strip()):
        raise ConfigError(f"log_dir must be a directory path, got {log_dir!r}")
    level = data.get("sleep_level", 1)
    if level not in (1, 2) or isinstance(level, bool):
        raise ConfigError(f"sleep_level must be 1 or 2, got {level!r}")
    return SwitchConfig(
        backends=backends,
        gpu_memory_budget_bytes=budget,
        switch_timeout_seconds=_seconds(data, "switch_timeout_seconds", 120.0),
        request_timeout_seconds=_seconds(data, "request_timeout_seconds", 600.0),
        backend_call_timeout_seconds=_seconds(data, "backend_call_timeout_seconds", 600.0),
        idle_sleep_seconds=_seconds(data, "idle_sleep_seconds", None),
        sleep_level=level,
        response_buffer_bytes=_optional_bytes(data, "response_buffer_bytes") or SwitchConfig.response_buffer_bytes,
        max_body_bytes=_optional_bytes(data, "max_body_bytes") or SwitchConfig.max_body_bytes,
        host_memory_budget_bytes=host_budget,
        log_dir=log_dir,
        restart_backoff_seconds=_seconds(data, "restart_backoff_seconds", 1.0),
        stop_timeout_seconds=_seconds(data, "stop_timeout_seconds", 30.0),
    )


def _backend(index: int, raw: Any, environ: Mapping[str, str], budgeted: bool) -> BackendConfig:
    where = f"backends[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table with model and url")
    _check_former_keys(raw, RENAMED_BACKEND_KEYS, f"{where}: ")
    unknown = set(raw) - _BACKEND_KEYS - set(RENAMED_BACKEND_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; the known keys are {sorted(_BACKEND_KEYS)}")
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f'{where}: model must be a non-empty string (the request\'s "model" that routes here)')
    url = raw.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where} ({model}): url must be an http:// or https:// address, got {url!r}")
    memory = _optional_bytes(raw, "gpu_memory_bytes", where=f"{where} ({model})")
    if budgeted and memory is None:
        raise ConfigError(f"{where} ({model}): with gpu_memory_budget_bytes every backend needs gpu_memory_bytes")
    token = raw.get("token")
    if "token_env" in raw:
        name = raw["token_env"]
        if not isinstance(name, str) or name not in environ:
            raise ConfigError(f"{where} ({model}): token_env names {name!r}, which is not set in the environment")
        token = environ[name]
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigError(f"{where} ({model}): the token is empty; leave it out for a backend without a token")
    served = raw.get("served_model")
    if served is not None and (not isinstance(served, str) or not served.strip()):
        raise ConfigError(
            f"{where} ({model}): served_model must be a non-empty string; leave it out to forward {model!r}"
        )
    named = f"{where} ({model})"
    kind = raw.get("kind", "gpusleep")
    if kind not in BACKEND_KINDS:
        raise ConfigError(f"{named}: kind must be one of {list(BACKEND_KINDS)}, got {kind!r}")
    command = _command(raw.get("command"), named)
    if kind == "process" and command is None:
        raise ConfigError(
            f'{named}: a backend of kind "process" (no sleep API) needs a command: the switch stops and starts it'
        )
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ConfigError(f'{named}: env must be a table of strings, like {{ VLLM_SERVER_DEV_MODE = "1" }}')
    for key in (_written(raw, k) for k in ("env", "ready_path", "ready_timeout_seconds", "log_file")):
        if key in raw and command is None:
            raise ConfigError(f"{named}: {key} is for a launched backend; give a command, or leave {key} out")
    ready_path = raw.get("ready_path", "/health")
    if not isinstance(ready_path, str) or not ready_path.startswith("/"):
        raise ConfigError(f"{named}: ready_path must be a path starting with /, got {ready_path!r}")
    log_file = raw.get("log_file")
    if log_file is not None and (not isinstance(log_file, str) or not log_file.strip()):
        raise ConfigError(f"{named}: log_file must be a file path, got {log_file!r}")
    reload = _reload(raw.get("reload"), kind, named)
    return BackendConfig(
        model=model,
        url=url.rstrip("/"),
        gpu_memory_bytes=memory or 0,
        token=token,
        served_model=served,
        kind=kind,
        command=command,
        env=tuple(sorted(env.items())),
        ready_path=ready_path,
        ready_timeout_seconds=_seconds(raw, "ready_timeout_seconds", 600.0, named),
        log_file=log_file,
        host_memory_bytes=_optional_bytes(raw, "host_memory_bytes", where=named) or 0,
        reload=reload,
    )


def _command(value: Any, named: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = shlex.split(value)
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value) or not value[0]:
        raise ConfigError(
            f"{named}: command must be a non-empty list of strings (or one string, split as a shell "
            f"would), got {value!r}"
        )
    return tuple(value)


def _reload(value: Any, kind: str, named: str) -> ReloadCall | None:
    if value is None:
        return VLLM_RELOAD if kind == "vllm" else None
    if value is False:
        return None
    if kind not in ("vllm", "gpusleep"):
        raise ConfigError(f"{named}: reload is for the level-2 wake-up of the vllm and gpusleep kinds, not {kind}")
    if (
        not isinstance(value, dict)
        or set(value) - {"path", "json"}
        or not isinstance(value.get("path"), str)
        or not value["path"].startswith("/")
    ):
        raise ConfigError(
            f'{named}: reload must be a table like {{ path = "/collective_rpc", json = {{ method = '
            f'"reload_weights" }} }} (or false for none), got {value!r}'
        )
    return ReloadCall(value["path"], value.get("json"))


def _check_former_keys(data: Mapping[str, Any], renames: Mapping[str, str], prefix: str) -> None:
    """Refuse a key given in both spellings; log each former spelling (``renames``: old -> new) used."""
    for old, new in renames.items():
        if old in data:
            if new in data:
                raise ConfigError(f"{prefix}{old} and {new} are the same setting; give only {new}")
            log.warning("switch configuration: %s%s is a former spelling; write %s", prefix, old, new)


def _written(data: Mapping[str, Any], key: str) -> str:
    """The spelling of ``key`` that ``data`` uses: the current one, or its former one when only that is there."""
    former = _FORMER_KEYS.get(key)
    return former if key not in data and former is not None and former in data else key


def _optional_bytes(data: Mapping[str, Any], key: str, where: str = "") -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{key} must be a positive whole number of bytes, got {value!r}")
    return value


def _seconds(data: Mapping[str, Any], key: str, default: float | None, where: str = "") -> float | None:
    key = _written(data, key)
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{key} must be a finite number of seconds > 0, got {value!r}")
    return float(value)
