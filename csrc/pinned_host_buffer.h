// PinnedHostBuffer: move-only owner of page-locked host memory from cuMemHostAlloc (portable, so any
// context's copies run at full DMA speed). Freed with cuMemFreeHost on destruction.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <utility>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  explicit PinnedHostBuffer(size_t size_bytes) : size_bytes_(size_bytes) {
    void* data = nullptr;
    const CUresult result = GPUSLEEP_CU(cuMemHostAlloc, &data, size_bytes, static_cast<unsigned>(CU_MEMHOSTALLOC_PORTABLE));
    if (result != CUDA_SUCCESS) {
      size_bytes_ = 0;
      if (result == CUDA_ERROR_OUT_OF_MEMORY) {
        throw OutOfMemory(describe_driver_failure("cuMemHostAlloc", format_bytes(size_bytes) + " of pinned host memory",
                                                  result, __FILE__, __LINE__) +
                              ". Level-1 sleep keeps the offloaded tags in pinned host memory: free host memory, "
                              "or use sleep(level=2).",
                          size_bytes, 0, -1);
      }
      throw_driver_error("cuMemHostAlloc", format_bytes(size_bytes) + " of pinned host memory", result, __FILE__,
                         __LINE__);
    }
    data_ = static_cast<char*>(data);
  }
  ~PinnedHostBuffer() { reset(); }
  PinnedHostBuffer(PinnedHostBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_bytes_(std::exchange(other.size_bytes_, 0)) {}
  PinnedHostBuffer& operator=(PinnedHostBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      size_bytes_ = std::exchange(other.size_bytes_, 0);
    }
    return *this;
  }
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;

  char* data() const noexcept { return data_; }
  size_t size_bytes() const noexcept { return size_bytes_; }

  void reset() noexcept {
    if (data_ == nullptr) return;
    const CUresult result = GPUSLEEP_CU(cuMemFreeHost, static_cast<void*>(data_));
    if (result != CUDA_SUCCESS) note_teardown_failure("cuMemFreeHost", result);
    data_ = nullptr;
    size_bytes_ = 0;
  }

 private:
  char* data_ = nullptr;
  size_t size_bytes_ = 0;
};

}  // namespace gpusleep
