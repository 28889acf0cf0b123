"""Build and drive fakecuda, the host-memory CUDA driver double, from Python.

``build()`` compiles ``csrc/simulated_gpu/*.cpp`` (the double's sources, also shipped in the wheel as the
opt-in simulated GPU, ``gpusleep.simulated_gpu``) into ``build/fakecuda/libfakecuda.so``
(only when the sources, the compiler flags or ``cuda.h`` changed) and
``FakeCuda`` loads it with ctypes and wraps its ``fakecuda_*`` control API.
Point the core at the library with ``GPUSLEEP_CUDA_DRIVER=<path>``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

__all__ = [
    "ERROR",
    "ERROR_NAME",
    "CudaCallError",
    "FakeCuda",
    "build",
    "find_cuda_include",
    "CUmemLocation",
    "CUmemAllocationProp",
    "CUmemAccessDesc",
]

_HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = _HERE.parents[1]
BUILD_DIR = REPO_ROOT / "build" / "fakecuda"
CORE_DIR = REPO_ROOT / "csrc"
#: The double's sources: shipped as gpusleep's opt-in simulated GPU too (CMakeLists.txt), the same code.
SOURCE_DIR = CORE_DIR / "simulated_gpu"
LIB_NAME = "libfakecuda.so"
CXXFLAGS = [
    "-O2",
    "-g",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-pthread",
    "-Wall",
    "-Wextra",
    "-Wno-missing-field-initializers",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-UCUDA_API_PER_THREAD_DEFAULT_STREAM",
]

# CUresult codes the tests use (values from cuda.h's cudaError_enum).
ERROR: dict[str, int] = {
    "CUDA_SUCCESS": 0,
    "CUDA_ERROR_INVALID_VALUE": 1,
    "CUDA_ERROR_OUT_OF_MEMORY": 2,
    "CUDA_ERROR_NOT_INITIALIZED": 3,
    "CUDA_ERROR_INVALID_DEVICE": 101,
    "CUDA_ERROR_INVALID_CONTEXT": 201,
    "CUDA_ERROR_INVALID_HANDLE": 400,
    "CUDA_ERROR_ILLEGAL_STATE": 401,
    "CUDA_ERROR_NOT_READY": 600,
    "CUDA_ERROR_ILLEGAL_ADDRESS": 700,
    "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED": 712,
    "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED": 713,
    "CUDA_ERROR_NOT_SUPPORTED": 801,
    "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED": 900,
    "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED": 901,
    "CUDA_ERROR_STREAM_CAPTURE_MERGE": 902,
    "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED": 903,
    "CUDA_ERROR_STREAM_CAPTURE_UNJOINED": 904,
    "CUDA_ERROR_STREAM_CAPTURE_ISOLATION": 905,
    "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT": 906,
    "CUDA_ERROR_CAPTURED_EVENT": 907,
    "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD": 908,
    "CUDA_ERROR_UNKNOWN": 999,
    "CUDA_ERROR_INVALID_IMAGE": 200,
    "CUDA_ERROR_INVALID_PTX": 218,
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION": 222,
    "CUDA_ERROR_NOT_FOUND": 500,
}
ERROR_NAME: dict[int, str] = {v: k for k, v in ERROR.items()}


def _load_error_table_generator():
    """csrc/simulated_gpu/gen_error_table.py (not a package: CMake runs it as a script too)."""
    spec = importlib.util.spec_from_file_location("gpusleep_gen_error_table", SOURCE_DIR / "gen_error_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_generator = _load_error_table_generator()
_ERROR_TEXT = _generator.ERROR_TEXT
_error_table = _generator.error_table


# ----------------------------------------------------------------------------- build


def find_cuda_include() -> pathlib.Path:
    """Directory holding cuda.h: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or the nvidia wheels."""
    candidates: list[pathlib.Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            candidates.append(pathlib.Path(os.environ[var]) / "include")
    candidates.append(pathlib.Path("/usr/local/cuda/include"))
    for entry in sys.path:
        base = pathlib.Path(entry or ".") / "nvidia"
        if base.is_dir():
            candidates.extend(sorted(base.glob("*/include")))
    for c in candidates:
        if (c / "cuda.h").is_file():
            return c
    raise RuntimeError(
        "fakecuda: cuda.h not found. Install a CUDA toolkit (set CUDA_HOME) or the "
        "nvidia-cuda-runtime wheel; searched: " + ", ".join(str(c) for c in candidates)
    )


def _compiler() -> str:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    raise RuntimeError("fakecuda: no C++ compiler found (set CXX)")


# build(variant=...): doubles that look like older drivers (compile-time switches in fakecuda.cpp).
VARIANT_FLAGS: dict[str, list[str]] = {
    "default": [],
    "capture_info_v2": ["-DFAKECUDA_CAPTURE_INFO=2"],  # cuStreamGetCaptureInfo_v2 only (drivers 11.3 to 12.2)
    "no_capture_info": ["-DFAKECUDA_CAPTURE_INFO=0"],  # no capture-id query at all
}
_VARIANT_OMITTED = {"cuStreamGetCaptureInfo_v3"}  # entry points a variant may lack


def build(force: bool = False, variant: str = "default") -> pathlib.Path:
    """Compile the double into build/fakecuda/libfakecuda.so (a variant: libfakecuda-VARIANT.so); rebuild only on
    change."""
    flags = VARIANT_FLAGS[variant]
    inc = find_cuda_include()
    cuda_h = (inc / "cuda.h").read_text(errors="replace")
    sources = sorted(SOURCE_DIR.glob("*.cpp"))
    headers = sorted(SOURCE_DIR.glob("*.h")) + [CORE_DIR / "chunk_hash.h"]  # the kernel twin the double runs
    headers.append(SOURCE_DIR / "gen_error_table.py")
    cxx = _compiler()
    digest = hashlib.sha256()
    digest.update(repr((cxx, CXXFLAGS, flags, str(inc))).encode())
    digest.update(cuda_h.encode())
    for f in sources + headers:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    key = digest.hexdigest()

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    lib = BUILD_DIR / (LIB_NAME if variant == "default" else f"libfakecuda-{variant}.so")
    stamp = BUILD_DIR / (lib.name + ".sha256")
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes build once
        if not force and lib.exists() and stamp.exists() and stamp.read_text() == key:
            return lib
        gen = BUILD_DIR / "gen"
        gen.mkdir(exist_ok=True)
        (gen / "fakecuda_errors.inc").write_text(_error_table(cuda_h))
        tmp = BUILD_DIR / f"{lib.name}.tmp{os.getpid()}"
        cmd = [
            cxx,
            *CXXFLAGS,
            *flags,
            f"-I{gen}",
            f"-I{inc}",
            f"-I{CORE_DIR}",
            f"-I{SOURCE_DIR}",
            *map(str, sources),
            "-o",
            str(tmp),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError("fakecuda: compiling the driver double failed:\n" + " ".join(cmd) + "\n" + proc.stderr)
        os.replace(tmp, lib)
        stamp.write_text(key)
    return lib


# ----------------------------------------------------------------------------- ctypes types

CUdeviceptr = ctypes.c_ulonglong
CUhandle = ctypes.c_ulonglong


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


_P = ctypes.POINTER
_vp, _sz, _u, _i, _ull = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_ulonglong

# Prototypes of every exported entry point (restype CUresult = int).
_PROTOTYPES: dict[str, list] = {
    "cuInit": [_u],
    "cuDriverGetVersion": [_P(_i)],
    "cuDeviceGet": [_P(_i), _i],
    "cuDeviceGetCount": [_P(_i)],
    "cuDeviceGetName": [ctypes.c_char_p, _i, _i],
    "cuDeviceGetAttribute": [_P(_i), _i, _i],
    "cuDevicePrimaryCtxRetain": [_P(_vp), _i],
    "cuDevicePrimaryCtxRelease_v2": [_i],
    "cuCtxSetCurrent": [_vp],
    "cuCtxGetCurrent": [_P(_vp)],
    "cuCtxGetDevice": [_P(_i)],
    "cuCtxSynchronize": [],
    "cuGetErrorName": [_i, _P(ctypes.c_char_p)],
    "cuGetErrorString": [_i, _P(ctypes.c_char_p)],
    "cuMemGetInfo_v2": [_P(_sz), _P(_sz)],
    "cuMemGetAllocationGranularity": [_P(_sz), _P(CUmemAllocationProp), _i],
    "cuMemAddressReserve": [_P(CUdeviceptr), _sz, _sz, CUdeviceptr, _ull],
    "cuMemAddressFree": [CUdeviceptr, _sz],
    "cuMemCreate": [_P(CUhandle), _sz, _P(CUmemAllocationProp), _ull],
    "cuMemRelease": [CUhandle],
    "cuMemMap": [CUdeviceptr, _sz, _sz, CUhandle, _ull],
    "cuMemUnmap": [CUdeviceptr, _sz],
    "cuMemSetAccess": [CUdeviceptr, _sz, _P(CUmemAccessDesc), _sz],
    "cuMemHostAlloc": [_P(_vp), _sz, _u],
    "cuMemFreeHost": [_vp],
    "cuMemHostRegister_v2": [_vp, _sz, _u],
    "cuMemHostUnregister": [_vp],
    "cuMemcpyHtoDAsync_v2": [CUdeviceptr, _vp, _sz, _vp],
    "cuMemcpyDtoHAsync_v2": [_vp, CUdeviceptr, _sz, _vp],
    "cuMemcpyDtoDAsync_v2": [CUdeviceptr, CUdeviceptr, _sz, _vp],
    "cuMemcpyHtoD_v2": [CUdeviceptr, _vp, _sz],
    "cuMemcpyDtoH_v2": [_vp, CUdeviceptr, _sz],
    "cuMemsetD8Async": [CUdeviceptr, ctypes.c_ubyte, _sz, _vp],
    "cuMemsetD8_v2": [CUdeviceptr, ctypes.c_ubyte, _sz],
    "cuStreamCreate": [_P(_vp), _u],
    "cuStreamDestroy_v2": [_vp],
    "cuStreamSynchronize": [_vp],
    "cuStreamQuery": [_vp],
    "cuStreamWaitEvent": [_vp, _vp, _u],
    "cuEventCreate": [_P(_vp), _u],
    "cuEventRecord": [_vp, _vp],
    "cuEventQuery": [_vp],
    "cuEventSynchronize": [_vp],
    "cuEventDestroy_v2": [_vp],
    "cuEventElapsedTime_v2": [_P(ctypes.c_float), _vp, _vp],
    "cuStreamIsCapturing": [_vp, _P(_i)],
    "cuThreadExchangeStreamCaptureMode": [_P(_i)],
    "cuStreamBeginCapture_v2": [_vp, _i],
    "cuStreamEndCapture": [_vp, _P(_vp)],
    "cuStreamGetCaptureInfo_v3": [_vp, _P(_i), _P(ctypes.c_uint64), _P(_vp), _P(_vp), _P(_vp), _P(_sz)],
    "cuGraphDestroy": [_vp],
    "cuDeviceCanAccessPeer": [_P(_i), _i, _i],
    "cuMemcpyPeerAsync": [CUdeviceptr, _vp, CUdeviceptr, _vp, _sz, _vp],
    "cuDevicePrimaryCtxGetState": [_i, _P(_u), _P(_i)],
    "cuMemGetAccess": [_P(_ull), _P(CUmemLocation), CUdeviceptr],
    "cuMemRetainAllocationHandle": [_P(CUhandle), _vp],
    "cuModuleLoadData": [_P(_vp), _vp],
    "cuModuleLoadDataEx": [_P(_vp), _vp, _u, _P(_i), _P(_vp)],
    "cuModuleUnload": [_vp],
    "cuModuleGetFunction": [_P(_vp), _vp, ctypes.c_char_p],
    "cuLaunchKernel": [_vp, _u, _u, _u, _u, _u, _u, _u, _vp, _P(_vp), _P(_vp)],
    "cuFuncLoad": [_vp],
}
ENTRY_POINTS = tuple(_PROTOTYPES)

# (restype, argtypes) of the fakecuda_* control API.
_CONTROL: dict[str, tuple] = {
    "fakecuda_configure": (_i, [_i, _sz, _sz, ctypes.c_uint64]),
    "fakecuda_set_capacity": (_i, [_i, _sz]),
    "fakecuda_set_foreign_load": (_i, [_i, _sz]),
    "fakecuda_set_context_overhead": (_i, [_i, _sz]),
    "fakecuda_set_recommended_granularity": (_i, [_sz]),
    "fakecuda_granularity": (_sz, []),
    "fakecuda_inject_fault": (_i, [ctypes.c_char_p, _i, _i]),
    "fakecuda_inject_fault_any": (_i, [_i, _i]),
    "fakecuda_harness_scope": (None, [_i]),
    "fakecuda_call_log": (_sz, [_P(_i), _sz]),
    "fakecuda_entry_point_name": (ctypes.c_char_p, [_i]),
    "fakecuda_clear_faults": (None, []),
    "fakecuda_used_bytes": (_sz, [_i]),
    "fakecuda_free_bytes": (_sz, [_i]),
    "fakecuda_call_count": (ctypes.c_uint64, [ctypes.c_char_p]),
    "fakecuda_total_call_count": (ctypes.c_uint64, []),
    "fakecuda_reset_call_counts": (None, []),
    "fakecuda_pageable_copy_count": (ctypes.c_uint64, []),
    "fakecuda_pageable_sync_copy_count": (ctypes.c_uint64, []),
    "fakecuda_violation_count": (_i, []),
    "fakecuda_violation": (_i, [_i, ctypes.c_char_p, _sz]),
    "fakecuda_clear_violations": (None, []),
    "fakecuda_live_objects": (_i, [ctypes.c_char_p, _sz]),
    "fakecuda_pending_ops": (_i, []),
    "fakecuda_progress": (_i, [_i]),
    "fakecuda_stall_stream": (_i, [ctypes.c_uint64, _i]),
    "fakecuda_set_hang_limit_ms": (None, [ctypes.c_long]),
    "fakecuda_stall_on_call": (_i, [ctypes.c_char_p, _i]),
    "fakecuda_release_stalls": (_i, []),
    "fakecuda_sticky_error": (_i, [_i]),
    "fakecuda_primary_ctx_retain_count": (_i, [_i]),
    "fakecuda_primary_ctx_harness_retain_count": (_i, [_i]),
    "fakecuda_primary_ctx_retain_calls": (ctypes.c_int64, [_i]),
    "fakecuda_set_peer_access": (_i, [_i, _i, _i]),
    "fakecuda_set_rdma_vmm_supported": (_i, [_i, _i]),
    "fakecuda_set_host_numa_id": (_i, [_i, _i]),
    "fakecuda_set_host_register_supported": (_i, [_i, _i]),
    "fakecuda_set_jit_limits": (_i, [_i, _i]),
    "fakecuda_rdma_capable": (_i, [ctypes.c_uint64]),
    "fakecuda_set_honor_address_hints": (None, [_i]),
    "fakecuda_set_abort_on_violation": (None, [_i]),
    "fakecuda_set_race_detection": (None, [_i]),
    "fakecuda_corrupt_copy": (_i, [ctypes.c_char_p, _i, _i]),
    "fakecuda_kernels_run": (ctypes.c_uint64, []),
}

# fakecuda_corrupt_copy's kinds: how the armed copy goes wrong when it executes.
CORRUPTION: dict[str, int] = {"flip_byte": 1, "wrong_offset": 2, "lost_tail": 3}


class CudaCallError(RuntimeError):
    """A cu* call made by the harness itself failed."""

    def __init__(self, function: str, code: int):
        self.function, self.code = function, code
        self.name = ERROR_NAME.get(code, f"CUresult {code}")
        super().__init__(f"{function} failed: {self.name} ({code})")


HOST_NUMA_UNSUPPORTED = -0x7FFFFFFF  # kHostNumaUnsupported in fakecuda_state.h
CAPTURE_MODES = {"global": 0, "thread_local": 1, "relaxed": 2}
CAPTURE_STATUS = {0: "none", 1: "active", 2: "invalidated"}


def _default_granularity() -> int:
    env = os.environ.get("FAKECUDA_GRANULARITY_BYTES")
    return int(env, 0) if env else 2 << 20


# ----------------------------------------------------------------------------- FakeCuda


class FakeCuda:
    """ctypes handle on libfakecuda.so: control knobs plus direct access to the cu* calls (``.lib``)."""

    def __init__(self, path: pathlib.Path | str):
        self.path = pathlib.Path(path)
        self.lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        for name, args in _PROTOTYPES.items():
            if name in _VARIANT_OMITTED and not hasattr(self.lib, name):
                continue  # a build(variant=...) double that lacks it on purpose
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, args
        for name, (res, args) in _CONTROL.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = res, args
        self._granularity = int(self.lib.fakecuda_granularity())

    # -- configuration ---------------------------------------------------------

    def configure(
        self,
        *,
        devices: int = 2,
        capacity_bytes: int = 1 << 30,
        granularity_bytes: int | None = None,
        seed: int = 0,
    ) -> None:
        """Reset the double. Granularity defaults to $FAKECUDA_GRANULARITY_BYTES or 2 MiB.

        Clears faults, violations, call and copy counters. Raises AssertionError
        naming the live objects if any driver object was still alive (a leak); the
        reset happens anyway.
        """
        gran = granularity_bytes if granularity_bytes is not None else _default_granularity()
        before = self.live_objects()
        rc = self.lib.fakecuda_configure(devices, capacity_bytes, gran, seed)
        if rc == -2:
            raise ValueError(
                f"fakecuda: bad configuration devices={devices} granularity_bytes={gran} "
                "(need 1..16 devices and a power-of-two multiple of the page size)"
            )
        self._granularity = gran
        if rc != 0:
            raise AssertionError(f"fakecuda: driver objects leaked before configure(): {before}")

    @property
    def granularity_bytes(self) -> int:
        return self._granularity

    def set_capacity(self, device: int, capacity_bytes: int) -> None:
        self._ok(self.lib.fakecuda_set_capacity(device, capacity_bytes), "set_capacity")

    def set_foreign_load(self, device: int, num_bytes: int) -> None:
        self._ok(self.lib.fakecuda_set_foreign_load(device, num_bytes), "set_foreign_load")

    def set_context_overhead(self, device: int, num_bytes: int) -> None:
        self._ok(self.lib.fakecuda_set_context_overhead(device, num_bytes), "set_context_overhead")

    def set_recommended_granularity(self, num_bytes: int) -> None:
        self._ok(self.lib.fakecuda_set_recommended_granularity(num_bytes), "set_recommended_granularity")

    def set_honor_address_hints(self, on: bool) -> None:
        self.lib.fakecuda_set_honor_address_hints(int(on))

    def set_abort_on_violation(self, on: bool) -> None:
        self.lib.fakecuda_set_abort_on_violation(int(on))

    def set_race_detection(self, on: bool) -> None:
        self.lib.fakecuda_set_race_detection(int(on))

    def inject_fault(self, function: str, nth: int = 1, error: int = 2) -> None:
        """Make the nth call from now of `function` (cuMemCreate, cuMemcpyHtoDAsync_v2, ...) return `error`."""
        if self.lib.fakecuda_inject_fault(function.encode(), nth, error) != 0:
            raise ValueError(f"fakecuda: cannot inject into {function!r} (nth={nth}, error={error})")

    def inject_fault_any(self, nth: int = 1, error: int = 2) -> None:
        """Make the nth driver call from now, whatever the entry point, return `error`.

        For sweeps: count the calls of an operation with ``call_log()``, then fail each position in turn.
        The harness's own calls (write, read, context, copies, captures) are not counted.
        """
        if self.lib.fakecuda_inject_fault_any(nth, error) != 0:
            raise ValueError(f"fakecuda: cannot inject a fault at call {nth} with error {error}")

    def corrupt_copy(self, function: str = "cuMemcpyHtoDAsync", nth: int = 1, kind: str = "flip_byte") -> None:
        """Make the nth call (from now) of a copy entry point go wrong when it executes, without an error.

        ``kind`` (CORRUPTION): "flip_byte" flips every bit of the middle byte, "wrong_offset" lands the data
        8 bytes late (the first 8 bytes keep what was there, the last 8 are lost), "lost_tail" never
        writes the last quarter. What a bad DMA, a copy to the wrong offset or a short copy would leave.
        """
        if kind not in CORRUPTION or self.lib.fakecuda_corrupt_copy(function.encode(), nth, CORRUPTION[kind]) != 0:
            raise ValueError(f"fakecuda: cannot corrupt call {nth} of {function!r} with {kind!r}")

    def kernels_run(self) -> int:
        """Kernel launches executed since the last configure()."""
        return int(self.lib.fakecuda_kernels_run())

    def clear_faults(self) -> None:
        """Disarm every injected fault (per entry point and any-call) and every armed corruption."""
        self.lib.fakecuda_clear_faults()

    def call_log(self) -> list[str]:
        """Entry points called since configure() or reset_call_counts(), in order (harness calls excluded)."""
        n = int(self.lib.fakecuda_call_log(None, 0))
        codes = (ctypes.c_int * max(n, 1))()
        n = min(n, int(self.lib.fakecuda_call_log(codes, n)))
        names = {}
        out = []
        for code in codes[:n]:
            if code not in names:
                names[code] = self.lib.fakecuda_entry_point_name(code).decode()
            out.append(names[code])
        return out

    # -- the harness's own driver calls ------------------------------------------------

    @contextlib.contextmanager
    def _as_harness(self) -> Iterator[None]:
        """Driver calls made on this thread inside are the harness's: not counted, logged or failed."""
        self.lib.fakecuda_harness_scope(1)
        try:
            yield
        finally:
            self.lib.fakecuda_harness_scope(0)

    # -- device memory access (through the driver's own copy calls) -------------

    @contextlib.contextmanager
    def context(self, device: int = 0) -> Iterator[int]:
        """Make device's primary context current on this thread (retained for the duration).

        The retain is the harness's (see primary_context_retains); calls made by the code inside the
        ``with`` block are the caller's own. On exit the previous context is current again and the
        harness's retain is released, so no context is left active by the harness.
        """
        ctx = ctypes.c_void_p()
        prev = ctypes.c_void_p()
        with self._as_harness():
            self._check(self.lib.cuInit(0), "cuInit")
            self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
            try:
                self._check(self.lib.cuCtxGetCurrent(ctypes.byref(prev)), "cuCtxGetCurrent")
                self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            except BaseException:
                self.lib.cuDevicePrimaryCtxRelease_v2(device)
                raise
        try:
            yield ctx.value or 0
        finally:
            with self._as_harness():
                self.lib.cuCtxSetCurrent(prev)
                self.lib.cuDevicePrimaryCtxRelease_v2(device)

    def write(self, device_address: int, data: bytes, device: int = 0) -> None:
        """Synchronous HtoD (cuMemcpyHtoD_v2, then a legacy-stream sync so the DMA has landed)."""
        data = bytes(data)
        if not data:
            return
        buf = ctypes.create_string_buffer(data, len(data))
        with self.context(device), self._as_harness():
            self._check(self.lib.cuMemcpyHtoD_v2(device_address, buf, len(data)), "cuMemcpyHtoD_v2")
            self._check(self.lib.cuStreamSynchronize(None), "cuStreamSynchronize")

    def read(self, device_address: int, num_bytes: int, device: int = 0) -> bytes:
        """Synchronous DtoH via cuMemcpyDtoH_v2."""
        if num_bytes == 0:
            return b""
        buf = ctypes.create_string_buffer(num_bytes)
        with self.context(device), self._as_harness():
            self._check(self.lib.cuMemcpyDtoH_v2(buf, device_address, num_bytes), "cuMemcpyDtoH_v2")
        return buf.raw

    def copy_device_to_device(self, dst: int, src: int, num_bytes: int, device: int = 0) -> None:
        """Copy num_bytes from src to dst on the legacy stream of `device` (cuMemcpyDtoDAsync_v2, then a sync).

        The device running the copy needs READ access on src and READWRITE on dst: copying memory of another
        GPU works only once its mapping grants this device access (peer access). Raises CudaCallError with
        the driver's code otherwise.
        """
        if num_bytes == 0:
            return
        with self.context(device), self._as_harness():
            self._check(self.lib.cuMemcpyDtoDAsync_v2(dst, src, num_bytes, None), "cuMemcpyDtoDAsync_v2")
            self._check(self.lib.cuStreamSynchronize(None), "cuStreamSynchronize")

    def capture_on_thread(self, device: int = 0, mode: str = "global") -> ThreadCapture:
        """Begin a stream capture on a new thread; see ThreadCapture. Use as a context manager."""
        return ThreadCapture(self, device, mode)

    # -- observation ----------------------------------------------------------------

    def used_bytes(self, device: int = 0) -> int:
        return int(self.lib.fakecuda_used_bytes(device))

    def free_bytes(self, device: int = 0) -> int:
        """What cuMemGetInfo reports as free for the device."""
        return int(self.lib.fakecuda_free_bytes(device))

    def call_count(self, function: str) -> int:
        n = int(self.lib.fakecuda_call_count(function.encode()))
        if n == 2**64 - 1:
            raise ValueError(f"fakecuda: unknown entry point {function!r}")
        return n

    def total_call_count(self) -> int:
        return int(self.lib.fakecuda_total_call_count())

    def reset_call_counts(self) -> None:
        self.lib.fakecuda_reset_call_counts()

    def pageable_copy_count(self) -> int:
        """Async HtoD/DtoH copies enqueued with pageable (unpinned) host memory."""
        return int(self.lib.fakecuda_pageable_copy_count())

    def pageable_sync_copy_count(self) -> int:
        return int(self.lib.fakecuda_pageable_sync_copy_count())

    def violations(self) -> list[str]:
        out = []
        buf = ctypes.create_string_buffer(4096)
        for i in range(self.lib.fakecuda_violation_count()):
            n = self.lib.fakecuda_violation(i, buf, len(buf))
            if n >= len(buf):
                big = ctypes.create_string_buffer(n + 1)
                self.lib.fakecuda_violation(i, big, len(big))
                out.append(big.value.decode(errors="replace"))
            elif n >= 0:
                out.append(buf.value.decode(errors="replace"))
        return out

    def clear_violations(self) -> None:
        self.lib.fakecuda_clear_violations()

    def live_objects(self) -> str:
        buf = ctypes.create_string_buffer(512)
        self.lib.fakecuda_live_objects(buf, len(buf))
        return buf.value.decode()

    def live_object_count(self) -> int:
        return int(self.lib.fakecuda_live_objects(None, 0))

    def pending_ops(self) -> int:
        """Enqueued async operations not yet executed by a sync point."""
        return int(self.lib.fakecuda_pending_ops())

    def progress(self, max_ops: int = -1) -> int:
        """Let the 'GPU' run up to max_ops ready operations (all when -1), as if time passed."""
        return int(self.lib.fakecuda_progress(max_ops))

    def stall_stream(self, stream: int, stalled: bool = True) -> None:
        """Keep the stream's queued work from ever running (True) until released (False): work that never
        finishes, like a collective waiting for a dead peer. Queries say NOT_READY; a synchronize that needs
        the work blocks (Note [Stalled streams] in fakecuda_state.cpp)."""
        stream = getattr(stream, "value", stream) or 0  # an int or a ctypes.c_void_p
        if self.lib.fakecuda_stall_stream(stream, int(stalled)) != 0:
            raise ValueError(f"stall_stream: no live stream {stream:#x}")

    def stall_on_call(self, function: str, nth: int = 1) -> None:
        """The nth op (from now) that `function` enqueues stalls its stream, as if it never finished (a hung
        DMA): for streams the test cannot name, like a copy engine's. release_stalls() ends it."""
        if self.lib.fakecuda_stall_on_call(function.encode(), nth) != 0:
            raise ValueError(f"stall_on_call: unknown entry point {function!r} or nth {nth} < 1")

    def release_stalls(self) -> int:
        """Releases every stalled stream (their work runs at the next synchronize or query) and disarms
        stall_on_call; returns how many streams were stalled."""
        return int(self.lib.fakecuda_release_stalls())

    def set_hang_limit_ms(self, ms: int) -> None:
        """How long a synchronize blocked on a stalled stream waits before it records a violation and
        returns CUDA_ERROR_LAUNCH_TIMEOUT (default 10 s): a wait without a deadline would hang on a GPU."""
        self.lib.fakecuda_set_hang_limit_ms(ms)

    @contextlib.contextmanager
    def stuck_work(self, device: int = 0) -> Iterator[int]:
        """Work on `device` that never finishes while the block runs: a fresh non-blocking stream, stalled,
        with one queued op (an event record), as a kernel waiting for a dead peer would leave it. Yields the
        stream; on exit the stall is released, the work runs and the stream and event are destroyed."""
        stream, event = ctypes.c_void_p(), ctypes.c_void_p()
        with self.context(device), self._as_harness():
            self._check(self.lib.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")
            self._check(self.lib.cuEventCreate(ctypes.byref(event), 2), "cuEventCreate")
            self.stall_stream(stream.value)
            self._check(self.lib.cuEventRecord(event, stream), "cuEventRecord")
        try:
            yield stream.value
        finally:
            self.stall_stream(stream.value, False)
            with self.context(device), self._as_harness():
                self.lib.cuStreamSynchronize(stream)
                self.lib.cuEventDestroy_v2(event)
                self.lib.cuStreamDestroy_v2(stream)

    def context_active(self, device: int = 0) -> bool:
        """Whether the device's primary context is retained by anyone (and so costs device memory)."""
        return int(self.lib.fakecuda_primary_ctx_retain_count(device)) > 0

    def primary_context_retains(self, device: int = 0) -> int:
        """References the code under test holds on the device's primary context (the harness's excluded)."""
        total = int(self.lib.fakecuda_primary_ctx_retain_count(device))
        return total - int(self.lib.fakecuda_primary_ctx_harness_retain_count(device))

    def primary_context_retain_calls(self, device: int = 0) -> int:
        """Successful cuDevicePrimaryCtxRetain calls for the device by the code under test since configure()
        or reset_call_counts(): 0 means it never touched the device, not even briefly."""
        return int(self.lib.fakecuda_primary_ctx_retain_calls(device))

    def access(self, device_address: int, device: int, owner: int = 0) -> str:
        """The access `device` has to the mapping at device_address (cuMemGetAccess, asked with `owner`'s
        context current): "none", "read" or "readwrite". Raises CudaCallError if the address is not mapped."""
        flags = ctypes.c_ulonglong()
        location = CUmemLocation(1, device)  # CU_MEM_LOCATION_TYPE_DEVICE
        with self.context(owner), self._as_harness():
            self._check(
                self.lib.cuMemGetAccess(ctypes.byref(flags), ctypes.byref(location), device_address), "cuMemGetAccess"
            )
        return {0: "none", 1: "read", 3: "readwrite"}[flags.value]

    @contextlib.contextmanager
    def retained_allocation(self, device_address: int, device: int = 0) -> Iterator[int]:
        """Hold a reference on the physical memory mapped at device_address (cuMemRetainAllocationHandle), as
        an NCCL user-buffer registration or a dma-buf export does; released (cuMemRelease) on exit. While it
        is held, releasing and unmapping that memory does not free it."""
        handle = CUhandle()
        with self.context(device), self._as_harness():
            self._check(
                self.lib.cuMemRetainAllocationHandle(ctypes.byref(handle), device_address),
                "cuMemRetainAllocationHandle",
            )
        try:
            yield handle.value
        finally:
            with self.context(device), self._as_harness():
                self._check(self.lib.cuMemRelease(handle), "cuMemRelease")

    def set_peer_access(self, device: int, peer: int, can_access: bool) -> None:
        """Whether `device` can access memory of `peer` (cuDeviceCanAccessPeer). Default: every pair can."""
        self._ok(self.lib.fakecuda_set_peer_access(device, peer, int(can_access)), "set_peer_access")

    def set_rdma_vmm_supported(self, device: int, supported: bool) -> None:
        """CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED (default 1, as on H100/H200)."""
        self._ok(self.lib.fakecuda_set_rdma_vmm_supported(device, int(supported)), "set_rdma_vmm_supported")

    def set_host_numa_id(self, device: int, node: int | None) -> None:
        """CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID: the nearest host node, -1 (no NUMA), or None (a driver that does
        not know the attribute: INVALID_VALUE). Default: lower half of the devices node 0, upper half node 1."""
        value = HOST_NUMA_UNSUPPORTED if node is None else node
        self._ok(self.lib.fakecuda_set_host_numa_id(device, value), "set_host_numa_id")

    def set_jit_limits(self, max_ptx: tuple[int, int] = (8, 0), device_sm: int = 90) -> None:
        """What the JIT accepts until the next configure: PTX ISA up to ``max_ptx`` and targets up to
        ``sm_<device_sm>`` (defaults: a CUDA 12.0 driver on an sm_90 device)."""
        self._ok(self.lib.fakecuda_set_jit_limits(max_ptx[0] * 10 + max_ptx[1], device_sm), "set_jit_limits")

    def set_host_register_supported(self, device: int, supported: bool) -> None:
        """CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED (default 1). At 0, cuMemHostRegister with that device's
        context current returns NOT_SUPPORTED."""
        self._ok(self.lib.fakecuda_set_host_register_supported(device, int(supported)), "set_host_register_supported")

    def rdma_capable(self, handle_or_address: int) -> bool:
        """Whether the physical memory (a handle, or mapped at a device address) was created with
        allocFlags.gpuDirectRDMACapable = 1. Raises ValueError if it is neither a live handle nor mapped."""
        r = int(self.lib.fakecuda_rdma_capable(handle_or_address))
        if r < 0:
            raise ValueError(f"fakecuda: {handle_or_address:#x} is neither a live handle nor a mapped address")
        return bool(r)

    def sticky_error(self, device: int = 0) -> int:
        return int(self.lib.fakecuda_sticky_error(device))

    def error_name(self, code: int) -> str | None:
        s = ctypes.c_char_p()
        if self.lib.cuGetErrorName(code, ctypes.byref(s)) != 0:
            return None
        return s.value.decode()

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            raise CudaCallError(what, rc)

    @staticmethod
    def _ok(rc: int, what: str) -> None:
        if rc != 0:
            raise ValueError(f"fakecuda: {what} rejected its arguments")


class ThreadCapture:
    """A stream capture that lives on its own thread, as another library's CUDA graph capture would.

    ``with fake.capture_on_thread(device=0, mode="global") as cap:`` starts a thread that makes the device's
    primary context current, creates a non-blocking stream ``cap.stream`` and begins a capture on it in
    `mode`. ``cap.status()`` says "active", "invalidated" or "none". ``cap.end()`` (called on exit if not
    before) ends the capture on that same thread and returns cuStreamEndCapture's CUresult (0: the capture
    stayed valid). The thread's calls are the harness's: not counted, logged or failed.
    """

    def __init__(self, fake: FakeCuda, device: int = 0, mode: str = "global"):
        if mode not in CAPTURE_MODES:
            raise ValueError(f"fakecuda: capture mode {mode!r} is not one of {sorted(CAPTURE_MODES)}")
        self.fake, self.device, self.mode = fake, device, mode
        self.stream: int = 0
        self.end_result: int | None = None
        self._started = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"fakecuda-capture-{device}", daemon=True)

    def __enter__(self) -> ThreadCapture:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    def _run(self) -> None:
        lib = self.fake.lib
        try:
            with self.fake.context(self.device), self.fake._as_harness():
                stream = ctypes.c_void_p()
                FakeCuda._check(lib.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # NON_BLOCKING
                try:
                    rc = lib.cuStreamBeginCapture_v2(stream, CAPTURE_MODES[self.mode])
                    FakeCuda._check(rc, "cuStreamBeginCapture_v2")
                    self.stream = stream.value or 0
                    self._started.set()
                    self._stop.wait()
                    graph = ctypes.c_void_p()
                    self.end_result = int(lib.cuStreamEndCapture(stream, ctypes.byref(graph)))
                    if graph.value:
                        lib.cuGraphDestroy(graph)
                finally:
                    lib.cuStreamDestroy_v2(stream)
        except BaseException as e:  # reported to the test's thread
            self._error = e
        finally:
            self._started.set()

    def status(self) -> str:
        """ "active", "invalidated" or "none" (cuStreamIsCapturing on the capture's stream; "none" once ended)."""
        if self.end_result is not None or not self._thread.is_alive():
            return "none"
        st = ctypes.c_int(-1)
        with self.fake._as_harness():
            rc = self.fake.lib.cuStreamIsCapturing(ctypes.c_void_p(self.stream), ctypes.byref(st))
        FakeCuda._check(rc, "cuStreamIsCapturing")
        return CAPTURE_STATUS[st.value]

    def end(self) -> int:
        """End the capture on its thread; cuStreamEndCapture's CUresult (0 when the capture stayed valid)."""
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self.end_result is not None
        return self.end_result
