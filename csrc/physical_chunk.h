// PhysicalChunk: move-only owner of one cuMemCreate allocation (a CUmemGenericAllocationHandle).
// Released with cuMemRelease on destruction; the driver frees the memory once every mapping of it is gone.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <string>
#include <utility>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

class PhysicalChunk {
 public:
  PhysicalChunk() = default;
  // Requires a current context. Throws OutOfMemory (with size and device) or CudaError.
  PhysicalChunk(int device, size_t size_bytes) : size_bytes_(size_bytes) {
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    const CUresult result = GPUSLEEP_CU(cuMemCreate, &handle_, size_bytes, &prop, 0ULL);
    if (result != CUDA_SUCCESS) {
      handle_ = 0;
      throw_driver_error("cuMemCreate", format_bytes(size_bytes) + " on device " + std::to_string(device), result,
                         __FILE__, __LINE__, size_bytes, device);
    }
  }
  ~PhysicalChunk() { reset(); }
  PhysicalChunk(PhysicalChunk&& other) noexcept
      : handle_(std::exchange(other.handle_, 0)), size_bytes_(std::exchange(other.size_bytes_, 0)) {}
  PhysicalChunk& operator=(PhysicalChunk&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, 0);
      size_bytes_ = std::exchange(other.size_bytes_, 0);
    }
    return *this;
  }
  PhysicalChunk(const PhysicalChunk&) = delete;
  PhysicalChunk& operator=(const PhysicalChunk&) = delete;

  CUmemGenericAllocationHandle handle() const noexcept { return handle_; }
  size_t size_bytes() const noexcept { return size_bytes_; }

  void reset() noexcept {
    if (handle_ == 0) return;
    const CUresult result = GPUSLEEP_CU(cuMemRelease, handle_);
    if (result != CUDA_SUCCESS) note_teardown_failure("cuMemRelease", result);
    handle_ = 0;
    size_bytes_ = 0;
  }

 private:
  CUmemGenericAllocationHandle handle_ = 0;
  size_t size_bytes_ = 0;
};

}  // namespace gpusleep
