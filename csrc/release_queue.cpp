#include "release_queue.h"

#include <utility>

#include "device_context.h"
#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

ReleaseQueue::~ReleaseQueue() {
  mappings_.clear();
  chunks_.clear();
  reservations_.clear();
}

void ReleaseQueue::note_refusal(const char* call, CUresult result) {
  if (result == CUDA_SUCCESS) return;  // not refused itself: pending behind a refused mapping
  ++refusals_;
  last_refusal_ = std::string(call) + ": " + cu_error_name(result);
  note_teardown_failure(call, result);  // also shows in last_teardown_failure() and counters["teardown_failures"]
}

void ReleaseQueue::add(int device, MappedRange mapping, CUresult refused_with) {
  if (!mapping.owns()) return;
  note_refusal(MappedRangeTraits::kRelease, refused_with);
  mappings_.push_back({device, std::move(mapping)});
}

void ReleaseQueue::add(int device, PhysicalChunk chunk, CUresult refused_with) {
  if (!chunk.owns()) return;
  note_refusal(PhysicalChunkTraits::kRelease, refused_with);
  chunks_.push_back({device, std::move(chunk)});
}

void ReleaseQueue::add(int device, AddressReservation reservation, CUresult refused_with) {
  if (!reservation.owns()) return;
  note_refusal(AddressReservationTraits::kRelease, refused_with);
  reservations_.push_back({device, std::move(reservation)});
}

namespace {
// Retries each pending owner with its device's context current; keeps those still refused.
template <typename Owner>
void retry_all(std::vector<Owner>& pending, DeviceContexts& contexts) noexcept {
  for (auto it = pending.begin(); it != pending.end();) {
    CUresult result = CUDA_ERROR_UNKNOWN;
    try {
      ScopedDeviceContext context(contexts, it->device);
      RelaxedCaptureMode relaxed;  // released only after the device was idle: no captured work can use it
      result = it->owner.try_release();
    } catch (...) {
      // No context on that device now: try again next time.
    }
    it = result == CUDA_SUCCESS ? pending.erase(it) : std::next(it);
  }
}
}  // namespace

void ReleaseQueue::retry(DeviceContexts& contexts) noexcept {
  if (empty()) return;
  retry_all(mappings_, contexts);
  // A chunk released while a refused mapping still maps it would be freed only at that unmap, yet it
  // would leave the queue (and the stats) now: wait until every refused mapping is gone.
  if (!mappings_.empty()) return;
  retry_all(chunks_, contexts);
  retry_all(reservations_, contexts);
}

size_t ReleaseQueue::bytes_pending() const noexcept {
  size_t total = 0;
  for (const auto& pending : chunks_) total += pending.owner.size_bytes();
  return total;
}

bool ReleaseQueue::mapping_overlaps(CUdeviceptr base, size_t size_bytes) const noexcept {
  for (const auto& pending : mappings_) {
    const CUdeviceptr begin = pending.owner.base();
    if (begin < base + size_bytes && base < begin + pending.owner.size_bytes()) return true;
  }
  return false;
}

}  // namespace gpusleep
