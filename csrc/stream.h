// Stream: move-only owner of a CU_STREAM_NON_BLOCKING stream (gpusleep's copy streams must not
// synchronize with the legacy stream, which would also break CUDA graph capture elsewhere in the process:
// cuda-vmm-rules.md section 12). Destroyed with cuStreamDestroy.
#pragma once

#include <cuda.h>

#include <utility>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

class Stream {
 public:
  Stream() = default;
  struct Create {};
  explicit Stream(Create) { GPUSLEEP_CU_CHECK(cuStreamCreate, "non-blocking copy stream", &stream_, static_cast<unsigned>(CU_STREAM_NON_BLOCKING)); }
  ~Stream() { reset(); }
  Stream(Stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
  Stream& operator=(Stream&& other) noexcept {
    if (this != &other) {
      reset();
      stream_ = std::exchange(other.stream_, nullptr);
    }
    return *this;
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  CUstream get() const noexcept { return stream_; }

  void reset() noexcept {
    if (stream_ == nullptr) return;
    const CUresult result = GPUSLEEP_CU(cuStreamDestroy, stream_);
    if (result != CUDA_SUCCESS) note_teardown_failure("cuStreamDestroy", result);
    stream_ = nullptr;
  }

 private:
  CUstream stream_ = nullptr;
};

}  // namespace gpusleep
