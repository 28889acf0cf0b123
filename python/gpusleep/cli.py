"""The ``gpusleep`` command. ``gpusleep serve``: the demo OpenAI-compatible server with sleep mode.
``gpusleep switch``: one OpenAI-compatible front door for several model servers on one GPU.
``gpusleep status|sleep|wake``: the control plane of a running server (remote.py). ``gpusleep doctor``: this
machine's GPU and driver. ``gpusleep --version``.

Bad values and unknown flags are usage errors (the subcommand's usage, a message and exit status 2); so is what
cannot start: a port already in use (found before the model is built) or a sleep-mode option on a server without
sleep mode. A missing dependency names the extra that brings it (exit status 1). Never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from typing import Any

from . import __version__

__all__ = ["main", "build_parser", "missing_modules", "SERVE_MODULES", "SWITCH_MODULES"]

log = logging.getLogger("gpusleep.cli")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

# What `gpusleep serve` imports, with the distribution that provides each; all come with gpusleep[serve].
SERVE_MODULES = {
    "torch": "torch",
    "numpy": "numpy",
    "fastapi": "fastapi",
    "starlette": "starlette",
    "pydantic": "pydantic",
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus-client",
}


def missing_modules(modules: dict[str, str]) -> list[str]:
    """The distributions of ``modules`` (import name -> distribution) that cannot be imported here."""
    return [dist for name, dist in modules.items() if importlib.util.find_spec(name) is None]


def _number(
    parse: Callable[[str], Any], not_a: str, valid: Callable[[Any], bool], invalid: Callable[[Any], str]
) -> Callable[[str], Any]:
    """An argparse type: ``parse`` the text (``not_a`` says what it should have been), then check it
    with ``valid`` (``invalid(value)`` says what is wrong and what to give instead)."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(not_a.format(text=repr(text))) from None
        if not valid(value):
            raise argparse.ArgumentTypeError(invalid(value))
        return value

    return convert


_port = _number(
    int,
    "not a port number: {text} (give an integer from 1 to 65535)",
    lambda v: 1 <= v <= 65535,
    lambda v: f"port {v} is out of range (give an integer from 1 to 65535)",
)
_positive_seconds = _number(
    float,
    "not a number of seconds: {text}",
    lambda v: math.isfinite(v) and v > 0,
    lambda v: f"{v:g} seconds: give a finite number greater than 0",
)
_seed = _number(
    int,
    "not an integer seed: {text}",
    lambda v: 0 <= v < 2**63,
    lambda v: f"seed {v} is out of range (give an integer from 0 to 2**63-1)",
)
_body_bytes = _number(
    int,
    "not a number of bytes: {text} (e.g. 33554432 for 32 MiB)",
    lambda v: v >= 1,
    lambda v: f"{v} bytes: give a whole number of bytes greater than 0",
)
_extra_gib = _number(
    float,
    "not a number of GiB: {text} (e.g. 8 or 0.5)",
    lambda v: math.isfinite(v) and v >= 0,
    lambda v: f"{v:g} GiB: give a finite number of GiB, 0 or more",
)


_device = _number(
    int,
    "not a device ordinal: {text} (give 0, 1, ...)",
    lambda v: v >= 0,
    lambda v: f"device {v}: give 0 or a larger ordinal",
)
_round_trip_gib = _number(
    float,
    "not a number of GiB: {text} (e.g. 2 or 0.5)",
    lambda v: math.isfinite(v) and v > 0,
    lambda v: f"{v:g} GiB: give a finite number of GiB greater than 0",
)


#: Units of a size on the command line: binary, as docs/host-tiers.md and ``format_bytes`` write them.
SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")


