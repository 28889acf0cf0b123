"""Backends that ``gpusleep switch`` starts itself (a ``command`` in their configuration).

Note [Launched backends]
    The switch starts a launched backend when it is first needed, under the router's lock and after the
    sleeps that make room for its ``gpu_memory_bytes``, so that the engine's own start-up check (vLLM's
    "free memory on device ... is less than desired", SGLang's ``--mem-fraction-static``) sees the free GPU
    it expects: the tenants of a GPU start one after the other, never over each other. Start-up is done when
    ``GET url + ready_path`` answers 200, at most ``ready_timeout_seconds`` later; a process that exits first, or is
    not ready by then, is stopped and the start fails with the exit status and the end of its log.

    Each process runs in its own session (process group), its stdout and stderr appended to its log file,
    so that stopping it (SIGTERM to the group, SIGKILL after ``stop_timeout_seconds``) also stops the workers an
    engine spawns. The switch stops every process it started when it shuts down (SIGTERM or Ctrl-C); a
    switch killed with SIGKILL cannot, and leaves them running.

    A process that exits without being asked is a crash: the router marks the backend stopped and starts it
    again after a back-off (router.py, Note [Restarts]).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import IO

import anyio
import httpx

from .._renamed import renamed_attributes
from ..errors import GpusleepError
from .config import BackendConfig

__all__ = ["LaunchError", "ManagedProcess"]

log = logging.getLogger("gpusleep.switch")

#: How often readiness is polled, seconds.
READY_POLL_SECONDS = 0.05
READY_POLL_S = READY_POLL_SECONDS  #: the former spelling
#: How much of a failed backend's log an error message shows, characters.
LOG_TAIL_CHARS = 2000


class LaunchError(RuntimeError, GpusleepError):
    """A launched backend did not become ready; the message says why and ends with its log's last lines."""


@renamed_attributes({"stop_timeout_s": "stop_timeout_seconds"})
class ManagedProcess:
    """One launched backend's process. Methods run on the switch's event loop."""

    def __init__(self, config: BackendConfig, log_path: str, stop_timeout_seconds: float) -> None:
        assert config.command is not None
        self.config = config
        self.log_path = log_path
        self.stop_timeout_seconds = stop_timeout_seconds
        self.process: asyncio.subprocess.Process | None = None
        #: Set while the switch itself stops the process (its exit is then no crash).
        self.stopping = False
        self.started_monotonic = 0.0
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, client: httpx.AsyncClient) -> None:
        """Start the command and wait for its readiness; :class:`LaunchError` (process stopped) otherwise."""
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(
            f"\n=== gpusleep switch: starting {list(self.config.command or ())} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode()
        )
        self._log.flush()
        env = {**os.environ, **dict(self.config.env)}
        self.stopping = False
        try:
            self.process = await asyncio.create_subprocess_exec(
                *(self.config.command or ()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise LaunchError(f"could not start {list(self.config.command or ())}: {exc}") from None
        self.started_monotonic = time.monotonic()
        log.info(
            "%s: started pid %d (%s); log %s",
            self.config.model,
            self.process.pid,
            " ".join(self.config.command or ()),
            self.log_path,
        )
        try:
            await self._wait_ready(client)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop()
            raise

    async def _wait_ready(self, client: httpx.AsyncClient) -> None:
        url = self.config.url + self.config.ready_path
        deadline = time.monotonic() + self.config.ready_timeout_seconds
        last = "no answer yet"
        while True:
            assert self.process is not None
            if self.process.returncode is not None:
                raise LaunchError(
                    f"the process exited with status {self.process.returncode} before it was ready "
                    f"({url}); log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                answer = await client.get(url, timeout=httpx.Timeout(5.0))
                if answer.status_code == 200:
                    log.info("%s: ready after %.1f s", self.config.model, time.monotonic() - self.started_monotonic)
                    return
                last = f"HTTP {answer.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"not ready after {self.config.ready_timeout_seconds:g} s (GET {url}: {last}); raise "
                    f"ready_timeout_seconds if it needs longer; log {self.log_path}:\n{self.log_tail()}"
                )
            await anyio.sleep(READY_POLL_SECONDS)

    async def wait(self) -> int:
        """The process's exit status, once it has exited."""
        assert self.process is not None
        return await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after ``stop_timeout_seconds``; returns once the process is gone."""
        process = self.process
        if process is None:
            return
        self.stopping = True
        if process.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                with anyio.fail_after(self.stop_timeout_seconds):
                    await process.wait()
            except TimeoutError:
                log.warning(
                    "%s: pid %d did not exit %g s after SIGTERM; killing it",
                    self.config.model,
                    process.pid,
                    self.stop_timeout_seconds,
                )
                self._signal(signal.SIGKILL)
                await process.wait()
        # The engine's workers in its group: whatever the leader left behind goes too.
        self._signal(signal.SIGKILL)
        self._close_log()
        log.info("%s: pid %d stopped (status %s)", self.config.model, process.pid, process.returncode)

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)  # its own session: the group id is its pid
        except (ProcessLookupError, PermissionError):
            pass

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_CHARS))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
