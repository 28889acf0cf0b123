#include "device_wait.h"

#include <algorithm>

#include "allocator_detail.h"

namespace gpusleep {

DeviceWaits::Clock::time_point DeviceWaits::deadline() const noexcept {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_seconds_));
}

DeviceWaits::Outcome DeviceWaits::synchronize_stream(CUstream stream, Clock::time_point deadline,
                                                     CUresult* result) noexcept {
  // Note [Device waits with a deadline]: poll until idle, with back-off, then collect the stream's answer.
  const Clock::time_point start = Clock::now();
  for (;;) {
    const CUresult state = GPUSLEEP_CU(cuStreamQuery, stream);
    if (state != CUDA_ERROR_NOT_READY) break;  // idle, or an error cuStreamSynchronize reports below
    const Clock::time_point now = Clock::now();
    if (now >= deadline) {
      timed_out_streams_.insert(stream);
      return Outcome::kTimedOut;
    }
    const auto waited = now - start;
    const auto pause = std::min<Clock::duration>(waited / 32, std::chrono::microseconds(500));
    if (pause < std::chrono::microseconds(2)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::min<Clock::duration>(pause, deadline - now));
    }
  }
  *result = GPUSLEEP_CU(cuStreamSynchronize, stream);
  timed_out_streams_.erase(stream);
  return Outcome::kFinished;
}

void DeviceWaits::synchronize_stream_or_throw(int device, CUstream stream, const std::string& what) {
  CUresult result = CUDA_SUCCESS;
  if (synchronize_stream(stream, deadline(), &result) == Outcome::kTimedOut) {
    throw timeout_error(device, "waiting for its " + what + ": cuStreamSynchronize");
  }
  if (result != CUDA_SUCCESS) {
    throw_driver_error("cuStreamSynchronize", what + " of device " + std::to_string(device), result, __FILE__,
                       __LINE__);
  }
}

bool DeviceWaits::drain_stream(CUstream stream, CUresult* refused_with) noexcept {
  // A stream just seen stuck: one query (an already passed deadline), not a second full wait.
  const Clock::time_point until = timed_out_streams_.count(stream) != 0 ? Clock::now() : deadline();
  CUresult result = CUDA_SUCCESS;
  if (synchronize_stream(stream, until, &result) == Outcome::kTimedOut) return false;
  if (refused_with != nullptr) *refused_with = result;
  return result == CUDA_SUCCESS;
}

CudaError DeviceWaits::timeout_error(int device, const std::string& what) {
  ++timeouts_;
  return CudaError("gpusleep waited " + detail::format_seconds(timeout_seconds_) + " s for the work queued on device " +
                       std::to_string(device) + " to finish (" + what +
                       ") and it has not. Nothing was changed. Work that never finishes is the usual cause: a "
                       "collective waiting for a peer that died, or a persistent kernel. Finish or abort that work "
                       "and call again, or raise the deadline (Allocator(wait_timeout_seconds=...), "
                       "GPUSLEEP_WAIT_TIMEOUT_S).",
                   CUDA_ERROR_TIMEOUT, cu_error_name(CUDA_ERROR_TIMEOUT));
}

}  // namespace gpusleep
