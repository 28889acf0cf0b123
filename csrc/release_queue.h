// ReleaseQueue: the driver objects the driver refused to release, kept and retried later.
//
// Note [Refused releases]
// Rationale: cuMemUnmap, cuMemRelease and cuMemAddressFree can fail (a sticky error, a driver bug, an
// injected fault). If the allocator forgot the object, the GPU memory or address range would leak for
// the life of the process, and a mapping left standing at a segment's address would make every later
// wake of that segment fail in cuMemMap. So nothing the driver refuses to release is forgotten.
// Approach: code that releases calls DriverOwner::try_release(); whatever is still owned afterwards is
// moved here with its device. A sleep that meets a refusal still completes (its tags are asleep, their
// host copies are complete) and reports the bytes whose release is pending; every later sleep, wake,
// free, empty_cache and close retries the queue first, mappings before the chunks they map and chunks
// before reservations, each with its device's context current. A wake whose segment still overlaps a
// refused mapping raises and stays asleep, so it can be retried.
// Ordering: the driver frees a chunk only once it is released AND unmapped, and cuMemAddressFree fails
// while a mapping lies inside the range. So when an unmap is refused, the chunks it maps and the range it
// lies in are not tried at all: they come here untried (added with CUDA_SUCCESS), still count in
// bytes_pending(), and are tried once every refused mapping is gone.
// Undrained devices: a failed wake whose copy streams refused to drain may still have copies or fills
// queued that write its new mappings (and read host copies). Its memory comes here untried and the
// device is marked by await_drain(); nothing of that device is retried until a cuCtxSynchronize of it
// succeeds (retry() tries one first) or the caller reports the device drained (drained()).
// Stats report the pending objects and bytes; counters["release_refused"] counts every refused call
// once, those made by retry() included, and never a call that was not made.
// Limitations: objects still refused when the Allocator object is destroyed are released once more by
// their destructors and, if refused again, only counted (teardown_failures).
//
// Not thread-safe: the Allocator uses it under its lock.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "address_reservation.h"
#include "mapped_range.h"
#include "physical_chunk.h"

namespace gpusleep {

class DeviceContexts;
class DeviceWaits;

class ReleaseQueue {
 public:
  ReleaseQueue() = default;
  // Members would be destroyed bottom-up (reservations before the mappings inside them): release in
  // dependency order instead, each once more, counting refusals as teardown failures.
  ~ReleaseQueue();
  ReleaseQueue(const ReleaseQueue&) = delete;
  ReleaseQueue& operator=(const ReleaseQueue&) = delete;
  // Each add() takes an object the driver refused to release with `refused_with` (an empty owner is
  // ignored). CUDA_SUCCESS means it was not tried: it waits behind a refused mapping, for its device to
  // drain, or for a context; it counts as no refusal.
  void add(int device, MappedRange mapping, CUresult refused_with);
  void add(int device, PhysicalChunk chunk, CUresult refused_with);
  void add(int device, AddressReservation reservation, CUresult refused_with);

  // Not tried: no context could be made current (`why`). Counts no refusal, but last_refusal() says so.
  void note_not_tried(CUresult why);

  // Work queued on `device` may still use what is (or will be) added for it: none of the device's objects
  // is tried until the device has drained (Note [Refused releases], undrained devices).
  void await_drain(int device);
  // The caller waited for all of the device's queued work (its copy streams synchronized).
  void drained(int device) noexcept { undrained_.erase(device); }
  bool awaits_drain(int device) const noexcept { return undrained_.count(device) != 0; }

  // Synchronizes each undrained device (device-wide, with `waits`' deadline: a device still busy then stays
  // undrained, Note [Device waits with a deadline]), then tries every pending release once more, in dependency
  // order. Returns the bytes of GPU memory freed (chunks released). Never throws.
  size_t retry(DeviceContexts& contexts, DeviceWaits& waits) noexcept;

  bool empty() const noexcept { return mappings_.empty() && chunks_.empty() && reservations_.empty(); }
  size_t objects_pending() const noexcept { return mappings_.size() + chunks_.size() + reservations_.size(); }
  // GPU memory still held by refused chunks.
  size_t bytes_pending() const noexcept;
  // True if a refused mapping still covers part of [base, base + size_bytes).
  bool mapping_overlaps(CUdeviceptr base, size_t size_bytes) const noexcept;
  // Refusals since construction, and what the last one said ("cuMemUnmap: CUDA_ERROR_UNKNOWN").
  uint64_t refusals() const noexcept { return refusals_; }
  const std::string& last_refusal() const noexcept { return last_refusal_; }

 private:
  template <typename Owner>
  struct Pending {
    int device;
    Owner owner;
  };
  void note_refusal(const char* call, CUresult result);
  template <typename Owner>
  size_t retry_all(std::vector<Pending<Owner>>& pending, DeviceContexts& contexts) noexcept;

  std::vector<Pending<MappedRange>> mappings_;
  std::vector<Pending<PhysicalChunk>> chunks_;
  std::vector<Pending<AddressReservation>> reservations_;
  std::set<int> undrained_;  // devices whose queued work may still use objects here
  uint64_t refusals_ = 0;
  std::string last_refusal_;
};

}  // namespace gpusleep
