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


def _version() -> str:
    """The version written in pyproject.toml, its one source: read from the pyproject.toml of the source tree
    this package is imported from (a checkout run without installing), else from the installed distribution's
    metadata (which the build took from pyproject.toml)."""
    import pathlib

    pyproject = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        project = tomllib.loads(pyproject.read_text())["project"]
        if project.get("name") == "gpusleep":
            return str(project["version"])
    except (ImportError, OSError, ValueError, KeyError):
        pass
    from importlib import metadata

    try:
        return metadata.version("gpusleep")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

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