def _size_bytes(text: str) -> int:
    """A size such as ``40GiB``, ``512MiB``, ``1.5GiB`` or ``4096`` (bytes), as a whole number of bytes > 0.
    Decimal units (``GB``) are refused rather than guessed."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (give bytes or a binary unit: 40GiB, 512MiB, 64KiB, 4096)"
        )
    num_bytes = int(float(match.group(1)) * SIZE_UNITS[match.group(2)])
    if num_bytes < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is 0 bytes: give a size greater than 0")
    if num_bytes >= 1 << 63:
        raise argparse.ArgumentTypeError(f"{text!r} is too large: give less than 8 EiB")
    return num_bytes


#: The tags of the demo model, which ``--host-tier`` may name.
DEMO_TAGS = ("weights", "kv_cache")


def _tag_tier(text: str) -> tuple[str, str]:
    from .allocator import HOST_TIERS

    tag, equals, tier = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"{text!r}: give TAG=TIER, e.g. weights=pageable")
    if tag not in DEMO_TAGS:
        raise argparse.ArgumentTypeError(f"tag {tag!r}: the demo model's tags are {' or '.join(DEMO_TAGS)}")
    if tier not in HOST_TIERS:
        raise argparse.ArgumentTypeError(
            f"host tier {tier!r}: give {', '.join(HOST_TIERS[:-1])} or {HOST_TIERS[-1]} (docs/host-tiers.md)"
        )
    return tag, tier


def _file_dir(text: str) -> str:
    if not text.strip() or (os.path.exists(text) and not os.path.isdir(text)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a directory path (give a directory on a local disk; it is created if missing)"
        )
    return text


def _host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"not a host address: {text!r} (e.g. 127.0.0.1, 0.0.0.0 or ::1)")
    return text


def _model_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory (give a local Hugging Face model directory)")
    return text


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) <= len("https://") or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"not a server URL: {text!r} (e.g. http://127.0.0.1:8000)")
    return text


def _idle_level(text: str) -> int:
    if text not in ("1", "2"):
        raise argparse.ArgumentTypeError(f"sleep level {text!r}: give 1 (weights kept in host memory) or 2 (discarded)")
    return int(text)


def _config_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a file (give the switch's configuration file: TOML, or YAML ending in .yaml or .yml)"
        )
    return text


def _token(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the token is empty (omit --token to leave the control endpoints open)")
    return text


def _served_model_name(text: str) -> str:
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError("the model name is empty or starts or ends with whitespace")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpusleep", description="Sleep mode for GPU model servers.")
    parser.add_argument("--version", action="version", version=f"gpusleep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the demo OpenAI-compatible server with sleep mode",
        description=(
            "Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/embeddings, "
            "/tokenize, /detokenize, /v1/models) with the sleep-mode endpoints (/sleep, /wake_up, "
            "/is_sleeping, /metrics). Without --model it serves an embedded tiny transformer with "
            'seeded weights: nothing to download. Needs the extra: pip install "gpusleep[serve]".'
        ),
    )
    serve.add_argument(
        "--host", type=_host, default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=_port, default=8000, help="port to bind, 1 to 65535 (default 8000)")
    serve.add_argument(
        "--model",
        metavar="DIR",
        type=_model_dir,
        default=None,
        help="local Hugging Face model directory (needs transformers)",
    )
    serve.add_argument(
        "--device",
        default="auto",  # checked by the demo runtime: exit 2 with a message
        help="'auto' (default: CUDA when present), 'cpu', 'cuda' or 'cuda:N'",
    )
    serve.add_argument(
        "--token",
        type=_token,
        default=None,
        help=(
            "bearer token required by POST /sleep and POST /wake_up (default: env GPUSLEEP_TOKEN; none: open). "
            "Prefer the environment variable: a token on the command line is visible to other users in ps"
        ),
    )
    serve.add_argument(
        "--served-model-name",
        type=_served_model_name,
        default=None,
        metavar="NAME",
        help="the model name clients send and /v1/models lists (default: gpusleep-tiny, or --model's folder name)",
    )
    serve.add_argument("--seed", type=_seed, default=0, help="seed of the embedded model's weights (default 0)")
    serve.add_argument(
        "--drain-timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long POST /sleep waits for running requests before giving up, > 0 (default 30)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_body_bytes,
        default=32 * 1024 * 1024,
        metavar="N",
        help="largest request body accepted, bytes; a larger one is answered 413 (default 33554432: 32 MiB)",
    )
    serve.add_argument(
        "--idle-sleep",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="put the model to sleep after this long without a model request, > 0 (default: never)",
    )
    serve.add_argument(
        "--idle-level",
        type=_idle_level,
        default=1,
        metavar="1|2",
        help="sleep level of --idle-sleep: 1 keeps the weights in host memory, 2 discards them (default 1)",
    )
    serve.add_argument(
        "--wake-on-request",
        action="store_true",
        help="a model request that finds the model asleep wakes it and is served (default: the spec's 503)",
    )
    serve.add_argument(
        "--extra-weights-gib",
        type=_extra_gib,
        default=0.0,
        metavar="GIB",
        help="GiB of seeded extra weights, unused by the model, allocated with its weights and checked after "
        "every wake, so that sleep and wake move model-sized memory (switch benchmarks); needs CUDA "
        "(default 0)",
    )
    serve.add_argument(
        "--keep-host-copy",
        action="store_true",
        help="keep the weights' host copy after a wake, so that the next level-1 sleep of the unchanged "
        "weights only unmaps them instead of copying them out again (fast model switches); needs CUDA",
    )
    serve.add_argument(
        "--reserve-host-memory",
        action="store_true",
        help="pin the host memory a level-1 sleep needs at start, so that the first sleep is as fast as the "
        "next ones (it stays pinned, as it does after a first sleep); needs CUDA",
    )
    tiers = serve.add_argument_group(
        "host tiers", "where level-1 sleeps keep the host copies (docs/host-tiers.md); all need sleep mode"
    )
    tiers.add_argument(
        "--pinned-budget",
        type=_size_bytes,
        default=None,
        metavar="SIZE",
        help="the most pinned memory the host copies may hold, e.g. 40GiB; the rest goes to the next tier "
        "(pageable, then file), least recently woken tags first (default: no limit)",
    )
    tiers.add_argument(
        "--pageable-budget",
        type=_size_bytes,
        default=None,
        metavar="SIZE",
        help="the most pageable memory the host copies may hold, e.g. 512MiB (default: no limit)",
    )
    tiers.add_argument(
        "--file-dir",
        type=_file_dir,
        default=None,
        metavar="DIR",
        help="a directory on a local disk for the file tier (created 0700 if missing; default: no file tier)",
    )
    tiers.add_argument(
        "--staging-size",
        type=_size_bytes,
        default=None,
        metavar="SIZE",
        help="one slot of the pinned staging ring that pageable and file copies move through (default 16MiB)",
    )
    tiers.add_argument(
        "--host-tier",
        type=_tag_tier,
        action="append",
        default=None,
        metavar="TAG=TIER",
        help="offload TAG (weights or kv_cache) at level 1 into TIER (pinned, pageable or file) first, e.g. "
        "--host-tier weights=pageable; repeat for each tag (default: weights pinned, kv_cache discarded)",
    )
    serve.add_argument(
        "--simulate-gpu",
        action="store_true",
        help="run on a SIMULATED GPU (host memory, no NVIDIA GPU needed; default: env GPUSLEEP_SIMULATE_GPU): the "
        "weights live in simulated device memory and really move on sleep and wake, the model computes on the "
        "CPU; every log line and answer says so. For trying sleep mode, not for serving",
    )
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (default info)")
    switch = sub.add_parser(
        "switch",
        help="run a front door that switches one GPU between several model servers",
        description=(
            "Serve an OpenAI-compatible API in front of several model servers that speak the sleep-mode "
            'HTTP API (gpusleep serve, vLLM in dev mode, ...). Requests are routed by their "model"; the '
            "switch puts the other backends to sleep and wakes the wanted one as needed. The backends are "
            'listed in a TOML (or YAML) file: see docs/switching.md. Needs the extra: pip install "gpusleep[server]".'
        ),
    )
    switch.add_argument(
        "--config",
        required=True,
        type=_config_file,
        metavar="FILE",
        help="the switch's configuration file: TOML, or YAML if it ends in .yaml or .yml (needs PyYAML)",
    )
    switch.add_argument(
        "--host", type=_host, default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    switch.add_argument("--port", type=_port, default=8000, help="port to bind, 1 to 65535 (default 8000)")
    switch.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (default info)")
    doctor = sub.add_parser(
        "doctor",
        help="check this machine's driver and GPU and a sleep/wake round trip on it (under a minute)",
        description=(
            "Read the driver and the GPU (version, VMM, granularity, RDMA and host-register support, host NUMA "
            "node, peers), put a few GiB through level-1 and level-2 sleeps and wakes (pinned copy GB/s, every "
            "byte compared, GPU memory freed as measured), and, where PyTorch has CUDA, the same in pool and "
            "global mode with a CUDA graph replayed after the wake. Exit status 0: everything holds; 1: a check "
            "failed; 3: no GPU."
        ),
    )
    doctor.add_argument("--device", type=_device, default=0, help="CUDA device ordinal (default 0)")
    doctor.add_argument(
        "--size-gib",
        type=_round_trip_gib,
        default=None,
        help="GiB for the round trips, at most a quarter of the free memory is used (default 2; "
        "0.25 on the simulated GPU)",
    )
    doctor.add_argument(
        "--simulate-gpu",
        action="store_true",
        help="check the SIMULATED GPU (host memory, default: env GPUSLEEP_SIMULATE_GPU) instead of a "
        "real one: shows what the checks look like on a machine without an NVIDIA GPU",
    )
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")
    doctor.add_argument("--json-out", metavar="FILE", help="also write the checks as JSON to FILE")
    doctor.add_argument("--no-torch", action="store_true", help="skip the PyTorch pool and global mode checks")
    _add_remote_commands(sub)
    return parser


def _add_remote_commands(sub: Any) -> None:
    """``gpusleep status``, ``sleep`` and ``wake``: calls to a running server's control plane (remote.py)."""
    from .remote import DEFAULT_URL

    url_default = os.environ.get("GPUSLEEP_URL") or DEFAULT_URL
    commands = {
        "status": (
            "show whether a running server sleeps, and what its memory is (or a switch's backends)",
            "Read GET /is_sleeping, /v1/models and /metrics of a running server (gpusleep serve, an app with "
            "gpusleep.server.install, vLLM in dev mode), or GET /switch/status of a gpusleep switch, and "
            "print its state. Exit status 0, or 1 when the server cannot be reached.",
        ),
        "sleep": (
            "put a running server's model to sleep (POST /sleep)",
            "Put the model of a running server to sleep: level 1 keeps the weights in host memory, level 2 "
            "discards them. Prints what was released. Exit status 0, or 1 when refused (the reason is printed).",
        ),
        "wake": (
            "wake a running server's model (POST /wake_up)",
            "Wake the model of a running server, all of it or only --tags. Prints what was restored. Exit "
            "status 0, or 1 when refused (the reason is printed).",
        ),
    }
    for name, (summary, description) in commands.items():
        p = sub.add_parser(name, help=summary, description=description + ' Needs: pip install "gpusleep[server]".')
        p.add_argument(
            "--url",
            type=_url,
            default=url_default,
            help=f"the server's address (default: env GPUSLEEP_URL, else {DEFAULT_URL})",
        )
        p.add_argument(
            "--token",
            type=_token,
            default=None,
            help="bearer token of the control endpoints (default: env GPUSLEEP_TOKEN)",
        )
        p.add_argument("--json", action="store_true", help="print the server's answer as JSON")
        if name == "sleep":
            p.add_argument(
                "--level",
                type=_idle_level,
                default=1,
                metavar="1|2",
                help="1 keeps the weights in host memory, 2 discards them (default 1)",
            )
            p.add_argument(
                "--mode",
                choices=("wait", "abort"),
                default=None,
                help="wait for the running requests (the server's default) or abort them",
            )
        if name == "wake":
            p.add_argument(
                "--tags",
                action="append",
                metavar="TAG[,TAG]",
                help="wake only these tags, e.g. --tags weights then --tags kv_cache (default: all)",
            )


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, ready for uvicorn: a busy port is found before anything is built.
    Raises ``OSError`` with the reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
        sock.bind((host, port))
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _listen_or_say_why(command: str, host: str, port: int) -> socket.socket | None:
    try:
        return listen(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = (
                f" Another server listens there (`gpusleep status --url http://{_url_host(host)}:{port}` says "
                "which); stop it or choose another --port."
            )
        print(f"gpusleep {command}: cannot listen on {host} port {port}: {reason}.{hint}", file=sys.stderr)
        return None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _serve_with(app: Any, sock: socket.socket, log_level: str, simulated: bool = False) -> None:
    import uvicorn

    log_config: Any = uvicorn.config.LOGGING_CONFIG
    if simulated:  # uvicorn's own lines (startup, access log) say it too
        import copy

        from .simulated_gpu import LABEL

        log_config = copy.deepcopy(log_config)
        for formatter in log_config.get("formatters", {}).values():
            if "fmt" in formatter:
                formatter["fmt"] = f"[{LABEL}] " + formatter["fmt"]
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, log_config=log_config)).run(sockets=[sock])


