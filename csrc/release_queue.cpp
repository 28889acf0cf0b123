#include "release_queue.h"

#include <utility>

#include "device_context.h"
#include "device_wait.h"
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

void ReleaseQueue::note_not_tried(CUresult why) {
  if (why == CUDA_SUCCESS) return;
  last_refusal_ = std::string("not tried (no context: ") + cu_error_name(why) + ")";
}

namespace {
const char* release_call(const MappedRange&) { return MappedRangeTraits::kRelease; }
const char* release_call(const PhysicalChunk&) { return PhysicalChunkTraits::kRelease; }
const char* release_call(const AddressReservation&) { return AddressReservationTraits::kRelease; }
}  // namespace

void ReleaseQueue::await_drain(int device) { undrained_.insert(device); }

// Retries each pending owner with its device's context current; keeps those still refused, counting each
// refusal. Objects of a device that has not drained are left untried.
template <typename Owner>
size_t ReleaseQueue::retry_all(std::vector<Pending<Owner>>& pending, DeviceContexts& contexts) noexcept {
  size_t freed = 0;
  for (auto it = pending.begin(); it != pending.end();) {
    if (awaits_drain(it->device)) {
      ++it;
      continue;
    }
    const size_t size = it->owner.size_bytes();
    bool tried = false;
    CUresult result = CUDA_ERROR_UNKNOWN;
    try {
      ScopedDeviceContext context(contexts, it->device);
      RelaxedCaptureMode relaxed;  // released only after the device was idle: no captured work can use it
      tried = true;
      result = it->owner.try_release();
    } catch (...) {
      // No context on that device now: not tried, try again next time.
    }
    if (result == CUDA_SUCCESS) {
      freed += size;
      it = pending.erase(it);
      continue;
    }
    if (tried) note_refusal(release_call(it->owner), result);
    ++it;
  }
  return freed;
}

size_t ReleaseQueue::retry(DeviceContexts& contexts, DeviceWaits& waits) noexcept {
  for (auto it = undrained_.begin(); it != undrained_.end();) {
    bool idle = false;
    try {
      ScopedDeviceContext context(contexts, *it);
      CUcontext current = nullptr;
      CUresult result = GPUSLEEP_CU(cuCtxGetCurrent, &current);
      // Every stream of the context, until the deadline: a device still stuck stays undrained, its objects untried.
      idle = result == CUDA_SUCCESS &&
             waits.synchronize_context(*it, current, &result) == DeviceWaiter::Outcome::kFinished &&
             result == CUDA_SUCCESS;
    } catch (...) {
    }
    it = idle ? undrained_.erase(it) : std::next(it);
  }
  if (empty()) return 0;
  retry_all(mappings_, contexts);
  // A chunk released while a refused mapping still maps it would be freed only at that unmap, yet it
  // would leave the queue (and the stats) now; a range with a mapping inside cannot be freed at all:
  // wait until every refused mapping is gone.
  if (!mappings_.empty()) return 0;
  const size_t freed = retry_all(chunks_, contexts);
  retry_all(reservations_, contexts);
  return freed;
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
