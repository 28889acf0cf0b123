// DriverOwner: the move-only ownership shared by every RAII owner of a driver object (physical chunk,
// address reservation, mapping, pinned buffer, stream). It holds a handle and a size in bytes.
// try_release() asks the driver to release it and, if the driver refuses, keeps the handle so that the
// release can be retried (Note [Refused releases] in release_queue.h). The destructor is noexcept: it
// releases once and records a refusal with note_teardown_failure() instead of throwing; code that must
// not forget a refused object calls try_release() and hands what is left to a ReleaseQueue.
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
  bool owns() const noexcept { return handle_ != Handle{}; }

  // Releases the object; on failure nothing changes (still owned) and the driver's code is returned.
  CUresult try_release() noexcept {
    if (handle_ == Handle{}) return CUDA_SUCCESS;
    const CUresult result = Traits::release(handle_, size_bytes_);
    if (result == CUDA_SUCCESS) {
      handle_ = Handle{};
      size_bytes_ = 0;
    }
    return result;
  }

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
