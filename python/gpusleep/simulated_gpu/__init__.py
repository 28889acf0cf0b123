"""A SIMULATED GPU, for trying gpusleep where there is no NVIDIA GPU (a laptop, CI). Opt-in: never used unless asked.

It is the host-memory CUDA driver double the test suite runs on (``csrc/simulated_gpu``, described in
``tests/fakecuda/README.md``), built into the wheel as ``libgpusleep_simulated_gpu.so`` beside ``_C``. gpusleep's
unchanged C++ core opens it instead of ``libcuda.so.1``: "device memory" is host memory behind the same
virtual-memory calls (reserve an address range, create physical memory, map it at that address), so an
allocation keeps its address across sleep and wake, a sleep really gives its physical memory back (the
simulated device's free memory goes up), a level-1 sleep really copies the bytes out to pinned host memory, and a
wake really maps fresh memory and copies them back. It is as strict as the real driver, so what works here
works on a GPU; it is not fast, and no kernel runs on it except gpusleep's own wake verification (PyTorch cannot
compute on it: the demo server computes on the CPU from weights it reads out of simulated device memory).

Use it before anything in the process uses the driver::

    import gpusleep, gpusleep.simulated_gpu
    gpusleep.simulated_gpu.enable()                     # 2 simulated devices of 8 GiB
    alloc = gpusleep.Allocator()

or from the command line: ``gpusleep serve --simulate-gpu``, ``gpusleep doctor --simulate-gpu``, or
``GPUSLEEP_SIMULATE_GPU=1`` for any ``gpusleep`` command. Every log line of such a command, and every HTTP
answer of such a server (the ``x-gpusleep-gpu: simulated`` header), says that the GPU is simulated.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pathlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import GpusleepError

__all__ = [
    "ENV_VAR",
    "LIBRARY_NAME",
    "LABEL",
    "SimulatedGpu",
    "SimulatedGpuUnavailableError",
    "current",
    "enable",
    "enable_from_environment",
    "is_enabled",
    "library_path",
    "requested_by_environment",
]

log = logging.getLogger("gpusleep.simulated_gpu")

#: ``GPUSLEEP_SIMULATE_GPU=1`` makes the ``gpusleep`` commands run on the simulated GPU.
ENV_VAR = "GPUSLEEP_SIMULATE_GPU"
LIBRARY_NAME = "libgpusleep_simulated_gpu.so"
#: What every log line and answer of a process on the simulated GPU carries.
LABEL = "SIMULATED GPU"
DEFAULT_DEVICES = 2
DEFAULT_MEMORY_BYTES = 8 << 30
DEFAULT_GRANULARITY_BYTES = 2 << 20
_DRIVER_ENV = "GPUSLEEP_CUDA_DRIVER"
_LOCK = threading.Lock()
_CURRENT: SimulatedGpu | None = None


class SimulatedGpuUnavailableError(RuntimeError, GpusleepError):
    """The simulated GPU cannot be used here: this build of gpusleep lacks it, or the process already uses
    another CUDA driver."""


SimulatedGpuUnavailable = SimulatedGpuUnavailableError  # the name before every exception ended in Error


def library_path() -> pathlib.Path:
    """The simulated GPU's driver library, shipped beside this module. Raises :class:`SimulatedGpuUnavailableError`
    when this build does not have it (built with ``-DGPUSLEEP_BUILD_SIMULATED_GPU=OFF``, or a source checkout
    whose ``_C`` was copied in by hand)."""
    here = pathlib.Path(__file__).resolve().parent
    # An editable install keeps the Python files in the source tree and the built libraries where the wheel
    # would put them: beside the installed _C.
    candidates = [here / LIBRARY_NAME]
    try:
        from .. import _C

        candidates.append(pathlib.Path(_C.__file__).resolve().parent / "simulated_gpu" / LIBRARY_NAME)
    except ImportError:
        pass
    path = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
    if not path.is_file():
        raise SimulatedGpuUnavailableError(
            f"the simulated GPU is not part of this build of gpusleep (no {path.name} beside {__name__}); "
            "reinstall gpusleep with `pip install .` (GPUSLEEP_BUILD_SIMULATED_GPU is ON by default)"
        )
    return path


def requested_by_environment() -> bool:
    """Whether ``GPUSLEEP_SIMULATE_GPU`` asks for the simulated GPU (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SimulatedGpu:
    """The simulated GPU of this process: ``devices`` devices of ``memory_bytes`` each, mapped in pieces of
    ``granularity_bytes``. Its memory is this process's host memory: each process that enables it has its
    own simulated GPU (two servers do not share one)."""

    path: str
    devices: int
    memory_bytes: int
    granularity_bytes: int

    @property
    def _lib(self) -> ctypes.CDLL:
        return _library(self.path)

    def used_bytes(self, device: int = 0) -> int:
        """Physical memory allocated on the simulated device now (what a sleep gives back)."""
        return int(self._lib.fakecuda_used_bytes(device))

    def free_bytes(self, device: int = 0) -> int:
        """What ``cuMemGetInfo`` answers as free on the simulated device (its contexts' overhead taken off)."""
        return int(self._lib.fakecuda_free_bytes(device))

    def write(self, device_address: int, data: bytes, device: int = 0) -> None:
        """Copy ``data`` to simulated device memory at ``device_address`` and wait for it to land, outside the
        driver calls gpusleep makes (not counted by the double, never failed by an injected fault)."""
        data = bytes(data)
        if data:
            buffer = ctypes.create_string_buffer(data, len(data))
            with self._device_context(device) as lib:
                _check(lib.cuMemcpyHtoD_v2(ctypes.c_uint64(device_address), buffer, len(data)), "cuMemcpyHtoD_v2")
                _check(lib.cuStreamSynchronize(None), "cuStreamSynchronize")

    def read(self, device_address: int, num_bytes: int, device: int = 0) -> bytes:
        """``num_bytes`` of simulated device memory at ``device_address`` (as :meth:`write`, outside gpusleep's
        calls)."""
        if num_bytes <= 0:
            return b""
        buffer = ctypes.create_string_buffer(num_bytes)
        with self._device_context(device) as lib:
            _check(lib.cuMemcpyDtoH_v2(buffer, ctypes.c_uint64(device_address), num_bytes), "cuMemcpyDtoH_v2")
        return buffer.raw

    @contextlib.contextmanager
    def _device_context(self, device: int) -> Iterator[ctypes.CDLL]:
        """``device``'s primary context current on this thread, retained for the block and released after, the
        caller's context current again; every driver call inside is the double's harness's own."""
        lib = self._lib
        context, previous = ctypes.c_void_p(), ctypes.c_void_p()
        lib.fakecuda_harness_scope(1)
        try:
            _check(lib.cuInit(0), "cuInit")
            _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
            try:
                _check(lib.cuCtxGetCurrent(ctypes.byref(previous)), "cuCtxGetCurrent")
                _check(lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")
                try:
                    yield lib
                finally:
                    lib.cuCtxSetCurrent(previous)
            finally:
                lib.cuDevicePrimaryCtxRelease_v2(device)
        finally:
            lib.fakecuda_harness_scope(0)

    def violations(self) -> list[str]:
        """Driver rules the code broke so far (the double records them; a real GPU would have misbehaved)."""
        out = []
        buf = ctypes.create_string_buffer(4096)
        for i in range(int(self._lib.fakecuda_violation_count())):
            if self._lib.fakecuda_violation(i, buf, len(buf)) >= 0:
                out.append(buf.value.decode(errors="replace"))
        return out

    def describe(self) -> str:
        return (
            f"{LABEL}: {self.devices} simulated device(s) of {self.memory_bytes / (1 << 30):g} GiB in host "
            f"memory (gpusleep's driver double), not a real GPU"
        )


_LIBS: dict = {}


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"simulated GPU: {call} failed with CUresult {result}")


def _library(path: str) -> ctypes.CDLL:
    lib = _LIBS.get(path)
    if lib is None:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)  # the same handle the core's dlopen of `path` gets
        lib.fakecuda_configure.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64]
        lib.fakecuda_configure.restype = ctypes.c_int
        for name in ("fakecuda_used_bytes", "fakecuda_free_bytes"):
            getattr(lib, name).argtypes = [ctypes.c_int]
            getattr(lib, name).restype = ctypes.c_size_t
        lib.fakecuda_violation_count.restype = ctypes.c_int
        lib.fakecuda_violation.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        lib.fakecuda_violation.restype = ctypes.c_int
        lib.fakecuda_harness_scope.argtypes = [ctypes.c_int]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        lib.cuDevicePrimaryCtxRelease_v2.argtypes = [ctypes.c_int]
        lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        _LIBS[path] = lib
    return lib


