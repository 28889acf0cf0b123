#include "stream_capture.h"

#include <atomic>

#include "driver_api.h"

namespace gpusleep {
namespace {

// Ids handed out when the driver has no capture-info query (see stream_capture.h): one per query, never reused.
std::atomic<uint64_t> g_fallback_capture_ids{0};

uint64_t active_id(CUstreamCaptureStatus status, cuuint64_t driver_id) {
  if (status != CU_STREAM_CAPTURE_STATUS_ACTIVE) return 0;
  return driver_id == 0 ? 1 : driver_id;  // 0 means "not capturing" to the arena
}

}  // namespace

uint64_t capture_id_of(CUstream stream) {
  const DriverTable& d = driver();
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  cuuint64_t id = 0;
  if (d.cuStreamGetCaptureInfo_v3 != nullptr) {
    const CUresult result =
        GPUSLEEP_CU(cuStreamGetCaptureInfo_v3, stream, &status, &id, nullptr, nullptr, nullptr, nullptr);
    return result == CUDA_SUCCESS ? active_id(status, id) : 0;
  }
  if (d.cuStreamGetCaptureInfo_v2 != nullptr) {
    const CUresult result = GPUSLEEP_CU(cuStreamGetCaptureInfo_v2, stream, &status, &id, nullptr, nullptr, nullptr);
    return result == CUDA_SUCCESS ? active_id(status, id) : 0;
  }
  if (GPUSLEEP_CU(cuStreamIsCapturing, stream, &status) != CUDA_SUCCESS) return 0;
  if (status != CU_STREAM_CAPTURE_STATUS_ACTIVE) return 0;
  return g_fallback_capture_ids.fetch_add(1, std::memory_order_relaxed) + 1;
}

bool capture_ids_are_per_query() {
  const DriverTable& d = driver();
  return d.cuStreamGetCaptureInfo_v3 == nullptr && d.cuStreamGetCaptureInfo_v2 == nullptr;
}

}  // namespace gpusleep
