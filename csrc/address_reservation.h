// AddressReservation: move-only owner of one cuMemAddressReserve range. Freed with cuMemAddressFree on
// destruction. Invariant 1 of DESIGN.md lives here: the range outlives every sleep and wake of the memory
// mapped into it, so the addresses handed out never move.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <utility>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

class AddressReservation {
 public:
  AddressReservation() = default;
  AddressReservation(size_t size_bytes, size_t alignment_bytes) : size_bytes_(size_bytes) {
    const CUresult result = GPUSLEEP_CU(cuMemAddressReserve, &base_, size_bytes, alignment_bytes, CUdeviceptr{0}, 0ULL);
    if (result != CUDA_SUCCESS) {
      base_ = 0;
      throw_driver_error("cuMemAddressReserve", format_bytes(size_bytes) + " of virtual address space", result,
                         __FILE__, __LINE__, size_bytes);
    }
  }
  ~AddressReservation() { reset(); }
  AddressReservation(AddressReservation&& other) noexcept
      : base_(std::exchange(other.base_, 0)), size_bytes_(std::exchange(other.size_bytes_, 0)) {}
  AddressReservation& operator=(AddressReservation&& other) noexcept {
    if (this != &other) {
      reset();
      base_ = std::exchange(other.base_, 0);
      size_bytes_ = std::exchange(other.size_bytes_, 0);
    }
    return *this;
  }
  AddressReservation(const AddressReservation&) = delete;
  AddressReservation& operator=(const AddressReservation&) = delete;

  CUdeviceptr base() const noexcept { return base_; }
  size_t size_bytes() const noexcept { return size_bytes_; }

  void reset() noexcept {
    if (base_ == 0) return;
    const CUresult result = GPUSLEEP_CU(cuMemAddressFree, base_, size_bytes_);
    if (result != CUDA_SUCCESS) note_teardown_failure("cuMemAddressFree", result);
    base_ = 0;
    size_bytes_ = 0;
  }

 private:
  CUdeviceptr base_ = 0;
  size_t size_bytes_ = 0;
};

}  // namespace gpusleep
