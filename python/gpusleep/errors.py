"""Exceptions raised by gpusleep.

Every exception class gpusleep defines derives from :class:`GpusleepError` (``except gpusleep.GpusleepError``
catches them all), beside the built-in class that says what kind of failure it is (:class:`MemoryError`,
:class:`RuntimeError`, :class:`ValueError`, :class:`TimeoutError`), so code written against the built-in
classes keeps working. Misuse the C++ core detects (an invalid level, an unknown address, a double free) is a
plain :class:`ValueError`.

The C++ core raises these through the pybind11 exception translator in ``csrc/bindings.cpp``:

* :class:`OutOfMemoryError` when the GPU has too little free memory for an allocation or a wake-up. It
  is a :class:`MemoryError` and, like ``torch.OutOfMemoryError``, a :class:`RuntimeError`, so code
  written for vLLM's allocator or PyTorch catches it. It says how many bytes were needed and how many
  were free, as measured on ``device``.
* :class:`HostOutOfMemoryError` when a level-1 sleep (or ``reserve_host_memory``) would need more
  pinned host memory than the host or its cgroup allows. It is *not* an :class:`OutOfMemoryError`: the
  GPU is fine, the host is short.
* :class:`CaptureInProgressError` when a call that would synchronize, unmap or release memory comes
  while a CUDA graph capture is in progress in the process (doing it would invalidate the capture).
* :class:`CudaError` for any other driver failure, with the ``CUDA_ERROR_*`` name and code.
* :class:`SleepStateError` when a call conflicts with the sleep state (allocating from a tag that is
  asleep, for example).
* :class:`WakeVerificationError` when a verified wake found restored bytes that differ from their host
  copy: the wake was rolled back, the tags are still asleep with their host copies, and ``wake_up``
  may be called again.
* :class:`ValueError` for misuse (an invalid level, an unknown address, a double free, a size too
  large to round).
"""

from __future__ import annotations

__all__ = [
    "CaptureInProgressError",
    "CudaError",
    "DriverUnavailableError",
    "GpusleepError",
    "HostOutOfMemoryError",
    "OutOfMemoryError",
    "SleepStateError",
    "WakeVerificationError",
]


class GpusleepError(Exception):
    """The root of every exception class gpusleep defines. Each also derives from the built-in class that fits
    (``OutOfMemoryError`` is a :class:`MemoryError`, ``UnknownTagsError`` a :class:`ValueError`, ...)."""


class CudaError(RuntimeError, GpusleepError):
    """A CUDA driver call failed. ``code`` is the ``CUresult`` value, ``name`` its ``CUDA_ERROR_*`` name."""

    def __init__(self, message: str, code: int = 0, name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.name = name


class DriverUnavailableError(CudaError):
    """libcuda could not be opened (no GPU driver on this machine), so nothing that needs it can run."""


class OutOfMemoryError(MemoryError, RuntimeError, GpusleepError):
    """Not enough free GPU memory on ``device``.

    ``bytes_needed`` is what the call needed and ``bytes_free`` what ``cuMemGetInfo`` reported free on
    that device right after the failure (``None`` if even that query failed): measured, never made up."""

    def __init__(self, message: str, bytes_needed: int = 0, bytes_free: int | None = None, device: int = -1) -> None:
        super().__init__(message)
        self.bytes_needed = bytes_needed
        self.bytes_free = bytes_free
        self.device = device


class HostOutOfMemoryError(MemoryError, RuntimeError, GpusleepError):
    """Not enough host memory to pin the backup of a level-1 sleep.

    ``bytes_needed`` is the pinned memory the call needed beyond what is already pinned and free;
    ``bytes_available`` what the tighter of the host (``MemAvailable``) and the cgroup
    (``memory.max - memory.current``) allowed, and ``limited_by`` which of the two it was (or
    ``"driver"`` when ``cuMemHostAlloc`` itself refused; ``bytes_available`` is then what the host and
    cgroup allowed, or ``None`` where neither could be read). Nothing was changed by the failed call."""

    def __init__(
        self, message: str, bytes_needed: int = 0, bytes_available: int | None = None, limited_by: str = ""
    ) -> None:
        super().__init__(message)
        self.bytes_needed = bytes_needed
        self.bytes_available = bytes_available
        self.limited_by = limited_by


class SleepStateError(RuntimeError, GpusleepError):
    """The call conflicts with the sleep state, e.g. allocating from a tag that is asleep."""


class CaptureInProgressError(SleepStateError):
    """A CUDA graph capture is in progress in this process, and the call would have to synchronize, unmap
    or release GPU memory, which would invalidate that capture. Retry once the capture has ended."""


class WakeVerificationError(RuntimeError, GpusleepError):
    """A verified wake (``Allocator(verify="full")``, the default) found restored GPU memory that differs
    from its host copy. Nothing was served from it: the wake was rolled back and the tags are still asleep
    with their host copies, so ``wake_up`` can be called again.

    ``tags`` lists the tags whose memory differed; ``blocks`` the differing pieces as
    ``(tag, address, num_bytes)`` tuples (4 MiB pieces, the last one of a segment shorter).
    ``host_copy_damaged``: the host copy itself no longer holds what the sleep hashed, so another wake fails
    the same way; ``Allocator.trust_host_copies`` accepts it as it is. False: the restore went wrong, and
    calling ``wake_up`` again restores again.
    """

    def __init__(
        self,
        message: str,
        tags: list[str] | None = None,
        blocks: list[tuple[str, int, int]] | None = None,
        host_copy_damaged: bool = False,
    ) -> None:
        super().__init__(message)
        self.tags: list[str] = list(tags or [])
        self.blocks: list[tuple[str, int, int]] = [tuple(b) for b in (blocks or [])]  # type: ignore[misc]
        self.host_copy_damaged = bool(host_copy_damaged)
