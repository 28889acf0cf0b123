// The preamble every transition shares, written once (Note [Transitions] in allocator.h): the capture check,
// the frees a capture deferred, the retry of refused releases; and the device waits before memory is released.
#include <string>
#include <vector>

#include "allocator.h"
#include "allocator_detail.h"
#include "driver_api.h"
#include "errors.h"
#include "stream_capture.h"

namespace gpusleep {

Allocator::TransitionScope::TransitionScope(Allocator& allocator, const std::string& call, TransitionKind kind)
    : allocator_(allocator), kind_(kind) {
  allocator_.check_no_capture(call);
  // A wake never waits for a device: from here to its end it runs in RELAXED mode (Note [Captures]).
  if (kind_ == TransitionKind::kMap) relaxed_.emplace();
}

Allocator::TransitionScope::Settled Allocator::TransitionScope::settle() {
  Settled settled;
  // Freeing a deferred segment waits for its devices: not in a wake, and not inside destroy_segments (the
  // deferred frees' own path).
  if (kind_ == TransitionKind::kRelease) allocator_.free_deferred();
  settled.bytes_pending_before = allocator_.refused_.bytes_pending();
  settled.bytes_freed = allocator_.refused_.retry(allocator_.contexts_, allocator_.waits_);
  return settled;
}

void Allocator::check_no_capture(const std::string& call) {
  // Captures gpusleep has seen (global mode: a malloc on a capturing stream). Queries are allowed during
  // a capture; a stream whose capture has ended is forgotten.
  for (auto it = capturing_streams_.begin(); it != capturing_streams_.end();) {
    uint64_t id = 0;
    try {
      ScopedDeviceContext context(contexts_, it->second);
      id = capture_id_of(it->first);
    } catch (...) {
    }
    if (id == 0) {
      it = capturing_streams_.erase(it);
      continue;
    }
    throw CaptureInProgress("a CUDA graph capture is in progress on device " + std::to_string(it->second) + ": " +
                            call +
                            " would have to synchronize, unmap or release GPU memory, which "
                            "would invalidate the capture. Call again once the capture has ended.");
  }
}

void Allocator::free_deferred() {
  for (auto it = deferred_frees_.begin(); it != deferred_frees_.end();) {
    auto segment = segments_.find(*it);
    if (segment == segments_.end()) {
      it = deferred_frees_.erase(it);
      continue;
    }
    try {
      destroy_segment(segment->second.get());
      it = deferred_frees_.erase(it);
    } catch (...) {
      return;  // the capture still runs (or the device refuses): try again at the next call
    }
  }
}

void Allocator::synchronize_current(int device, const std::string& why) {
  CUcontext context = nullptr;
  GPUSLEEP_CU_CHECK(cuCtxGetCurrent, "device " + std::to_string(device), &context);
  CUresult result = CUDA_SUCCESS;
  if (waits_.synchronize_context(device, context, &result) == DeviceWaiter::Outcome::kTimedOut) {
    throw waits_.timeout_error(device, why + ": cuCtxSynchronize");
  }
  if (result == CUDA_SUCCESS) return;
  if (result == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED || result == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED ||
      result == CUDA_ERROR_STREAM_CAPTURE_IMPLICIT) {
    throw CaptureInProgress("a CUDA graph capture is in progress on device " + std::to_string(device) +
                            ": gpusleep must wait for the "
                            "device (" +
                            why + "), which the driver refuses during a capture (" + cu_error_name(result) +
                            "). Call again once the capture has ended.");
  }
  throw_driver_error("cuCtxSynchronize", "device " + std::to_string(device) + ", " + why, result, __FILE__, __LINE__);
}

void Allocator::synchronize_devices(const std::vector<int>& devices) {
  for (int device : devices) {
    ScopedDeviceContext context(contexts_, device);
    synchronize_current(device, "waiting for the work using the memory");
    refused_.drained(device);  // every stream of the device finished, the copy streams of a failed wake too
  }
}

}  // namespace gpusleep
