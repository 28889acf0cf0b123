// DriverOwner: the move-only ownership shared by every RAII owner of a driver object (physical chunk,
// address reservation, mapping, pinned buffer, stream). It holds a handle and a size in bytes and calls
// Traits::release(handle, size) exactly once; the destructor is noexcept and records a failed release
// with note_teardown_failure() instead of throwing.
//
// Traits provide:  static CUresult release(Handle, size_t) noexcept;  static constexpr const char* kRelease;
#pragma once

#include <cuda.h>

#include <cstddef>
#include <utility>

#include "errors.h"

namespace gpusleep {

template <typename Handle, typename Traits>
class DriverOwner {
 public:
  DriverOwner() = default;
  ~DriverOwner() { reset(); }
  DriverOwner(DriverOwner&& other) noexcept
      : handle_(std::exchange(other.handle_, Handle{})), size_bytes_(std::exchange(other.size_bytes_, 0)) {}
  DriverOwner& operator=(DriverOwner&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, Handle{});
      size_bytes_ = std::exchange(other.size_bytes_, 0);
    }
    return *this;
  }
  DriverOwner(const DriverOwner&) = delete;
  DriverOwner& operator=(const DriverOwner&) = delete;

  size_t size_bytes() const noexcept { return size_bytes_; }

  void reset() noexcept {
    if (handle_ == Handle{}) return;
    const CUresult result = Traits::release(handle_, size_bytes_);
    if (result != CUDA_SUCCESS) note_teardown_failure(Traits::kRelease, result);
    handle_ = Handle{};
    size_bytes_ = 0;
  }

 protected:
  // Adopts a handle the derived constructor obtained from the driver.
  DriverOwner(Handle handle, size_t size_bytes) noexcept : handle_(handle), size_bytes_(size_bytes) {}
  Handle handle_{};
  size_t size_bytes_ = 0;
};

}  // namespace gpusleep
