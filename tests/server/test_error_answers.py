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
from gpusleep.server.responses import ERROR_ANSWERS, controller_error_response, error_answer_for  # noqa: E402

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "data" / "controller_error_answers.json"
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
            "2 block(s) differ", ["weights"], [("weights", 0x7F0000000000 + i * (4 << 20), 4 << 20) for i in range(20)]
        ),
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
    return {
        "status": response.status_code,
        "retry_after": response.headers.get("retry-after"),
        "body": json.loads(response.body),
        "log": [[r.levelname, r.getMessage(), r.exc_info is not None] for r in handler.records],
    }


def test_every_error_gets_the_recorded_answer():
    golden = json.loads(GOLDEN.read_text())
    current = {name: answer(exc) for name, exc in examples().items()}
    assert current.keys() == golden.keys()
    for name in golden:
        assert current[name] == golden[name], name


#: The former chain, in its order: the first class an exception is an instance of decides (status, type).
FORMER_ORDER = [
    (DrainTimeoutError, 409, "SleepTimeoutError"),
    (TransitionInProgressError, 409, "TransitionInProgressError"),
    (UnknownTagsError, 400, "UnknownTagError"),
    (HostOutOfMemoryError, 507, "InsufficientHostMemoryError"),
    (OutOfMemoryError, 409, "InsufficientMemoryError"),
    (MemoryError, 409, "InsufficientMemoryError"),
    (DriverUnavailableError, 501, "SleepModeUnavailableError"),
    (WakeVerificationError, 500, "WakeVerificationError"),
    (CaptureInProgressError, 409, "CaptureInProgressError"),
    (SleepStateError, 409, "SleepStateError"),
    (ValueError, 400, "BadRequestError"),
    (CudaError, 500, "CudaError"),
    (BaseException, 500, "SleepModeError"),
]

#: Modules whose exception classes may reach the control plane (what a controller or the server raises).
MODULES = [
    "gpusleep.errors",
    "gpusleep.distributed.errors",
    "gpusleep.distributed.exchange",
    "gpusleep.server.gate",
    "gpusleep.simulated_gpu",
    "gpusleep.torch_glue",
    "gpusleep.client",
    "gpusleep.remote",
    "gpusleep.switch.config",
    "gpusleep.switch.router",
    "gpusleep.switch.launcher",
    "gpusleep.switch.kinds",
    "gpusleep.demo.schemas",
    "gpusleep.demo.engine",
    "gpusleep.demo.extra_weights",
]


def exception_classes() -> list[type]:
    found = {c for c in vars(builtins).values() if isinstance(c, type) and issubclass(c, BaseException)}
    for name in MODULES:
        module = importlib.import_module(name)
        found |= {
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__.startswith("gpusleep")
        }
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


@pytest.mark.parametrize("cls", exception_classes(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_the_answer_of_each_class_is_the_former_chains(cls):
    status, error_type = next((s, t) for base, s, t in FORMER_ORDER if issubclass(cls, base))
    found = error_answer_for(cls)
    assert (found.status, found.type) == (status, error_type)


def test_the_table_follows_the_class_hierarchy():
    class Refused(SleepStateError):  # no entry of its own: its nearest base's
        pass

    class NoGpu(DriverUnavailableError):
        pass

    assert error_answer_for(Refused) is ERROR_ANSWERS[SleepStateError]
    assert error_answer_for(NoGpu) is ERROR_ANSWERS[DriverUnavailableError]
    assert error_answer_for(CaptureInProgressError) is ERROR_ANSWERS[CaptureInProgressError]
    assert error_answer_for(ModelOutOfMemoryError) is ERROR_ANSWERS[OutOfMemoryError]
    assert error_answer_for(KeyboardInterrupt) is ERROR_ANSWERS[BaseException]
    body = json.loads(controller_error_response(NoGpu("no libcuda"), ACTION).body)["error"]
    assert (body["code"], body["type"], body["message"]) == (501, "SleepModeUnavailableError", f"{ACTION}: no libcuda")


ROOTED_MODULES = ["gpusleep.errors", "gpusleep.distributed.errors", "gpusleep.server.gate"]


def test_the_exceptions_of_the_core_and_the_control_plane_share_one_root_and_keep_their_bases():
    import gpusleep

    classes = [
        c
        for name in ROOTED_MODULES
        for _, c in inspect.getmembers(importlib.import_module(name), inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == name
    ]
    assert len(classes) >= 16
    assert [c.__name__ for c in classes if not issubclass(c, gpusleep.GpusleepError)] == []
    kept = {
        OutOfMemoryError: (MemoryError, RuntimeError),
        HostOutOfMemoryError: (MemoryError, RuntimeError),
        CudaError: (RuntimeError,),
        DriverUnavailableError: (CudaError,),
        SleepStateError: (RuntimeError,),
        CaptureInProgressError: (SleepStateError,),
        WakeVerificationError: (RuntimeError,),
        DistributedSleepError: (RuntimeError,),
        ModelOutOfMemoryError: (DistributedSleepError, OutOfMemoryError),
        InvalidModelRequestError: (DistributedSleepError, ValueError),
        DrainTimeoutError: (TimeoutError,),
        UnknownTagsError: (ValueError,),
        TransitionInProgressError: (RuntimeError,),
    }
    for cls, bases in kept.items():
        assert all(issubclass(cls, base) for base in bases), cls
    assert gpusleep.GpusleepError.__bases__ == (Exception,)
    with pytest.raises(gpusleep.GpusleepError):
        raise UnknownTagsError(frozenset({"x"}), frozenset())


def test_model_sleeping_response_spells_its_duration_in_seconds_and_still_takes_the_old_spelling():
    from gpusleep.server.responses import MODEL_SLEEPING_MESSAGE, model_sleeping_response

    response = model_sleeping_response(retry_after_seconds=7)
    assert (response.status_code, response.headers["retry-after"]) == (503, "7")
    assert json.loads(response.body)["error"]["message"] == MODEL_SLEEPING_MESSAGE
    assert model_sleeping_response(5).headers["retry-after"] == "5"
    with pytest.deprecated_call(match="retry_after_seconds"):
        old = model_sleeping_response(retry_after_s=3)
    assert old.headers["retry-after"] == "3" and old.body == response.body
    with pytest.raises(TypeError):
        model_sleeping_response()
