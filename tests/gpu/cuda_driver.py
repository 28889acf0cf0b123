"""A minimal ctypes binding of libcuda for the GPU suite: raw CUresult codes, no exceptions unless asked.

Used by the low-level core test (copies into gpusleep's device addresses without torch) and by the VMM
probe table (vmm_probes.py). Struct layouts follow cuda.h of CUDA 12 / 13."""

from __future__ import annotations

import ctypes
from ctypes import byref, c_char, c_int, c_size_t, c_uint, c_uint64, c_ulonglong, c_void_p

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_NONE = 0
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
CU_STREAM_NON_BLOCKING = 1
CAPTURE_MODES = {"global": 0, "thread_local": 1, "relaxed": 2}


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", c_int), ("id", c_int)]


class CUmemAllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", c_int),
        ("requestedHandleTypes", c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", c_void_p),
        ("allocFlags", CUmemAllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", c_int)]


class CudaCallError(RuntimeError):
    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.code = code
        self.name = name


class Driver:
    """libcuda entry points used by the tests; each method returns the CUresult (and outputs)."""

    def __init__(self, path: str = "libcuda.so.1") -> None:
        self.lib = ctypes.CDLL(path)

    # ---------------------------------------------------------------- errors
    def error_name(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self.lib.cuGetErrorName(c_int(code), byref(text)) != 0 or not text.value:
            return f"CUresult {code}"
        return text.value.decode()

    def check(self, call: str, code: int) -> None:
        if code != 0:
            raise CudaCallError(call, code, self.error_name(code))

    # ------------------------------------------------------- init, contexts
    def init(self) -> int:
        return self.lib.cuInit(c_uint(0))

    def device(self, ordinal: int) -> int:
        dev = c_int()
        self.check("cuDeviceGet", self.lib.cuDeviceGet(byref(dev), c_int(ordinal)))
        return dev.value

    def primary_context(self, device: int) -> c_void_p:
        ctx = c_void_p()
        self.check("cuDevicePrimaryCtxRetain", self.lib.cuDevicePrimaryCtxRetain(byref(ctx), c_int(device)))
        return ctx

    def primary_context_active(self, device: int) -> bool:
        """cuDevicePrimaryCtxGetState: whether anyone in this process holds the device's primary context."""
        flags, active = c_uint(), c_int()
        self.check("cuInit", self.init())
        self.check(
            "cuDevicePrimaryCtxGetState",
            self.lib.cuDevicePrimaryCtxGetState(c_int(self.device(device)), byref(flags), byref(active)),
        )
        return bool(active.value)

    def set_current(self, ctx: c_void_p | None) -> int:
        return self.lib.cuCtxSetCurrent(ctx if ctx is not None else c_void_p())

    def ctx_synchronize(self) -> int:
        return self.lib.cuCtxSynchronize()

    def device_name(self, device: int) -> str:
        buf = (c_char * 256)()
        self.check("cuDeviceGetName", self.lib.cuDeviceGetName(buf, c_int(256), c_int(device)))
        return buf.value.decode()

    def driver_version(self) -> int:
        version = c_int()
        self.check("cuDriverGetVersion", self.lib.cuDriverGetVersion(byref(version)))
        return version.value

    def mem_get_info(self) -> tuple[int, int, int]:
        free, total = c_size_t(), c_size_t()
        rc = self.lib.cuMemGetInfo_v2(byref(free), byref(total))
        return rc, free.value, total.value

    # ------------------------------------------------------------------ VMM
    @staticmethod
    def prop(device: int) -> CUmemAllocationProp:
        prop = CUmemAllocationProp()
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        return prop

    def granularity(self, device: int, option: int = CU_MEM_ALLOC_GRANULARITY_MINIMUM) -> tuple[int, int]:
        size = c_size_t()
        prop = self.prop(device)
        rc = self.lib.cuMemGetAllocationGranularity(byref(size), byref(prop), c_int(option))
        return rc, size.value

    def create(self, size: int, device: int, rdma_capable: bool = False) -> tuple[int, int]:
        handle = c_uint64()
        prop = self.prop(device)
        prop.allocFlags.gpuDirectRDMACapable = 1 if rdma_capable else 0
        rc = self.lib.cuMemCreate(byref(handle), c_size_t(size), byref(prop), c_ulonglong(0))
        return rc, handle.value

    def attribute(self, attribute: int, device: int) -> tuple[int, int]:
        """cuDeviceGetAttribute by number (110: RDMA with VMM, 134: host NUMA id)."""
        value = c_int()
        rc = self.lib.cuDeviceGetAttribute(byref(value), c_int(attribute), c_int(self.device(device)))
        return rc, value.value

    def release(self, handle: int) -> int:
        return self.lib.cuMemRelease(c_uint64(handle))

    def reserve(self, size: int, alignment: int = 0, hint: int = 0) -> tuple[int, int]:
        ptr = c_uint64()
        rc = self.lib.cuMemAddressReserve(
            byref(ptr), c_size_t(size), c_size_t(alignment), c_uint64(hint), c_ulonglong(0)
        )
        return rc, ptr.value

    def address_free(self, ptr: int, size: int) -> int:
        return self.lib.cuMemAddressFree(c_uint64(ptr), c_size_t(size))

    def map(self, ptr: int, size: int, handle: int, offset: int = 0) -> int:
        return self.lib.cuMemMap(c_uint64(ptr), c_size_t(size), c_size_t(offset), c_uint64(handle), c_ulonglong(0))

    def unmap(self, ptr: int, size: int) -> int:
        return self.lib.cuMemUnmap(c_uint64(ptr), c_size_t(size))

    def set_access(self, ptr: int, size: int, device: int, flags: int = CU_MEM_ACCESS_FLAGS_PROT_READWRITE) -> int:
        desc = CUmemAccessDesc()
        desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = device
        desc.flags = flags
        return self.lib.cuMemSetAccess(c_uint64(ptr), c_size_t(size), byref(desc), c_size_t(1))

    def get_access(self, ptr: int, device: int) -> tuple[int, int]:
        """cuMemGetAccess: the access flags `device` has to the mapping at ptr (0 none, 1 read, 3 read-write)."""
        location = CUmemLocation()
        location.type = CU_MEM_LOCATION_TYPE_DEVICE
        location.id = device
        flags = ctypes.c_ulonglong()
        rc = self.lib.cuMemGetAccess(byref(flags), byref(location), c_uint64(ptr))
        return rc, flags.value

    # --------------------------------------------------------------- copies
    def dtod_async(self, dst: int, src: int, num_bytes: int, stream: int) -> int:
        """cuMemcpyDtoDAsync_v2 on `stream` (a raw CUstream, e.g. torch's Stream.cuda_stream)."""
        return self.lib.cuMemcpyDtoDAsync_v2(c_uint64(dst), c_uint64(src), c_size_t(num_bytes), c_void_p(stream))

    def htod(self, dst: int, data: bytes) -> int:
        buf = (c_char * len(data)).from_buffer_copy(data)
        return self.lib.cuMemcpyHtoD_v2(c_uint64(dst), buf, c_size_t(len(data)))

    def dtoh(self, src: int, num_bytes: int) -> tuple[int, bytes]:
        buf = (c_char * num_bytes)()
        rc = self.lib.cuMemcpyDtoH_v2(buf, c_uint64(src), c_size_t(num_bytes))
        return rc, bytes(buf)

    # ---------------------------------------------------------- host memory
    def host_alloc(self, size: int) -> tuple[int, int]:
        ptr = c_void_p()
        rc = self.lib.cuMemHostAlloc(byref(ptr), c_size_t(size), c_uint(0))
        return rc, ptr.value or 0

    def free_host(self, ptr: int) -> int:
        return self.lib.cuMemFreeHost(c_void_p(ptr))

    def host_register(self, ptr: int, size: int) -> int:
        return self.lib.cuMemHostRegister_v2(c_void_p(ptr), c_size_t(size), c_uint(0))

    def host_unregister(self, ptr: int) -> int:
        return self.lib.cuMemHostUnregister(c_void_p(ptr))

    # ------------------------------------------------- streams, events, capture
    def stream_create(self, flags: int = CU_STREAM_NON_BLOCKING) -> c_void_p:
        stream = c_void_p()
        self.check("cuStreamCreate", self.lib.cuStreamCreate(byref(stream), c_uint(flags)))
        return stream

    def stream_destroy(self, stream: c_void_p) -> int:
        return self.lib.cuStreamDestroy_v2(stream)

    def stream_synchronize(self, stream: c_void_p) -> int:
        return self.lib.cuStreamSynchronize(stream)

    def begin_capture(self, stream: c_void_p, mode: str) -> int:
        return self.lib.cuStreamBeginCapture_v2(stream, c_int(CAPTURE_MODES[mode]))

    def end_capture(self, stream: c_void_p) -> tuple[int, c_void_p]:
        graph = c_void_p()
        rc = self.lib.cuStreamEndCapture(stream, byref(graph))
        return rc, graph

    def graph_destroy(self, graph: c_void_p) -> int:
        return self.lib.cuGraphDestroy(graph) if graph.value else 0

    def exchange_capture_mode(self, mode: str) -> tuple[int, str]:
        value = c_int(CAPTURE_MODES[mode])
        rc = self.lib.cuThreadExchangeStreamCaptureMode(byref(value))
        previous = {v: k for k, v in CAPTURE_MODES.items()}.get(value.value, str(value.value))
        return rc, previous


def primary_context_active(device: int) -> bool:
    return Driver().primary_context_active(device)


__all__ = ["Driver", "CudaCallError", "CAPTURE_MODES", "primary_context_active"]
