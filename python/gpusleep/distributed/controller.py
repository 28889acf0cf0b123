"""The HTTP control plane of a multi-rank model: rank 0 serves ``/sleep`` and ``/wake_up``, every rank follows.

``ModelSleepController`` is a :class:`gpusleep.server.SleepController`: pass it to
``gpusleep.server.install(app, controller)`` on the rank that serves HTTP (group rank 0). Each of its
``sleep``/``wake_up`` calls first sends the command to the other ranks, which run :func:`follow` (a
loop, in their main thread or a thread of their own), then runs the collective with them. While idle it
sends a heartbeat command every ``heartbeat_seconds``, so a follower notices a dead rank 0 (and rank 0 a
dead follower) instead of waiting forever, and no collective waits longer than its timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .control_group import control_group
from .errors import RankFailure, RanksUnresponsiveError
from .exchange import CollectiveFailedError, exchange
from .protocol import DEFAULT_TIMEOUT_SECONDS, sleep, wake_up

__all__ = ["ModelSleepController", "follow"]

log = logging.getLogger("gpusleep.distributed")

_COMMAND_STEP = "command"


@dataclass(frozen=True)
class _Command:
    """What group rank 0 asks the other ranks to do next."""

    action: str  #: "sleep", "wake_up", "heartbeat" or "stop"
    level: int = 0
    tags: tuple[str, ...] | None = None


def _send(command: _Command | None, group, timeout_seconds: float) -> _Command:
    """Group rank 0 passes its command; the others pass None and get rank 0's."""
    commands = exchange(command, step=_COMMAND_STEP, group=group, timeout_seconds=timeout_seconds)
    return commands[0]


class ModelSleepController:
    """Rank 0's side of a multi-rank model's sleep mode, for ``gpusleep.server.install(app, controller)``.

    ``is_sleeping`` is the model's state: the protocol keeps every rank in the same state, so it is rank
    0's own, except after a failure that left some rank inconsistent, when it stays True (the 503 gate
    stays closed) until a sleep or wake succeeds on the whole model."""

    def __init__(
        self,
        alloc: Any,
        group: Any | None = None,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        heartbeat_seconds: float = 10.0,
        communicators: Sequence[Any] = (),
    ) -> None:
        import torch.distributed as dist

        group = control_group(group)  # refuses an NCCL group; None: a gloo group over the world's ranks
        if dist.get_rank(group) != 0:
            raise ValueError(
                "ModelSleepController runs on group rank 0; the other ranks call gpusleep.distributed.follow()"
            )
        self._alloc = alloc
        self._group = group
        self._communicators = tuple(communicators)
        self._timeout_seconds = float(timeout_seconds)
        self._heartbeat_seconds = float(heartbeat_seconds)
        self._lock = threading.Lock()  # one collective at a time: HTTP commands and heartbeats
        self._inconsistent = False
        self._broken: BaseException | None = None
        self._level = 0
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="gpusleep-heartbeat", daemon=True)
        self._heartbeat.start()

    # ------------------------------------------------------------ SleepController
    def sleep(self, level: int) -> Any:
        report = self._run(_Command("sleep", level=int(level)))
        self._level = int(level)
        return report

    def wake_up(self, tags: Sequence[str] | None = None) -> Any:
        return self._run(_Command("wake_up", tags=None if tags is None else tuple(tags)))

    @property
    def is_sleeping(self) -> bool:
        return self._inconsistent or bool(self._alloc.is_sleeping)

    @property
    def sleep_level(self) -> int:
        return self._level if self.is_sleeping else 0

    @property
    def known_tags(self) -> frozenset[str]:
        return frozenset(self._alloc.known_tags)

    def stats(self) -> Any:
        """Rank 0's own allocator statistics (the model's per-rank figures are in each report)."""
        return self._alloc.stats()

    def close(self) -> None:
        """Stop the heartbeat and tell the followers to return from :func:`follow`."""
        self._stopped.set()
        with self._lock:
            if self._broken is None:
                try:
                    _send(_Command("stop"), self._group, self._timeout_seconds)
                except CollectiveFailedError as error:
                    log.warning("gpusleep.distributed: could not tell the followers to stop: %s", error)
        self._heartbeat.join(timeout=self._heartbeat_seconds + self._timeout_seconds)

    # ------------------------------------------------------------------ internal
    def _run(self, command: _Command) -> Any:
        with self._lock:
            if self._broken is not None:
                raise RanksUnresponsiveError(
                    f"{command.action}: the process group broke earlier ({self._broken}); restart the model",
                    operation=command.action,
                )
            try:
                _send(command, self._group, self._timeout_seconds)
                if command.action == "sleep":
                    result = sleep(
                        self._alloc,
                        command.level,
                        self._group,
                        timeout_seconds=self._timeout_seconds,
                        communicators=self._communicators,
                    )
                else:
                    result = wake_up(
                        self._alloc,
                        command.tags,
                        self._group,
                        timeout_seconds=self._timeout_seconds,
                        communicators=self._communicators,
                    )
            except CollectiveFailedError as error:
                self._broken = error
                raise RanksUnresponsiveError(
                    f"{command.action}: the other ranks did not take the command: {error}. Nothing changed on this "
                    "rank; restart the model.",
                    operation=command.action,
                    failures=(RankFailure(0, "command", "CollectiveFailedError", str(error)),),
                ) from error
            except RanksUnresponsiveError as error:
                self._broken = error
                self._inconsistent = True
                raise
            except Exception as error:
                self._inconsistent = bool(getattr(error, "inconsistent_ranks", ()))
                raise
            self._inconsistent = False
            return result

    def _beat(self) -> None:
        while not self._stopped.wait(self._heartbeat_seconds):
            with self._lock:
                if self._broken is not None or self._stopped.is_set():
                    return
                try:
                    _send(_Command("heartbeat"), self._group, self._timeout_seconds)
                except CollectiveFailedError as error:
                    self._broken = error
                    log.error("gpusleep.distributed: a rank stopped answering heartbeats: %s", error)
                    return


