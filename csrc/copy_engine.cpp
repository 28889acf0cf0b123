#include "copy_engine.h"

#include <algorithm>
#include <string>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

CopyEngine::CopyEngine(int device, int num_streams, size_t piece_bytes, DeviceWaits& waits)
    : device_(device), piece_bytes_(std::max<size_t>(piece_bytes, 1 << 20)), waits_(waits) {
  streams_.reserve(num_streams);
  for (int i = 0; i < num_streams; ++i) streams_.emplace_back(Stream::Create{});
  queued_bytes_.assign(streams_.size(), 0);
}

CUstream CopyEngine::next_stream(size_t num_bytes) {
  const size_t index =
      static_cast<size_t>(std::min_element(queued_bytes_.begin(), queued_bytes_.end()) - queued_bytes_.begin());
  queued_bytes_[index] += num_bytes;
  return streams_[index].get();
}

void CopyEngine::device_to_host(CUdeviceptr source, const HostExtents& destination) {
  for (const HostExtent& extent : destination) {
    for (size_t done = 0; done < extent.size_bytes;) {
      const size_t n = std::min(piece_bytes_, extent.size_bytes - done);
      GPUSLEEP_CU_CHECK(cuMemcpyDtoHAsync, format_bytes(n) + " from device " + std::to_string(device_),
                        static_cast<void*>(extent.data + done), source, n, next_stream(n));
      source += n;
      done += n;
    }
  }
}

void CopyEngine::host_to_device(CUdeviceptr destination, const HostExtents& source) {
  for (const HostExtent& extent : source) {
    for (size_t done = 0; done < extent.size_bytes;) {
      const size_t n = std::min(piece_bytes_, extent.size_bytes - done);
      GPUSLEEP_CU_CHECK(cuMemcpyHtoDAsync, format_bytes(n) + " to device " + std::to_string(device_), destination,
                        static_cast<const void*>(extent.data + done), n, next_stream(n));
      destination += n;
      done += n;
    }
  }
}

void CopyEngine::zero(CUdeviceptr destination, size_t num_bytes) {
  for (size_t done = 0; done < num_bytes;) {
    const size_t n = std::min(piece_bytes_, num_bytes - done);
    GPUSLEEP_CU_CHECK(cuMemsetD8Async, "zero " + format_bytes(n) + " on device " + std::to_string(device_),
                      destination + done, static_cast<unsigned char>(0), n, next_stream(n));
    done += n;
  }
}

void CopyEngine::synchronize() {
  const DeviceWaits::Clock::time_point deadline = waits_.deadline();  // one for all the streams
  CUresult first = CUDA_SUCCESS;
  bool timed_out = false;
  for (Stream& stream : streams_) {
    CUresult result = CUDA_SUCCESS;
    if (waits_.synchronize_stream(stream.get(), deadline, &result) == DeviceWaits::Outcome::kTimedOut) {
      timed_out = true;
    } else if (first == CUDA_SUCCESS) {
      first = result;
    }
  }
  std::fill(queued_bytes_.begin(), queued_bytes_.end(), 0);
  if (timed_out) throw waits_.timeout_error(device_, "waiting for its copy streams: cuStreamSynchronize");
  if (first != CUDA_SUCCESS) {
    throw_driver_error("cuStreamSynchronize", "copy streams of device " + std::to_string(device_), first, __FILE__,
                       __LINE__);
  }
}

bool CopyEngine::synchronize_noexcept() noexcept {
  bool all = true;
  for (Stream& stream : streams_) {
    CUresult result = CUDA_SUCCESS;
    if (waits_.drain_stream(stream.get(), &result)) continue;
    if (result != CUDA_SUCCESS) note_teardown_failure("cuStreamSynchronize", result);
    all = false;
  }
  std::fill(queued_bytes_.begin(), queued_bytes_.end(), 0);
  return all;
}

}  // namespace gpusleep

namespace gpusleep {

size_t CopyEngine::streams_held() const noexcept {
  size_t held = 0;
  for (const Stream& stream : streams_) held += stream.owns() ? 1 : 0;
  return held;
}

bool CopyEngine::try_release_streams() noexcept {
  bool all = true;
  for (Stream& stream : streams_) {
    const CUresult result = stream.try_release();
    if (result != CUDA_SUCCESS) {
      note_teardown_failure(StreamTraits::kRelease, result);
      all = false;
    }
  }
  return all;
}

bool release_scratch_after_drain(CopyEngine& engine, HostArena& arena, const HostExtents& scratch) noexcept {
  if (!engine.synchronize_noexcept()) return false;
  arena.release(scratch);
  return true;
}

}  // namespace gpusleep
