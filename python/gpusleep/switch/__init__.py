"""``gpusleep switch``: one OpenAI-compatible front door for several model servers sharing one GPU.

Requests are routed by their ``"model"``; the switch keeps at most a GPU memory budget's worth of
backends awake (one at a time by default) and switches between them with the sleep-mode HTTP API
(``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping``), SGLang's dialect, or by stopping and starting
processes (kinds.py); it can start its backends itself (launcher.py). See docs/switching.md.
"""

from .app import create_switch_app
from .config import BACKEND_KINDS, BackendConfig, ConfigError, ReloadCall, SwitchConfig, load_config, parse_config
from .records import BackendCallRecord, SwitchRecord
from .router import BackendError, SwitchRouter, SwitchTimeoutError, UnknownModelError

__all__ = [
    "BACKEND_KINDS",
    "BackendCallRecord",
    "BackendConfig",
    "BackendError",
    "ConfigError",
    "ReloadCall",
    "SwitchConfig",
    "SwitchRecord",
    "SwitchRouter",
    "SwitchTimeoutError",
    "UnknownModelError",
    "create_switch_app",
    "load_config",
    "parse_config",
]
