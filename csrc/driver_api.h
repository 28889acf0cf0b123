// The only place in gpusleep that talks to the CUDA driver.
//
// Entry points are listed once in GPUSLEEP_DRIVER_ENTRY_POINTS (an X-macro table, the habit of PyTorch's
// c10/cuda/driver_api.h) and resolved with dlsym from libcuda opened by dlopen at first use. Nothing links
// libcuda, so `import gpusleep` works on machines without a GPU (docs/invariants.md, invariant 6). The environment
// variable GPUSLEEP_CUDA_DRIVER names another library to open (the tests point it at tests/fakecuda).
//
// Every call made through GPUSLEEP_CU() is counted and timed per entry point (two steady_clock reads, a few
// tens of ns, only on driver calls, never on a cached allocation); DriverCounters exposes the totals so the
// benchmarks can report the cost of each driver call on a card.
#pragma once

#include <cuda.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace gpusleep {

// X(name, symbol, parameter types...): one driver entry point.
//   name    how the core calls it: GPUSLEEP_CU(name, ...). The cuda.h spelling; where cuda.h maps it to a
//           versioned macro (cuMemGetInfo -> cuMemGetInfo_v2) the table member follows that macro, consistently.
//   symbol  the exact symbol resolved with dlsym, explicitly versioned, never taken from cuda.h's macros: cuda.h
//           remaps names between releases (cuStreamGetCaptureInfo is _v2 with 12.x headers and _v3, with one more
//           argument, with 13.x), so `decltype(&::name)` would break the build whenever a prototype changes.
//   types   the parameter types of that symbol's prototype, identical in every CUDA 12.x and 13.x cuda.h
//           (driver_api.cpp checks them against the cuda.h in use where it declares the symbol).
// Adding an entry point is one line here, e.g.
//   X(cuDeviceCanAccessPeer, cuDeviceCanAccessPeer, int*, CUdevice, CUdevice)
// (and, for the CPU suite, the same symbol in tests/fakecuda). The symbol to name: the one cuda.h 12.0 maps the
// name to (`grep -n "define cuName " cuda.h`), e.g. cuMemHostRegister -> cuMemHostRegister_v2.
#define GPUSLEEP_DRIVER_ENTRY_POINTS(X)                                                                               \
  X(cuInit, cuInit, unsigned int)                                                                                     \
  X(cuDriverGetVersion, cuDriverGetVersion, int*)                                                                     \
  X(cuGetErrorName, cuGetErrorName, CUresult, const char**)                                                           \
  X(cuGetErrorString, cuGetErrorString, CUresult, const char**)                                                       \
  X(cuDeviceGet, cuDeviceGet, CUdevice*, int)                                                                         \
  X(cuDeviceGetCount, cuDeviceGetCount, int*)                                                                         \
  X(cuDeviceGetAttribute, cuDeviceGetAttribute, int*, CUdevice_attribute, CUdevice)                                   \
  X(cuDeviceGetName, cuDeviceGetName, char*, int, CUdevice)                                                           \
  X(cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain, CUcontext*, CUdevice)                                         \
  X(cuDevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease_v2, CUdevice)                                                \
  X(cuDevicePrimaryCtxGetState, cuDevicePrimaryCtxGetState, CUdevice, unsigned int*, int*)                            \
  X(cuCtxGetCurrent, cuCtxGetCurrent, CUcontext*)                                                                     \
  X(cuCtxSetCurrent, cuCtxSetCurrent, CUcontext)                                                                      \
  X(cuCtxGetDevice, cuCtxGetDevice, CUdevice*)                                                                        \
  X(cuCtxSynchronize, cuCtxSynchronize, void)                                                                         \
  X(cuMemGetInfo, cuMemGetInfo_v2, size_t*, size_t*)                                                                  \
  X(cuMemGetAllocationGranularity, cuMemGetAllocationGranularity, size_t*, const CUmemAllocationProp*,                \
    CUmemAllocationGranularity_flags)                                                                                 \
  X(cuMemAddressReserve, cuMemAddressReserve, CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long)          \
  X(cuMemAddressFree, cuMemAddressFree, CUdeviceptr, size_t)                                                          \
  X(cuMemCreate, cuMemCreate, CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long)  \
  X(cuMemRelease, cuMemRelease, CUmemGenericAllocationHandle)                                                         \
  X(cuMemMap, cuMemMap, CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long)                \
  X(cuMemUnmap, cuMemUnmap, CUdeviceptr, size_t)                                                                      \
  X(cuMemSetAccess, cuMemSetAccess, CUdeviceptr, size_t, const CUmemAccessDesc*, size_t)                              \
  X(cuMemHostAlloc, cuMemHostAlloc, void**, size_t, unsigned int)                                                     \
  X(cuMemFreeHost, cuMemFreeHost, void*)                                                                              \
  X(cuMemHostRegister, cuMemHostRegister_v2, void*, size_t, unsigned int)                                             \
  X(cuMemHostUnregister, cuMemHostUnregister, void*)                                                                  \
  X(cuMemcpyDtoHAsync, cuMemcpyDtoHAsync_v2, void*, CUdeviceptr, size_t, CUstream)                                    \
  X(cuMemcpyHtoDAsync, cuMemcpyHtoDAsync_v2, CUdeviceptr, const void*, size_t, CUstream)                              \
  X(cuMemsetD8Async, cuMemsetD8Async, CUdeviceptr, unsigned char, size_t, CUstream)                                   \
  X(cuStreamCreate, cuStreamCreate, CUstream*, unsigned int)                                                          \
  X(cuStreamDestroy, cuStreamDestroy_v2, CUstream)                                                                    \
  X(cuStreamSynchronize, cuStreamSynchronize, CUstream)                                                               \
  X(cuStreamQuery, cuStreamQuery, CUstream)                                                                           \
  X(cuStreamIsCapturing, cuStreamIsCapturing, CUstream, CUstreamCaptureStatus*)                                       \
  X(cuThreadExchangeStreamCaptureMode, cuThreadExchangeStreamCaptureMode, CUstreamCaptureMode*)                       \
  X(cuModuleLoadDataEx, cuModuleLoadDataEx, CUmodule*, const void*, unsigned int, CUjit_option*, void**)              \
  X(cuModuleUnload, cuModuleUnload, CUmodule)                                                                         \
  X(cuModuleGetFunction, cuModuleGetFunction, CUfunction*, CUmodule, const char*)                                     \
  X(cuLaunchKernel, cuLaunchKernel, CUfunction, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int, \
    unsigned int, unsigned int, CUstream, void**, void**)

