"""Sleep and wake a model that spans many GPUs: every rank of a torch.distributed group, or none.

Usage on every rank of a tensor-parallel model (see docs/distributed.md)::

    import gpusleep, gpusleep.distributed as gsd
    report = gsd.sleep(alloc, level=1)      # same call on every rank; raises the same error on all
    gsd.wake_up(alloc)

For an HTTP server: ``gpusleep.server.install(app, gsd.ModelSleepController(alloc))`` on rank 0 and
``gsd.follow(alloc)`` on the other ranks. The protocol's messages run on a gloo group (``group=None`` on an
NCCL world makes one, once per world); an NCCL group is refused.
"""

from .communicators import SuspendableCommunicator, nccl_communicators
from .controller import ModelSleepController, follow
from .errors import (
    CommunicatorsInconsistentError,
    DistributedSleepError,
    InvalidModelRequestError,
    ModelHostOutOfMemoryError,
    ModelOutOfMemoryError,
    RankFailure,
    RanksUnresponsiveError,
)
from .protocol import DEFAULT_TIMEOUT_SECONDS, sleep, wake_up
from .reports import ModelSleepReport, ModelWakeReport

__all__ = [
    "CommunicatorsInconsistentError",
    "DEFAULT_TIMEOUT_SECONDS",
    "DistributedSleepError",
    "InvalidModelRequestError",
    "ModelHostOutOfMemoryError",
    "ModelOutOfMemoryError",
    "ModelSleepController",
    "ModelSleepReport",
    "ModelWakeReport",
    "RankFailure",
    "RanksUnresponsiveError",
    "SuspendableCommunicator",
    "follow",
    "nccl_communicators",
    "sleep",
    "wake_up",
]
