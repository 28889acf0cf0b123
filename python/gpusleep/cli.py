"""The ``gpusleep`` command. ``gpusleep serve``: the demo OpenAI-compatible server with sleep mode."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]

log = logging.getLogger("gpusleep.cli")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpusleep", description="Sleep mode for GPU model servers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the demo OpenAI-compatible server with sleep mode",
        description=(
            "Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/embeddings, "
            "/tokenize, /detokenize, /v1/models) with the sleep-mode endpoints (/sleep, /wake_up, "
            "/is_sleeping, /metrics). Without --model it serves an embedded tiny transformer with "
            "seeded weights: nothing to download."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    serve.add_argument("--model", metavar="DIR", default=None, help="local Hugging Face model directory (needs transformers)")
    serve.add_argument("--device", default="auto", help="'auto' (default: CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    serve.add_argument(
        "--token",
        default=None,
        help=(
            "bearer token required by POST /sleep and POST /wake_up (default: env GPUSLEEP_TOKEN; none: open). "
            "Prefer the environment variable: a token on the command line is visible to other users in ps"
        ),
    )
    serve.add_argument("--seed", type=int, default=0, help="seed of the embedded model's weights (default 0)")
    serve.add_argument(
        "--drain-timeout", type=float, default=30.0, metavar="SECONDS",
        help="how long POST /sleep waits for running requests before giving up (default 30)",
    )
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (default info)")
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .demo import build_runtime, create_app
    from .server import SleepModeOptions

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runtime = build_runtime(args.model, args.device, seed=args.seed)
    except (RuntimeError, OSError, ValueError) as exc:  # bad --model / --device: say why, no traceback
        print(f"gpusleep serve: {exc}", file=sys.stderr)
        return 2
    options = SleepModeOptions(control_token=args.token, drain_timeout_s=args.drain_timeout)
    app = create_app(runtime.engine, runtime.controller, options)
    token_on = options.resolved_token() is not None
    log.info(
        "serving %s on %s, http://%s:%d; sleep mode %s; control endpoints %s",
        runtime.engine.model_name,
        runtime.device,
        args.host,
        args.port,
        "on" if runtime.sleep_mode_available else "unavailable (needs a CUDA device)",
        "need a bearer token" if token_on else "open (set --token or GPUSLEEP_TOKEN in production)",
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token_on:
        log.warning("binding %s without a control token: anyone who reaches it can put the model to sleep", args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse refuses unknown commands


if __name__ == "__main__":
    sys.exit(main())
