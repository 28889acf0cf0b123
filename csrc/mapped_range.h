// MappedRange: move-only owner of the mappings that cover [base, base + size) of one reservation.
// Unmapped with a single cuMemUnmap on destruction (one call may cover several adjacent whole mappings of
// one reservation: cuda-vmm-rules.md section 7). The caller must have made sure no queued GPU work still
// touches the range (DESIGN.md invariant 2); unmap does not wait for it.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <utility>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

class MappedRange {
 public:
  MappedRange() = default;
  // Adopts mappings the caller already made with cuMemMap.
  MappedRange(CUdeviceptr base, size_t size_bytes) noexcept : base_(base), size_bytes_(size_bytes) {}
  ~MappedRange() { reset(); }
  MappedRange(MappedRange&& other) noexcept
      : base_(std::exchange(other.base_, 0)), size_bytes_(std::exchange(other.size_bytes_, 0)) {}
  MappedRange& operator=(MappedRange&& other) noexcept {
    if (this != &other) {
      reset();
      base_ = std::exchange(other.base_, 0);
      size_bytes_ = std::exchange(other.size_bytes_, 0);
    }
    return *this;
  }
  MappedRange(const MappedRange&) = delete;
  MappedRange& operator=(const MappedRange&) = delete;

  CUdeviceptr base() const noexcept { return base_; }
  size_t size_bytes() const noexcept { return size_bytes_; }
  bool empty() const noexcept { return size_bytes_ == 0; }

  // Grows the adopted range by a mapping made right after it.
  void extend(size_t size_bytes) noexcept { size_bytes_ += size_bytes; }

  void reset() noexcept {
    if (size_bytes_ == 0) return;
    const CUresult result = GPUSLEEP_CU(cuMemUnmap, base_, size_bytes_);
    if (result != CUDA_SUCCESS) note_teardown_failure("cuMemUnmap", result);
    base_ = 0;
    size_bytes_ = 0;
  }

 private:
  CUdeviceptr base_ = 0;
  size_t size_bytes_ = 0;
};

}  // namespace gpusleep