def follow(
    alloc: Any,
    group: Any | None = None,
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    heartbeat_seconds: float = 10.0,
    communicators: Sequence[Any] = (),
) -> None:
    """The loop of every rank but group rank 0: take rank 0's commands and run the collectives with it.

    Returns when rank 0's controller is closed. Raises :class:`RanksUnresponsiveError` if rank 0 sends
    nothing (not even a heartbeat) for ``heartbeat_seconds + timeout_seconds``, or if a collective step
    times out; a failed sleep or wake that left every rank consistent is logged, and the loop goes on
    (rank 0 raised the same error to its HTTP client)."""
    import torch.distributed as dist

    group = control_group(group)  # refuses an NCCL group; None: a gloo group over the world's ranks
    if dist.get_rank(group) == 0:
        raise ValueError("follow() runs on the ranks other than group rank 0, which runs ModelSleepController")
    while True:
        try:
            command = _send(None, group, heartbeat_seconds + timeout_seconds)
        except CollectiveFailedError as error:
            raise RanksUnresponsiveError(
                f"follow: rank 0 sent no command or heartbeat: {error}. Restart the model.", operation="follow"
            ) from error
        if command.action == "stop":
            return
        if command.action == "heartbeat":
            continue
        try:
            if command.action == "sleep":
                sleep(alloc, command.level, group, timeout_seconds=timeout_seconds, communicators=communicators)
            else:
                wake_up(alloc, command.tags, group, timeout_seconds=timeout_seconds, communicators=communicators)
        except RanksUnresponsiveError:
            raise
        except Exception as error:  # rank 0 raised the same error to its caller; keep following
            log.warning("gpusleep.distributed: %s", error)
