#include "driver_api.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <type_traits>

#include "errors.h"

namespace gpusleep {
namespace {

// The exported symbol of each entry point, spelled out in the table (cuMemGetInfo_v2, ...), never cuda.h's macro.
constexpr std::array<const char*, kDriverFnCount> kSymbols = {
#define GPUSLEEP_SYMBOL_ENTRY(name, symbol, ...) #symbol,
    GPUSLEEP_DRIVER_ENTRY_POINTS(GPUSLEEP_SYMBOL_ENTRY) GPUSLEEP_DRIVER_OPTIONAL_ENTRY_POINTS(GPUSLEEP_SYMBOL_ENTRY)
#undef GPUSLEEP_SYMBOL_ENTRY
};

// Short names for reports: "cuMemGetInfo", not "cuMemGetInfo_v2".
constexpr std::array<const char*, kDriverFnCount> kNames = {
#define GPUSLEEP_NAME_ENTRY(name, symbol, ...) #name,
    GPUSLEEP_DRIVER_ENTRY_POINTS(GPUSLEEP_NAME_ENTRY) GPUSLEEP_DRIVER_OPTIONAL_ENTRY_POINTS(GPUSLEEP_NAME_ENTRY)
#undef GPUSLEEP_NAME_ENTRY
};

// The table's hand-written prototypes must be the ones the cuda.h in use declares for the same symbols: a typo
// would otherwise only show as a crash on a GPU. Every CUDA 12.x and 13.x cuda.h declares the required symbols;
// _v2 is declared by 12.x only (13.x keeps it in the driver, not in the header), and _v3 (declared from 12.3 on)
// differs only in the edge-data pointer, see driver_api.h.
#define GPUSLEEP_CHECK_PROTOTYPE(name, symbol, ...)                                    \
  static_assert(std::is_same<decltype(&::symbol), decltype(DriverTable::name)>::value, \
                "driver_api.h: the parameter types given for " #symbol " differ from its prototype in cuda.h");
GPUSLEEP_DRIVER_ENTRY_POINTS(GPUSLEEP_CHECK_PROTOTYPE)
GPUSLEEP_CHECK_PROTOTYPE(cuDeviceCanAccessPeer, cuDeviceCanAccessPeer)
#if CUDA_VERSION >= 12040
GPUSLEEP_CHECK_PROTOTYPE(cuFuncLoad, cuFuncLoad)
#endif
#if CUDA_VERSION < 13000
GPUSLEEP_CHECK_PROTOTYPE(cuStreamGetCaptureInfo_v2, cuStreamGetCaptureInfo_v2)
#endif
#undef GPUSLEEP_CHECK_PROTOTYPE

std::array<DriverCallCounter, kDriverFnCount> g_counters;

struct LoadedDriver {
  DriverTable table;
  std::string error;  // empty when loaded
};

void* resolve(void* library, const char* symbol) {
  dlerror();
  return dlsym(library, symbol);
}

LoadedDriver load_driver() {
  LoadedDriver loaded;
  const std::string path = driver_library_path();
  void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* why = dlerror();
    loaded.error = "gpusleep could not open the CUDA driver library '" + path + "' (" + (why ? why : "unknown") +
                   "). Sleep mode needs an NVIDIA GPU with its driver installed; set GPUSLEEP_CUDA_DRIVER to the "
                   "path of libcuda.so.1 if it lives elsewhere.";
    return loaded;
  }
  int index = 0;
#define GPUSLEEP_RESOLVE_REQUIRED(name, symbol, ...)                                                        \
  loaded.table.name = reinterpret_cast<decltype(loaded.table.name)>(resolve(library, kSymbols[index]));     \
  if (loaded.table.name == nullptr && loaded.error.empty()) {                                               \
    loaded.error = std::string("the CUDA driver library '") + path + "' has no symbol " + kSymbols[index] + \
                   "; gpusleep needs a driver for CUDA 12.0 or newer.";                                     \
  }                                                                                                         \
  ++index;
  GPUSLEEP_DRIVER_ENTRY_POINTS(GPUSLEEP_RESOLVE_REQUIRED)
#undef GPUSLEEP_RESOLVE_REQUIRED
#define GPUSLEEP_RESOLVE_OPTIONAL(name, symbol, ...) \
  loaded.table.name = reinterpret_cast<decltype(loaded.table.name)>(resolve(library, kSymbols[index++]));
  GPUSLEEP_DRIVER_OPTIONAL_ENTRY_POINTS(GPUSLEEP_RESOLVE_OPTIONAL)
#undef GPUSLEEP_RESOLVE_OPTIONAL
  if (!loaded.error.empty()) return loaded;
  const CUresult init = loaded.table.cuInit(0);
  if (init != CUDA_SUCCESS) {
    const char* name = nullptr;
    loaded.table.cuGetErrorName(init, &name);
    loaded.error = std::string("cuInit failed with ") + (name ? name : "an unknown error") + " (" +
                   std::to_string(static_cast<int>(init)) + ") after opening '" + path +
                   "': no usable CUDA device. Sleep mode needs an NVIDIA GPU.";
  }
  return loaded;  // the library stays open for the life of the process
}

const LoadedDriver& loaded_driver() {
  static const LoadedDriver loaded = load_driver();
  return loaded;
}

}  // namespace

std::string driver_library_path() {
  const char* override_path = std::getenv("GPUSLEEP_CUDA_DRIVER");
  return (override_path != nullptr && *override_path != '\0') ? override_path : "libcuda.so.1";
}

const DriverTable& driver() {
  const LoadedDriver& loaded = loaded_driver();
  if (!loaded.error.empty()) throw DriverUnavailable(loaded.error);
  return loaded.table;
}

const char* driver_fn_name(DriverFn fn) { return kNames[static_cast<int>(fn)]; }

DriverCallCounter& driver_counter(DriverFn fn) { return g_counters[static_cast<int>(fn)]; }

std::vector<DriverCounterSnapshot> driver_counters() {
  std::vector<DriverCounterSnapshot> out;
  out.reserve(kDriverFnCount);
  for (int i = 0; i < kDriverFnCount; ++i) {
    out.push_back({kNames[i], g_counters[i].calls.load(std::memory_order_relaxed),
                   g_counters[i].nanoseconds.load(std::memory_order_relaxed)});
  }
  return out;
}

void reset_driver_counters() {
  for (auto& counter : g_counters) {
    counter.calls.store(0, std::memory_order_relaxed);
    counter.nanoseconds.store(0, std::memory_order_relaxed);
  }
}

std::string cu_error_name(CUresult result) {
  const LoadedDriver& loaded = loaded_driver();
  const char* name = nullptr;
  if (loaded.error.empty() && loaded.table.cuGetErrorName(result, &name) == CUDA_SUCCESS && name != nullptr) {
    return name;
  }
  return "CUDA_ERROR_" + std::to_string(static_cast<int>(result));
}

std::string cu_error_text(CUresult result) {
  const LoadedDriver& loaded = loaded_driver();
  const char* text = nullptr;
  if (loaded.error.empty() && loaded.table.cuGetErrorString(result, &text) == CUDA_SUCCESS && text != nullptr) {
    return text;
  }
  return "unknown error";
}

}  // namespace gpusleep
