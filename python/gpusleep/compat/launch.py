"""``python -m gpusleep.compat.launch [--peers torch_memory_saver,vllm] -- COMMAND [ARGS...]``: run an
unmodified engine on gpusleep (Note [Unmodified engines] in :mod:`gpusleep.compat.redirect`).

Examples::

    python -m gpusleep.compat.launch -- vllm serve Qwen/Qwen3-0.6B --enable-sleep-mode
    python -m gpusleep.compat.launch -- python -m sglang.launch_server --model-path ... --enable-memory-saver

It sets ``GPUSLEEP_COMPAT`` and puts gpusleep's ``sitecustomize`` first on ``PYTHONPATH``, then replaces
itself with the command; every Python process the command starts inherits both and redirects the
peers' imports to gpusleep. Setting the two variables by hand does the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .redirect import ENV_VAR, PEERS, _parse

__all__ = ["SITE_DIR", "environment", "main"]

#: The directory of gpusleep's ``sitecustomize`` (installs the redirect from ``GPUSLEEP_COMPAT``).
SITE_DIR = str(Path(__file__).resolve().parent / "_site")


def environment(peers: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (the process's when None) with the redirect of ``peers`` turned on."""
    env = dict(os.environ if environ is None else environ)
    env[ENV_VAR] = ",".join(peers)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE_DIR]
    env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, *parts])
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpusleep.compat.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="all", help=f"comma-separated: {', '.join(PEERS)}, or all (default)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        peers = _parse(args.peers)
    except ValueError as exc:
        parser.error(str(exc))
    os.execvpe(command[0], command, environment(peers))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