#: ``gpusleep serve`` options that only mean something with sleep mode (a GPU, or the simulated one).
SLEEP_MODE_OPTIONS = (
    ("--idle-sleep", lambda a: a.idle_sleep is not None),
    ("--wake-on-request", lambda a: a.wake_on_request),
    ("--extra-weights-gib", lambda a: a.extra_weights_gib > 0),
    ("--keep-host-copy", lambda a: a.keep_host_copy),
    ("--reserve-host-memory", lambda a: a.reserve_host_memory),
    ("--pinned-budget", lambda a: a.pinned_budget is not None),
    ("--pageable-budget", lambda a: a.pageable_budget is not None),
    ("--file-dir", lambda a: a.file_dir is not None),
    ("--staging-size", lambda a: a.staging_size is not None),
    ("--host-tier", lambda a: bool(a.host_tier)),
)


def allocator_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`gpusleep.Allocator` keywords of ``gpusleep serve``'s host-tier flags (only those given)."""
    given = {
        "pinned_budget_bytes": args.pinned_budget,
        "pageable_budget_bytes": args.pageable_budget,
        "file_dir": args.file_dir,
        "staging_bytes": args.staging_size,
    }
    return {key: value for key, value in given.items() if value is not None}


def serve(args: argparse.Namespace) -> int:
    missing = missing_modules(SERVE_MODULES)
    if missing:
        print(
            f"gpusleep serve: missing {', '.join(missing)}. Install the server's dependencies with "
            f'pip install "gpusleep[serve]" (without a GPU, the CPU build of torch is enough).',
            file=sys.stderr,
        )
        return 1

    sock = _listen_or_say_why("serve", args.host, args.port)  # before torch and the model: a busy port fails at once
    if sock is None:
        return 2
    try:
        from .demo import build_runtime, create_app, resolve_device, sleep_mode_supported
        from .server import SleepModeOptions

        simulate = args.simulate_gpu or _simulation_requested()
        _configure_logging(args.log_level, simulate)
        simulated = None
        if simulate:
            if args.device not in ("auto", "cpu"):
                print(
                    f"gpusleep serve: --device {args.device} and --simulate-gpu: on the simulated GPU the model "
                    "computes on the CPU and its weights live on simulated device 0; leave --device out.",
                    file=sys.stderr,
                )
                return 2
            simulated = _enable_simulated_gpu("serve")
            if simulated is None:
                return 2
        try:
            device = resolve_device("cpu" if simulate else args.device)
        except (RuntimeError, ValueError) as exc:
            print(f"gpusleep serve: {exc}", file=sys.stderr)
            return 2
        needs_sleep_mode = [flag for flag, given in SLEEP_MODE_OPTIONS if given(args)]
        if needs_sleep_mode and not sleep_mode_supported(device):
            print(
                f"gpusleep serve: {', '.join(needs_sleep_mode)} {'is' if len(needs_sleep_mode) == 1 else 'are'} "
                f"for sleep mode, which needs a CUDA device; this server would run on {device}. Start it with "
                "--device cuda on a machine with an NVIDIA GPU, or leave them out (or try them on a simulated "
                "GPU with --simulate-gpu).",
                file=sys.stderr,
            )
            return 2
        try:
            runtime = build_runtime(
                args.model,
                str(device),
                seed=args.seed,
                extra_weights_bytes=int(args.extra_weights_gib * (1 << 30)) // 4 * 4,
                keep_host_copy=args.keep_host_copy,
                reserve_host_memory=args.reserve_host_memory,
                allocator_options=allocator_options(args),
                host_tiers=dict(args.host_tier or ()),
            )
        except (RuntimeError, OSError, ValueError) as exc:  # bad --model / --device: say why, no traceback
            print(f"gpusleep serve: {exc}", file=sys.stderr)
            return 2
        if args.served_model_name is not None:
            runtime.engine.model_name = args.served_model_name
        options = SleepModeOptions(
            control_token=args.token,
            drain_timeout_seconds=args.drain_timeout,
            max_body_bytes=args.max_body_bytes,
            idle_sleep_seconds=args.idle_sleep,
            idle_sleep_level=args.idle_level,
            wake_on_request=args.wake_on_request,
        )
        app = create_app(runtime.engine, runtime.controller, options, simulated_gpu=simulated)
        token_on = options.resolved_token() is not None
        log.info(
            "serving %s on %s, http://%s:%d; sleep mode %s; control endpoints %s",
            runtime.engine.model_name,
            runtime.where,
            _url_host(args.host),
            args.port,
            "on" if runtime.sleep_mode_available else "unavailable (needs a CUDA device)",
            "need a bearer token" if token_on else "open (set --token or GPUSLEEP_TOKEN in production)",
        )
        if args.host not in ("127.0.0.1", "localhost", "::1") and not token_on:
            log.warning(
                "binding %s without a control token: anyone who reaches it can put the model to sleep", args.host
            )
        _serve_with(app, sock, args.log_level, simulate)
    finally:
        sock.close()
    return 0


