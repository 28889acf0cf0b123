// Stream: move-only owner of a CU_STREAM_NON_BLOCKING stream (gpusleep's copy streams must not
// synchronize with the legacy stream, which would also break CUDA graph capture elsewhere in the process:
// docs/driver-rules.md section 12). Destroyed with cuStreamDestroy.
#pragma once

#include <cuda.h>

#include "driver_api.h"
#include "driver_owner.h"
#include "errors.h"

namespace gpusleep {

struct StreamTraits {
  static CUresult release(CUstream stream, size_t) noexcept { return GPUSLEEP_CU(cuStreamDestroy, stream); }
  static constexpr const char* kRelease = "cuStreamDestroy";
};

class Stream : public DriverOwner<CUstream, StreamTraits> {
 public:
  Stream() = default;
  struct Create {};
  explicit Stream(Create) {
    CUstream stream = nullptr;
    GPUSLEEP_CU_CHECK(cuStreamCreate, "non-blocking copy stream", &stream,
                      static_cast<unsigned>(CU_STREAM_NON_BLOCKING));
    handle_ = stream;
  }

  // Takes ownership of a stream created by the caller.
  static Stream adopt(CUstream stream) noexcept {
    Stream owned;
    owned.handle_ = stream;
    return owned;
  }

  CUstream get() const noexcept { return handle_; }
};

}  // namespace gpusleep
