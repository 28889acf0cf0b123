// AddressReservation: move-only owner of one cuMemAddressReserve range. Freed with cuMemAddressFree on
// destruction. Invariant 1 of docs/invariants.md lives here: the range outlives every sleep and wake of the memory
// mapped into it, so the addresses handed out never move.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <string>

#include "driver_api.h"
#include "driver_owner.h"
#include "errors.h"

namespace gpusleep {

struct AddressReservationTraits {
  static CUresult release(CUdeviceptr base, size_t size_bytes) noexcept {
    return GPUSLEEP_CU(cuMemAddressFree, base, size_bytes);
  }
  static constexpr const char* kRelease = "cuMemAddressFree";
};

class AddressReservation : public DriverOwner<CUdeviceptr, AddressReservationTraits> {
 public:
  AddressReservation() = default;
  // Out of virtual address space is a CudaError (CUDA_ERROR_OUT_OF_MEMORY), not a GPU-memory OutOfMemory.
  AddressReservation(size_t size_bytes, size_t alignment_bytes, int device) {
    CUdeviceptr base = 0;
    const CUresult result = GPUSLEEP_CU(cuMemAddressReserve, &base, size_bytes, alignment_bytes, CUdeviceptr{0}, 0ULL);
    if (result != CUDA_SUCCESS) {
      throw_driver_error("cuMemAddressReserve",
                         format_bytes(size_bytes) + " of virtual address space for device " + std::to_string(device),
                         result, __FILE__, __LINE__);
    }
    handle_ = base;
    size_bytes_ = size_bytes;
  }

  CUdeviceptr base() const noexcept { return handle_; }
};

}  // namespace gpusleep