def _simulation_requested() -> bool:
    from . import simulated_gpu

    return simulated_gpu.requested_by_environment()


def _log_format(simulated: bool) -> str:
    from .simulated_gpu import LABEL

    label = f" [{LABEL}]" if simulated else ""
    return f"%(asctime)s %(levelname)s %(name)s{label}: %(message)s"


def _configure_logging(level: str, simulated: bool) -> None:
    logging.basicConfig(level=level.upper(), format=_log_format(simulated))


def _enable_simulated_gpu(command: str) -> Any | None:
    """The simulated GPU of this process, or None after saying why it cannot be used."""
    from . import simulated_gpu

    try:
        return simulated_gpu.enable()
    except (simulated_gpu.SimulatedGpuUnavailableError, ValueError, RuntimeError) as exc:
        print(f"gpusleep {command}: cannot use the simulated GPU: {exc}", file=sys.stderr)
        return None


# What `gpusleep switch` imports (no torch: the switch never touches a GPU).
SWITCH_MODULES = {name: dist for name, dist in SERVE_MODULES.items() if name not in ("torch", "numpy")}
SWITCH_MODULES["httpx"] = "httpx"


def switch(args: argparse.Namespace) -> int:
    missing = missing_modules(SWITCH_MODULES)
    if missing:
        print(
            f"gpusleep switch: missing {', '.join(missing)}. Install them with "
            'pip install "gpusleep[server]" (no torch needed).',
            file=sys.stderr,
        )
        return 1

    from .switch import ConfigError, create_switch_app, load_config

    _configure_logging(args.log_level, False)
    try:
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"gpusleep switch: {exc}", file=sys.stderr)
        return 2
    budget = config.gpu_memory_budget_bytes
    log.info(
        "switching %d backend(s) (%s) on http://%s:%d; %s awake",
        len(config.backends),
        ", ".join(b.model for b in config.backends),
        args.host,
        args.port,
        f"at most {budget} bytes" if budget is not None else "one backend",
    )
    sock = _listen_or_say_why("switch", args.host, args.port)
    if sock is None:
        return 2
    try:
        _serve_with(create_switch_app(config), sock, args.log_level)
    finally:
        sock.close()
    return 0