def _another_driver_in_use(path: str) -> str | None:
    """The driver this process already opened, if it is not the simulated GPU (gpusleep opens it once)."""
    configured = os.environ.get(_DRIVER_ENV) or "libcuda.so.1"
    if configured == path:
        return None
    try:
        ctypes.CDLL(configured, mode=os.RTLD_NOLOAD | ctypes.RTLD_LOCAL)
    except OSError:
        return None  # not loaded: gpusleep has not opened it yet
    return configured


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(float(text) * (1 << 30)) if name.endswith("_GIB") else int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None


def enable(
    devices: int | None = None,
    memory_bytes: int | None = None,
    *,
    granularity_bytes: int = DEFAULT_GRANULARITY_BYTES,
    seed: int = 0,
) -> SimulatedGpu:
    """Make this process's gpusleep run on the simulated GPU and return it. Call it before the first
    :class:`gpusleep.Allocator` (before anything opens the CUDA driver); calling it again with the same
    settings returns the same simulated GPU.

    ``devices`` (default 2, or env ``GPUSLEEP_SIMULATED_GPUS``) and ``memory_bytes`` per device (default 8 GiB,
    or env ``GPUSLEEP_SIMULATED_GPU_MEMORY_GIB``): only what is allocated takes host memory. It also sets
    ``GPUSLEEP_CUDA_DRIVER`` for this process and the processes it starts, which get the same devices (each process
    has its own simulated memory: nothing is shared between them).

    Raises :class:`SimulatedGpuUnavailableError` when this build lacks it or another CUDA driver is already in use,
    ``ValueError`` for settings it cannot simulate, and ``RuntimeError`` when it is already enabled with other
    settings."""
    global _CURRENT
    devices = _env_int("GPUSLEEP_SIMULATED_GPUS", DEFAULT_DEVICES) if devices is None else int(devices)
    if memory_bytes is None:
        memory_bytes = _env_int("GPUSLEEP_SIMULATED_GPU_MEMORY_GIB", DEFAULT_MEMORY_BYTES)
    memory_bytes = int(memory_bytes)
    if not 1 <= devices <= 16:
        raise ValueError(f"simulated GPU: {devices} devices; give 1 to 16")
    if memory_bytes < 64 << 20:
        raise ValueError(f"simulated GPU: {memory_bytes} bytes per device; give at least 64 MiB")
    with _LOCK:
        wanted = SimulatedGpu(str(library_path()), devices, memory_bytes, int(granularity_bytes))
        if _CURRENT is not None:
            if _CURRENT != wanted:
                raise RuntimeError(
                    f"the simulated GPU is already enabled as {_CURRENT.describe()}; it cannot be "
                    "changed once gpusleep uses it (start a new process)"
                )
            return _CURRENT
        other = _another_driver_in_use(wanted.path)
        if other is not None:
            raise SimulatedGpuUnavailableError(
                f"this process already uses the CUDA driver {other!r}: enable the simulated GPU before the first "
                "gpusleep.Allocator (and before torch initialises CUDA), or in a new process"
            )
        lib = _library(wanted.path)
        rc = lib.fakecuda_configure(devices, memory_bytes, wanted.granularity_bytes, seed)
        if rc == -2:
            raise ValueError(
                f"simulated GPU: granularity {granularity_bytes} is not a power-of-two multiple of the page size"
            )
        os.environ[_DRIVER_ENV] = wanted.path
        # The processes this one starts open the same library: they start with the same devices.
        os.environ["FAKECUDA_DEVICES"] = str(devices)
        os.environ["FAKECUDA_CAPACITY_BYTES"] = str(memory_bytes)
        os.environ["FAKECUDA_GRANULARITY_BYTES"] = str(wanted.granularity_bytes)
        _CURRENT = wanted
    log.warning("%s", wanted.describe())
    return wanted


def enable_from_environment() -> SimulatedGpu | None:
    """:func:`enable` when ``GPUSLEEP_SIMULATE_GPU`` asks for it, else None."""
    return enable() if requested_by_environment() else None


def current() -> SimulatedGpu | None:
    """The simulated GPU this process enabled, or None."""
    return _CURRENT


def is_enabled() -> bool:
    return _CURRENT is not None