// Resolved when present, nullptr otherwise (check before calling); gpusleep works without them. cuFuncLoad
// (drivers >= 12.4) loads a lazily loaded kernel now rather than at its first launch. The capture-id
// queries (see stream_capture.h): _v3 (drivers >= 12.3; its edge-data out-parameter is typed `const void**` because
// CUgraphEdgeData only exists in cuda.h >= 12.3, and gpusleep passes nullptr) and _v2 (drivers >= 11.3).
#define GPUSLEEP_DRIVER_OPTIONAL_ENTRY_POINTS(X)                                                                   \
  X(cuDeviceCanAccessPeer, cuDeviceCanAccessPeer, int*, CUdevice, CUdevice)                                        \
  X(cuFuncLoad, cuFuncLoad, CUfunction)                                                                            \
  X(cuStreamGetCaptureInfo_v3, cuStreamGetCaptureInfo_v3, CUstream, CUstreamCaptureStatus*, cuuint64_t*, CUgraph*, \
    const CUgraphNode**, const void**, size_t*)                                                                    \
  X(cuStreamGetCaptureInfo_v2, cuStreamGetCaptureInfo_v2, CUstream, CUstreamCaptureStatus*, cuuint64_t*, CUgraph*, \
    const CUgraphNode**, size_t*)

enum class DriverFn : int {
#define GPUSLEEP_ENUM_ENTRY(name, symbol, ...) name,
  GPUSLEEP_DRIVER_ENTRY_POINTS(GPUSLEEP_ENUM_ENTRY) GPUSLEEP_DRIVER_OPTIONAL_ENTRY_POINTS(GPUSLEEP_ENUM_ENTRY)
#undef GPUSLEEP_ENUM_ENTRY
      kCount
};

constexpr int kDriverFnCount = static_cast<int>(DriverFn::kCount);

// The resolved table: one function pointer per entry point, named like the enum, typed from the table above.
struct DriverTable {
#define GPUSLEEP_TABLE_ENTRY(name, symbol, ...) CUresult(CUDAAPI* name)(__VA_ARGS__) = nullptr;
  GPUSLEEP_DRIVER_ENTRY_POINTS(GPUSLEEP_TABLE_ENTRY) GPUSLEEP_DRIVER_OPTIONAL_ENTRY_POINTS(GPUSLEEP_TABLE_ENTRY)
#undef GPUSLEEP_TABLE_ENTRY
};

// Calls and nanoseconds per entry point since the last reset. Relaxed atomics: counts are statistics.
struct DriverCallCounter {
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> nanoseconds{0};
};

struct DriverCounterSnapshot {
  std::string name;
  uint64_t calls;
  uint64_t nanoseconds;
};

// The driver table, opened and resolved on first call (thread-safe). Throws DriverUnavailable (see errors.h)
// with the dlopen/dlsym message and what to do when libcuda cannot be opened or cuInit fails.
const DriverTable& driver();

// The library that driver() opens: $GPUSLEEP_CUDA_DRIVER, else "libcuda.so.1".
std::string driver_library_path();

const char* driver_fn_name(DriverFn fn);
DriverCallCounter& driver_counter(DriverFn fn);
std::vector<DriverCounterSnapshot> driver_counters();
void reset_driver_counters();

// "CUDA_ERROR_OUT_OF_MEMORY" and "out of memory" for a CUresult; safe when the driver is not loaded.
std::string cu_error_name(CUresult result);
std::string cu_error_text(CUresult result);

namespace detail {
template <typename Fn, typename... Args>
inline CUresult timed_driver_call(DriverFn id, Fn fn, Args... args) {
  const auto start = std::chrono::steady_clock::now();
  const CUresult result = fn(args...);
  const auto stop = std::chrono::steady_clock::now();
  DriverCallCounter& counter = driver_counter(id);
  counter.calls.fetch_add(1, std::memory_order_relaxed);
  counter.nanoseconds.fetch_add(
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(stop - start).count()),
      std::memory_order_relaxed);
  return result;
}
}  // namespace detail

}  // namespace gpusleep

// GPUSLEEP_CU(cuMemCreate, &handle, size, &prop, 0) -> CUresult, counted and timed.
#define GPUSLEEP_CU(name, ...) \
  ::gpusleep::detail::timed_driver_call(::gpusleep::DriverFn::name, ::gpusleep::driver().name, ##__VA_ARGS__)
