// MappedRange: move-only owner of the mappings that cover [base, base + size) of one reservation.
// Unmapped with a single cuMemUnmap on destruction (one call may cover several adjacent whole mappings of
// one reservation: docs/driver-rules.md section 7). The caller must have made sure no queued GPU work still
// touches the range (docs/invariants.md, invariant 2); unmap does not wait for it.
#pragma once

#include <cuda.h>

#include <cstddef>

#include "driver_api.h"
#include "driver_owner.h"

namespace gpusleep {

struct MappedRangeTraits {
  static CUresult release(CUdeviceptr base, size_t size_bytes) noexcept {
    return GPUSLEEP_CU(cuMemUnmap, base, size_bytes);
  }
  static constexpr const char* kRelease = "cuMemUnmap";
};

class MappedRange : public DriverOwner<CUdeviceptr, MappedRangeTraits> {
 public:
  MappedRange() = default;
  // Adopts mappings the caller already made with cuMemMap.
  MappedRange(CUdeviceptr base, size_t size_bytes) noexcept : DriverOwner(base, size_bytes) {}

  CUdeviceptr base() const noexcept { return handle_; }
  bool empty() const noexcept { return size_bytes_ == 0; }
  // Grows the adopted range by a mapping made right after it.
  void extend(size_t size_bytes) noexcept { size_bytes_ += size_bytes; }
};

}  // namespace gpusleep
