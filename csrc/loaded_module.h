// LoadedModule: move-only owner of a module loaded into a context with cuModuleLoadDataEx (PTX JIT-compiled by
// the driver, whose error log is kept when it refuses). Unloaded with cuModuleUnload, which needs no current
// context.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "driver_api.h"
#include "driver_owner.h"

namespace gpusleep {

struct LoadedModuleTraits {
  static CUresult release(CUmodule module, size_t) noexcept { return GPUSLEEP_CU(cuModuleUnload, module); }
  static constexpr const char* kRelease = "cuModuleUnload";
};

class LoadedModule : public DriverOwner<CUmodule, LoadedModuleTraits> {
 public:
  LoadedModule() = default;
  // Loads `image` (NUL-terminated PTX text) into the current context; returns the driver's code, and owns
  // the module only on success. On a refusal, jit_log() says what the JIT said (may be empty).
  CUresult load(const char* image) noexcept {
    reset();
    CUmodule module = nullptr;
    char log[kJitLogBytes] = {};
    CUjit_option options[] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void* values[] = {log, reinterpret_cast<void*>(static_cast<uintptr_t>(sizeof(log)))};
    const CUresult result =
        GPUSLEEP_CU(cuModuleLoadDataEx, &module, static_cast<const void*>(image), 2u, options, values);
    if (result == CUDA_SUCCESS) handle_ = module;
    try {
      jit_log_ = result == CUDA_SUCCESS ? std::string() : std::string(log, strnlen(log, sizeof(log)));
    } catch (...) {  // no memory for the log: the code alone says enough
    }
    return result;
  }

  // What the JIT said about the last refused load, trimmed ("" when it said nothing).
  const std::string& jit_log() const noexcept { return jit_log_; }

  CUmodule get() const noexcept { return handle_; }

 private:
  static constexpr size_t kJitLogBytes = 1024;
  std::string jit_log_;
};

}  // namespace gpusleep
