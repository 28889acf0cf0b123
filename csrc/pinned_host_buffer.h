// PinnedHostBuffer: move-only owner of page-locked host memory from cuMemHostAlloc (portable, so any
// context's copies run at full DMA speed). Freed with cuMemFreeHost on destruction.
#pragma once

#include <cuda.h>

#include <cstddef>

#include "driver_api.h"
#include "driver_owner.h"
#include "errors.h"
#include "host_memory_budget.h"

namespace gpusleep {

struct PinnedHostBufferTraits {
  static CUresult release(char* data, size_t) noexcept { return GPUSLEEP_CU(cuMemFreeHost, static_cast<void*>(data)); }
  static constexpr const char* kRelease = "cuMemFreeHost";
};

class PinnedHostBuffer : public DriverOwner<char*, PinnedHostBufferTraits> {
 public:
  PinnedHostBuffer() = default;
  explicit PinnedHostBuffer(size_t size_bytes) {
    void* data = nullptr;
    const CUresult result =
        GPUSLEEP_CU(cuMemHostAlloc, &data, size_bytes, static_cast<unsigned>(CU_MEMHOSTALLOC_PORTABLE));
    if (result != CUDA_SUCCESS) {
      const std::string what = format_bytes(size_bytes) + " of pinned host memory";
      if (result == CUDA_ERROR_OUT_OF_MEMORY) {
        throw HostOutOfMemory(describe_driver_failure("cuMemHostAlloc", what, result, __FILE__, __LINE__) +
                                  ". Level-1 sleep keeps the offloaded tags in pinned host memory: free host "
                                  "memory, or use sleep(level=2).",
                              size_bytes, read_host_memory_budget().available_bytes(), "driver");
      }
      throw_driver_error("cuMemHostAlloc", what, result, __FILE__, __LINE__);
    }
    handle_ = static_cast<char*>(data);
    size_bytes_ = size_bytes;
  }

  char* data() const noexcept { return handle_; }
};

}  // namespace gpusleep
