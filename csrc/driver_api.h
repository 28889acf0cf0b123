// The only place in gpusleep that talks to the CUDA driver.
//
// Entry points are listed once in GPUSLEEP_DRIVER_ENTRY_POINTS (an X-macro table, the habit of PyTorch's
// c10/cuda/driver_api.h) and resolved with dlsym from libcuda opened by dlopen at first use. Nothing links
// libcuda, so `import gpusleep` works on machines without a GPU (DESIGN.md invariant 6). The environment
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

// X(name): the cuda.h name; the symbol resolved is what cuda.h maps it to (cuMemGetInfo -> cuMemGetInfo_v2).
#define GPUSLEEP_DRIVER_ENTRY_POINTS(X) \
  X(cuInit)                             \
  X(cuDriverGetVersion)                 \
  X(cuGetErrorName)                     \
  X(cuGetErrorString)                   \
  X(cuDeviceGet)                        \
  X(cuDeviceGetCount)                   \
  X(cuDeviceGetAttribute)               \
  X(cuDevicePrimaryCtxRetain)           \
  X(cuDevicePrimaryCtxRelease)          \
  X(cuCtxGetCurrent)                    \
  X(cuCtxSetCurrent)                    \
  X(cuCtxSynchronize)                   \
  X(cuMemGetInfo)                       \
  X(cuMemGetAllocationGranularity)      \
  X(cuMemAddressReserve)                \
  X(cuMemAddressFree)                   \
  X(cuMemCreate)                        \
  X(cuMemRelease)                       \
  X(cuMemMap)                           \
  X(cuMemUnmap)                         \
  X(cuMemSetAccess)                     \
  X(cuMemHostAlloc)                     \
  X(cuMemFreeHost)                      \
  X(cuMemcpyDtoHAsync)                  \
  X(cuMemcpyHtoDAsync)                  \
  X(cuMemsetD8Async)                    \
  X(cuStreamCreate)                     \
  X(cuStreamDestroy)                    \
  X(cuStreamSynchronize)                \
  X(cuStreamIsCapturing)                \
  X(cuThreadExchangeStreamCaptureMode)

// Resolved when present; gpusleep works without them (older drivers).
#define GPUSLEEP_DRIVER_OPTIONAL_ENTRY_POINTS(X) X(cuStreamGetCaptureInfo)

enum class DriverFn : int {
#define GPUSLEEP_ENUM_ENTRY(name) name,
  GPUSLEEP_DRIVER_ENTRY_POINTS(GPUSLEEP_ENUM_ENTRY) GPUSLEEP_DRIVER_OPTIONAL_ENTRY_POINTS(GPUSLEEP_ENUM_ENTRY)
#undef GPUSLEEP_ENUM_ENTRY
      kCount
};

constexpr int kDriverFnCount = static_cast<int>(DriverFn::kCount);

// The resolved table. Members are named after the cuda.h names and typed from cuda.h's prototypes.
struct DriverTable {
#define GPUSLEEP_TABLE_ENTRY(name) decltype(&::name) name = nullptr;
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
