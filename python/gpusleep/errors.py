"""Exceptions raised by gpusleep.

The C++ core raises these through the pybind11 exception translator in ``csrc/bindings.cpp``:

* :class:`OutOfMemoryError` (a :class:`MemoryError`) when the GPU has too little free memory for an
  allocation or a wake-up. It says how many bytes were needed and how many were free.
* :class:`CudaError` for any other driver failure, with the ``CUDA_ERROR_*`` name and code.
* :class:`SleepStateError` when a call conflicts with the sleep state (allocating from a tag that is
  asleep, for example).
* :class:`ValueError` for misuse (an invalid level, an unknown address, a double free).
"""

from __future__ import annotations

__all__ = ["CudaError", "OutOfMemoryError", "SleepStateError", "DriverUnavailableError"]


class CudaError(RuntimeError):
    """A CUDA driver call failed. ``code`` is the ``CUresult`` value, ``name`` its ``CUDA_ERROR_*`` name."""

    def __init__(self, message: str, code: int = 0, name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.name = name


class DriverUnavailableError(CudaError):
    """libcuda could not be opened (no GPU driver on this machine), so nothing that needs it can run."""


class OutOfMemoryError(MemoryError):
    """Not enough free GPU memory. ``bytes_needed`` and ``bytes_free`` are per ``device``."""

    def __init__(self, message: str, bytes_needed: int = 0, bytes_free: int = 0, device: int = -1) -> None:
        super().__init__(message)
        self.bytes_needed = bytes_needed
        self.bytes_free = bytes_free
        self.device = device


class SleepStateError(RuntimeError):
    """The call conflicts with the sleep state, e.g. allocating from a tag that is asleep."""
