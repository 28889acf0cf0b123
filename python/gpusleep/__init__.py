"""gpusleep: sleep mode for GPU model servers.

Quick start::

    import gpusleep
    alloc = gpusleep.Allocator()
    ...
    alloc.sleep(level=1)
    alloc.wake_up()
"""

from .allocator import DEFAULT_TAG, POLICIES, Allocator
from .errors import (
    CaptureInProgressError,
    CudaError,
    DriverUnavailableError,
    GpusleepError,
    HostOutOfMemoryError,
    OutOfMemoryError,
    SleepStateError,
    WakeVerificationError,
)
from .stats import AllocatorStats, HostMemoryReport, SleepReport, TagStats, WakePlan, WakeReport

__version__ = "0.1.0"

__all__ = [
    "Allocator",
    "AllocatorStats",
    "CaptureInProgressError",
    "CudaError",
    "DEFAULT_TAG",
    "DriverUnavailableError",
    "GpusleepError",
    "HostMemoryReport",
    "HostOutOfMemoryError",
    "OutOfMemoryError",
    "POLICIES",
    "SleepReport",
    "SleepStateError",
    "TagStats",
    "WakePlan",
    "WakeReport",
    "WakeVerificationError",
]
