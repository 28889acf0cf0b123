"""The HTTP answer of every exception the control plane may see (``controller_error_response``).

``tests/data/controller_error_answers.json`` holds the answers (status, Retry-After, body) recorded from the
former ``isinstance`` chain; the class-to-answer table must give the same ones. ``FORMER_ORDER`` is that chain's
order, so that any exception class of the package or of Python is checked, not only the recorded instances.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import json
import logging
import pathlib

import pytest

pytest.importorskip("starlette")

from gpusleep.distributed.errors import (  # noqa: E402
    CommunicatorsInconsistentError,
    DistributedSleepError,
    InvalidModelRequestError,
    ModelHostOutOfMemoryError,
    ModelOutOfMemoryError,
    RankFailure,
    RanksUnresponsiveError,
)
from gpusleep.errors import (  # noqa: E402
    CaptureInProgressError,
    CudaError,
    DriverUnavailableError,
    HostOutOfMemoryError,
    OutOfMemoryError,
    SleepStateError,
    WakeVerificationError,
)
from gpusleep.server.gate import DrainTimeoutError, TransitionInProgressError, UnknownTagsError  # noqa: E402
from gpusleep.server.responses import controller_error_response  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "data" / "controller_error_answers.json"
ACTION = "POST /sleep?level=1"


def examples() -> dict:
    """One or more instances of each kind of error, named."""
    oom_rank = RankFailure(1, "commit", "OutOfMemoryError", "no memory", 10 << 30, 2 << 30)
    host_rank = RankFailure(0, "prepare", "HostOutOfMemoryError", "no host memory", 5 << 30, 1 << 30)
    return {
        "drain_timeout": DrainTimeoutError(3, 2.5),
        "transition_sleeping": TransitionInProgressError("sleep", True, 2),
        "transition_awake": TransitionInProgressError("wake_up", False, 0),
        "unknown_tags": UnknownTagsError(frozenset({"x", "a"}), frozenset({"weights", "kv_cache"})),
        "host_oom": HostOutOfMemoryError("cuMemHostAlloc refused", 5 << 30, 1 << 30, "cgroup"),
        "host_oom_unlimited": HostOutOfMemoryError("refused", 7, None, ""),
        "gpu_oom": OutOfMemoryError("cuMemCreate: out of memory", 10 << 30, 3 << 30, 1),
        "memory_error": MemoryError("std::bad_alloc"),
        "memory_error_empty": MemoryError(),
        "driver_unavailable": DriverUnavailableError("sleep mode needs a CUDA device"),
        "wake_verification": WakeVerificationError(
            "2 block(s) differ", ["weights"], [("weights", 0x7F0000000000 + i * (4 << 20), 4 << 20) for i in range(20)]),
        "wake_verification_damaged": WakeVerificationError("host copy damaged", ["weights"], [], True),
        "capture": CaptureInProgressError("a capture is in progress"),
        "sleep_state": SleepStateError("tag 'weights' is asleep"),
        "value": ValueError("level must be 1 or 2"),
        "cuda": CudaError("cuMemUnmap failed", 1, "CUDA_ERROR_INVALID_VALUE"),
        "runtime": RuntimeError("boom"),
        "key": KeyError("k"),
        "timeout": TimeoutError("slow"),
        "model_oom": ModelOutOfMemoryError("rank 1 ran out", operation="wake_up", failures=(oom_rank,)),
        "model_host_oom": ModelHostOutOfMemoryError("rank 0 could not pin", operation="sleep", failures=(host_rank,)),
        "model_invalid": InvalidModelRequestError("rank 0: unknown tag", operation="wake_up"),
        "ranks_unresponsive": RanksUnresponsiveError("rank 3 did not answer", operation="sleep"),
        "communicators": CommunicatorsInconsistentError("ncclCommSuspend failed", operation="sleep"),
        "distributed": DistributedSleepError("rank 2 failed", operation="sleep"),
    }


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def answer(exc: BaseException) -> dict:
    """The answer to ``exc``, and what the server log got: (level, message, with a traceback)."""
    logger = logging.getLogger("gpusleep.server")
    handler = _Records()
    logger.addHandler(handler)
    try:
        response = controller_error_response(exc, ACTION)
    finally:
        logger.removeHandler(handler)
    return {"status": response.status_code, "retry_after": response.headers.get("retry-after"),
            "body": json.loads(response.body),
            "log": [[r.levelname, r.getMessage(), r.exc_info is not None] for r in handler.records]}


def test_every_error_gets_the_recorded_answer():
    golden = json.loads(GOLDEN.read_text())
    current = {name: answer(exc) for name, exc in examples().items()}
    assert current.keys() == golden.keys()
    for name in golden:
        assert current[name] == golden[name], name
