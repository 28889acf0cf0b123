// LoadedModule: move-only owner of a module loaded into a context with cuModuleLoadData (PTX JIT-compiled by
// the driver). Unloaded with cuModuleUnload, which needs no current context.
#pragma once

#include <cuda.h>

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
  // the module only on success.
  CUresult load(const char* image) noexcept {
    reset();
    CUmodule module = nullptr;
    const CUresult result = GPUSLEEP_CU(cuModuleLoadData, &module, static_cast<const void*>(image));
    if (result == CUDA_SUCCESS) handle_ = module;
    return result;
  }

  CUmodule get() const noexcept { return handle_; }
};

}  // namespace gpusleep
