"""``gpusleep status``, ``gpusleep sleep`` and ``gpusleep wake``: the control plane of a running server from
the command line (as ``ollama ps`` and ``ollama stop`` are for ollama).

They speak the sleep-mode HTTP API (``GET /is_sleeping``, ``POST /sleep``, ``POST /wake_up``, and
``GET /metrics`` for the figures when the server has it), so they work against ``gpusleep serve``, any app
with ``gpusleep.server.install``, and vLLM in dev mode; ``status`` also reads a ``gpusleep switch``
(``GET /switch/status``). Each prints one short report and exits 0, or prints why not and exits 1
(server unreachable, call refused). Needs httpx only (``gpusleep[server]``); never imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .errors import GpusleepError

# F822: names no function of this module has (kept as they were: the fix is an API decision, not a reformat)
__all__ = [
    "DEFAULT_URL",
    "RemoteError",
    "do_sleep",
    "do_wake",
    "format_sleep",
    "format_status",
    "format_wake",
    "read_status",
    "run",
]

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_SECONDS = (
    10.0  #: status and connection time limit; a sleep or wake-up may take longer (CONTROL_TIMEOUT_SECONDS)
)
CONTROL_TIMEOUT_SECONDS = 600.0  #: a level-1 sleep copies the weights to host memory: minutes for a large model
TIMEOUT_S, CONTROL_TIMEOUT_S = TIMEOUT_SECONDS, CONTROL_TIMEOUT_SECONDS  #: the former spellings


class RemoteError(GpusleepError):
    """Why the command could not do what was asked: printed as one line, exit status 1."""


def _size(num_bytes: Any) -> str:
    from .stats import format_bytes

    return format_bytes(int(num_bytes or 0))


def _client(url: str, token: str | None, timeout_seconds: float):
    import httpx

    from .client import Client

    token = token if token is not None else os.environ.get("GPUSLEEP_TOKEN") or None
    return Client(url, control_token=token, timeout=httpx.Timeout(timeout_seconds, connect=TIMEOUT_SECONDS))


def _get_json(client: Any, path: str) -> Any | None:
    """The JSON of ``GET path``, or ``None`` when the server does not have it (any non-200 answer)."""
    response = client.get(path)
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _unreachable(url: str, exc: Exception) -> RemoteError:
    return RemoteError(
        f"cannot reach {url}: {exc or type(exc).__name__}. Is a server running there? Start one "
        "with `gpusleep serve`, or give its address with --url."
    )


def _metrics(client: Any) -> dict[str, list[tuple]]:
    """``GET /metrics`` as {name: [(labels, value), ...]}; empty when the server has none."""
    response = client.get("/metrics")
    if response.status_code != 200:
        return {}
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return {}
    samples: dict[str, list[tuple]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def read_status(url: str, token: str | None = None) -> dict:
    """What ``gpusleep status`` shows, as a dict (``--json`` prints it)."""
    import httpx

    try:
        with _client(url, token, TIMEOUT_SECONDS) as client:
            switch = _get_json(client, "/switch/status")
            if isinstance(switch, dict) and "backends" in switch:
                return {"url": url, "kind": "switch", **switch}
            response = client.get("/is_sleeping")
            if response.status_code == 404:
                raise RemoteError(
                    f"{url} has no GET /is_sleeping: it is not a server with sleep mode (gpusleep serve, "
                    "an app with gpusleep.server.install, or vLLM in dev mode)"
                )
            if response.status_code != 200:
                raise RemoteError(f"GET {url}/is_sleeping answered {response.status_code}: {response.text[:300]}")
            models = _get_json(client, "/v1/models") or {}
            version = _get_json(client, "/version") or {}
            metrics = _metrics(client)
    except httpx.TransportError as exc:
        raise _unreachable(url, exc) from exc
    level = next((int(v) for _, v in metrics.get("gpusleep_sleep_level", [])), None)
    tags: dict[str, dict] = {}
    for name, key in (
        ("gpusleep_tag_mapped_bytes", "mapped_bytes"),
        ("gpusleep_tag_asleep_bytes", "asleep_bytes"),
        ("gpusleep_tag_backed_up_bytes", "host_bytes"),
    ):
        for labels, value in metrics.get(name, []):
            tags.setdefault(labels.get("tag", "?"), {})[key] = int(value)
    return {
        "url": url,
        "kind": "server",
        "models": [m.get("id") for m in models.get("data", []) if isinstance(m, dict)],
        "version": version.get("version"),
        "is_sleeping": bool(response.json().get("is_sleeping")),
        "level": level,
        "in_flight_requests": next((int(v) for _, v in metrics.get("gpusleep_in_flight_requests", [])), None),
        "tags": tags,
    }


def format_status(status: dict) -> str:
    if status["kind"] == "switch":
        lines = [
            f"{status['url']}: gpusleep switch, {len(status['backends'])} backend(s)",
            f"{'MODEL':<24} {'STATE':<10} {'IN FLIGHT':>9} {'WAITING':>7}  URL",
        ]
        for b in status["backends"]:
            # The switch's own state (awake, asleep_l1, asleep_l2, stopped, starting, unknown) and why it moved;
            # an older switch only says awake or not (None: not known yet, or unreachable).
            state = b.get("state") or {True: "awake", False: "asleep"}.get(b["awake"], "unknown")
            lines.append(
                f"{b['model']:<24} {state:<10} {b['requests_in_flight']:>9} "
                f"{b['requests_waiting']:>7}  {b['url']}"
                + (f"  ({b['reason']})" if b.get("reason") else "")
                + (f"  (last error: {b['last_error']})" if b.get("last_error") else "")
            )
        return "\n".join(lines)
    state = "awake"
    if status["is_sleeping"]:
        state = f"asleep at level {status['level']}" if status["level"] else "asleep"
    models = ", ".join(m for m in status["models"] if m) or "(no /v1/models)"
    lines = [
        f"{status['url']}: {models}: {state}"
        + (f", {status['in_flight_requests']} request(s) running" if status["in_flight_requests"] else "")
    ]
    if status["tags"]:
        lines.append(f"{'TAG':<16} {'ON THE GPU':>12} {'RELEASED':>12} {'IN HOST MEMORY':>15}")
        for tag, figures in sorted(status["tags"].items()):
            lines.append(
                f"{tag:<16} {_size(figures.get('mapped_bytes')):>12} {_size(figures.get('asleep_bytes')):>12} "
                f"{_size(figures.get('host_bytes')):>15}"
            )
    return "\n".join(lines)


def _control(action: str, url: str, token: str | None, call) -> dict:
    import httpx

    from .client import ControlPlaneError

    try:
        with _client(url, token, CONTROL_TIMEOUT_SECONDS) as client:
            return call(client)
    except httpx.TransportError as exc:
        raise _unreachable(url, exc) from exc
    except ControlPlaneError as exc:
        hint = ""
        if exc.status_code == 401:
            hint = " Give the server's token with --token or the GPUSLEEP_TOKEN environment variable."
        elif exc.status_code == 404:
            hint = f" {url} has no sleep mode endpoints."
        raise RemoteError(f"{url} refused to {action}: {exc.server_message}{hint}") from exc


def do_sleep(url: str, level: int, mode: str | None = None, token: str | None = None) -> dict:
    return _control("sleep", url, token, lambda c: c.sleep(level, mode))


def do_wake(url: str, tags: Sequence[str] | None = None, token: str | None = None) -> dict:
    return _control("wake", url, token, lambda c: c.wake_up(list(tags) if tags else None))


def format_sleep(url: str, answer: dict) -> str:
    if answer.get("already_sleeping"):
        return f"{url}: already asleep at level {answer.get('level')}; nothing to do"
    return (
        f"{url}: asleep at level {answer.get('level')}: {_size(answer.get('bytes_offloaded'))} copied to host "
        f"memory, {_size(answer.get('bytes_freed'))} of GPU memory released in "
        f"{float(answer.get('sleep_seconds') or 0):.2f} s"
    )


def format_wake(url: str, answer: dict) -> str:
    if answer.get("already_awake"):
        return f"{url}: already awake; nothing to do"
    woken = ", ".join(answer.get("tags_woken") or []) or "everything"
    still = "; still asleep: other tags" if answer.get("is_sleeping") else ""
    return (
        f"{url}: woke {woken}: {_size(answer.get('bytes_restored'))} restored from host memory in "
        f"{float(answer.get('wake_seconds') or 0):.2f} s{still}"
    )


def run(command: str, args: Any, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``status``, ``sleep`` or ``wake`` with the parsed ``args``; returns the exit status. Prints to
    ``out`` and ``err`` (default: ``sys.stdout`` and ``sys.stderr`` at the time of the call)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    url = args.url.rstrip("/")
    try:
        if command == "status":
            answer = read_status(url, args.token)
            text = format_status(answer)
        elif command == "sleep":
            answer = do_sleep(url, args.level, args.mode, args.token)
            text = format_sleep(url, answer)
        else:
            tags = [t.strip() for group in (args.tags or []) for t in group.split(",") if t.strip()]
            answer = do_wake(url, tags, args.token)
            text = format_wake(url, answer)
    except RemoteError as exc:
        print(f"gpusleep {command}: {exc}", file=err)
        return 1
    print(json.dumps(answer, indent=2) if args.json else text, file=out)
    return 0
