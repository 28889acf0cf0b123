#include "device_context.h"

#include <string>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

PrimaryContext::PrimaryContext(int device) : device_(device) {
  GPUSLEEP_CU_CHECK(cuDeviceGet, "device " + std::to_string(device), &cu_device_, device);
  GPUSLEEP_CU_CHECK(cuDevicePrimaryCtxRetain, "device " + std::to_string(device), &context_, cu_device_);
}

PrimaryContext::PrimaryContext(PrimaryContext&& other) noexcept
    : device_(other.device_), cu_device_(other.cu_device_), context_(other.context_) {
  other.context_ = nullptr;
}

CUresult PrimaryContext::try_release() noexcept {
  if (context_ == nullptr) return CUDA_SUCCESS;
  const CUresult result = GPUSLEEP_CU(cuDevicePrimaryCtxRelease, cu_device_);
  if (result == CUDA_SUCCESS) context_ = nullptr;
  return result;
}

PrimaryContext::~PrimaryContext() {
  const CUresult result = try_release();
  if (result != CUDA_SUCCESS) note_teardown_failure("cuDevicePrimaryCtxRelease", result);
}

int DeviceContexts::device_count() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (device_count_ < 0) {
    int count = 0;
    GPUSLEEP_CU_CHECK(cuDeviceGetCount, "", &count);
    device_count_ = count;
  }
  return device_count_;
}

CUcontext DeviceContexts::get(int device) {
  const int count = device_count();
  if (device < 0 || device >= count) {
    throw InvalidArgument("device " + std::to_string(device) + " does not exist: this machine has " +
                          std::to_string(count) + " CUDA device(s)");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = contexts_.find(device);
  if (it == contexts_.end()) it = contexts_.emplace(device, PrimaryContext(device)).first;
  return it->second.get();
}

void DeviceContexts::release_all() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = contexts_.begin(); it != contexts_.end();) {
    const CUresult result = it->second.try_release();
    if (result == CUDA_SUCCESS) {
      release_refused_.erase(it->first);
      it = contexts_.erase(it);
      continue;
    }
    // Still retained: keep it (and its memory on the GPU) owned and reported, for the next call to retry.
    ++release_refusals_;
    note_teardown_failure("cuDevicePrimaryCtxRelease", result);
    release_refused_.insert(it->first);
    ++it;
  }
}

size_t DeviceContexts::releases_pending() {
  std::lock_guard<std::mutex> lock(mutex_);
  return release_refused_.size();
}

std::vector<int> DeviceContexts::retained_devices() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int> out;
  for (const auto& [device, context] : contexts_) out.push_back(device);
  return out;
}

ScopedDeviceContext::ScopedDeviceContext(DeviceContexts& contexts, int device) {
  CUcontext wanted = contexts.get(device);
  GPUSLEEP_CU_CHECK(cuCtxGetCurrent, "", &previous_);
  if (previous_ != wanted) {
    GPUSLEEP_CU_CHECK(cuCtxSetCurrent, "primary context of device " + std::to_string(device), wanted);
    switched_ = true;
  }
}

ScopedDeviceContext::~ScopedDeviceContext() {
  if (!switched_) return;
  const CUresult result = GPUSLEEP_CU(cuCtxSetCurrent, previous_);
  if (result != CUDA_SUCCESS) note_teardown_failure("cuCtxSetCurrent", result);
}

RelaxedCaptureMode::RelaxedCaptureMode() {
  CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
  if (GPUSLEEP_CU(cuThreadExchangeStreamCaptureMode, &mode) == CUDA_SUCCESS) {
    previous_ = mode;
    active_ = true;
  }
}

RelaxedCaptureMode::~RelaxedCaptureMode() {
  if (!active_) return;
  CUstreamCaptureMode mode = previous_;
  const CUresult result = GPUSLEEP_CU(cuThreadExchangeStreamCaptureMode, &mode);
  if (result != CUDA_SUCCESS) note_teardown_failure("cuThreadExchangeStreamCaptureMode", result);
}

}  // namespace gpusleep
