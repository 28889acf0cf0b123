#include "stream_capture.h"

#include "driver_api.h"

namespace gpusleep {

uint64_t capture_id_of(CUstream stream) {
  const DriverTable& d = driver();
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  if (d.cuStreamGetCaptureInfo != nullptr) {
    cuuint64_t id = 0;
    if (GPUSLEEP_CU(cuStreamGetCaptureInfo, stream, &status, &id, nullptr, nullptr, nullptr, nullptr) != CUDA_SUCCESS) {
      return 0;
    }
    return status == CU_STREAM_CAPTURE_STATUS_ACTIVE ? (id == 0 ? 1 : id) : 0;
  }
  if (GPUSLEEP_CU(cuStreamIsCapturing, stream, &status) != CUDA_SUCCESS) return 0;
  return status == CU_STREAM_CAPTURE_STATUS_ACTIVE ? reinterpret_cast<uint64_t>(stream) | 1 : 0;
}

}  // namespace gpusleep