def doctor(args: argparse.Namespace) -> int:
    from . import doctor as checks

    size_gib = args.size_gib
    if args.simulate_gpu or _simulation_requested():
        _configure_logging("warning", True)
        if _enable_simulated_gpu("doctor") is None:
            return 3  # as without a GPU
        size_gib = 0.25 if size_gib is None else size_gib
    argv = ["--device", str(args.device), "--size-gib", str(2.0 if size_gib is None else size_gib)]
    argv += ["--json"] if args.json else []
    argv += ["--json-out", args.json_out] if args.json_out else []
    argv += ["--no-torch"] if args.no_torch else []
    return checks.main(argv)


def remote(args: argparse.Namespace) -> int:
    missing = missing_modules({"httpx": "httpx"})
    if missing:
        print(
            f'gpusleep {args.command}: missing httpx. Install it with pip install "gpusleep[server]".', file=sys.stderr
        )
        return 1
    from .remote import run

    return run(args.command, args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve,
    "switch": switch,
    "doctor": doctor,
    "status": remote,
    "sleep": remote,
    "wake": remote,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's: it lists the flags that do exist
        _subcommand(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve" and args.file_dir is None:
        on_file = [tag for tag, tier in args.host_tier or () if tier == "file"]
        if on_file:
            _subcommand(parser, "serve").error(
                f"--host-tier {on_file[0]}=file needs --file-dir DIR (a directory on a local disk for the file tier)"
            )
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
