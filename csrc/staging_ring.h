// StagingRing: the device copies of pageable and file host copies, through a few reusable pinned buffers.
//
// Note [Staging ring]
// Rationale: the GPU's DMA engines read and write only pinned memory at full speed; a cuMemcpy from pageable memory
// is staged by the driver through its own small buffers, synchronously and slowly, and a file has no device path at
// all. Pinning the destination at sleep time costs 1 to 4 GB/s. So each device has a ring of two pinned slots
// (AllocatorOptions::staging_bytes each, 16 MiB by default, pinned at the first staged copy and kept), each with its
// own non-blocking stream.
// Approach (double buffering): a copy is cut into slot-sized pieces, piece k using slot k % 2.
//   device -> host: enqueue the device copy of piece k into its slot, then wait for piece k - 1's stream and write
//     that slot to the host copy (memcpy, or pwrite of the file): the DMA of one piece overlaps the host copy or
//     the I/O of the previous one.
//   host -> device: wait until slot k % 2 is free (piece k - 2's stream), fill it from the host copy (memcpy or
//     pread), enqueue its device copy: the read of one piece overlaps the DMA of the previous one.
// Each call returns only when all its pieces are done, so nothing queued outlives it and a caller's transaction
// sees every failure (a failed copy, write, read or short read) before it commits. If a slot's stream refuses to
// drain after a failure, a DMA may still use the slot: the ring is quarantined (its slots never reused or freed,
// counted in slots_quarantined()) and a new one is pinned at the next copy. If a slot's copy does not finish by the
// deadline (Note [Device waits with a deadline]), the ring is kept but undrained: the next copy first waits for it
// (raising the timeout again while it is stuck), and a failed wake keeps what it mapped until the device drains.
// Limitations: one ring per device, used under the allocator's lock, so staged copies of two segments do not run
// in parallel; their GB/s is measured beside the pinned tier's by benchmarks/bench_sleep_wake.py (docs/host-tiers.md).
//
// Needs the device's context current. Not thread-safe.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <vector>

#include "device_wait.h"
#include "host_copy.h"
#include "pinned_host_buffer.h"
#include "stream.h"

namespace gpusleep {

class StagingRing {
 public:
  static constexpr size_t kSlots = 2;
  // Every wait for its streams has `waits`' deadline (Note [Device waits with a deadline]); `waits` outlives it.
  StagingRing(int device, size_t slot_bytes, DeviceWaits& waits);
  ~StagingRing();
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;

  // Copies [source, source + n) of device memory into `destination` at `offset`, synchronously.
  void device_to_host(CUdeviceptr source, HostCopy& destination, size_t offset, size_t n);
  // Copies `source`'s bytes [offset, offset + n) to device memory at `destination`, synchronously.
  void host_to_device(CUdeviceptr destination, const HostCopy& source, size_t offset, size_t n);

  size_t bytes_pinned() const noexcept;
  size_t slots_quarantined() const noexcept { return slots_quarantined_; }
  // False after a failure whose copies did not finish by the deadline: a DMA may still use the slots and the
  // device memory it names (Note [Device waits with a deadline]); true again once a later call saw them drain.
  bool drained() const noexcept { return !undrained_; }
  // Frees the slots and streams (nothing is queued between calls; slots whose streams do not drain by the deadline
  // are quarantined). Never throws.
  void release() noexcept;

 private:
  struct Slot {
    PinnedHostBuffer buffer;
    Stream stream;
  };
  void ensure_slots();
  void wait(Slot& slot);
  // After a failure: drains every slot's stream; quarantines the ring if one refuses.
  void drain_after_failure() noexcept;
  void quarantine() noexcept;  // moves the slots out of reach: never reused or freed

  int device_;
  size_t slot_bytes_;
  DeviceWaits& waits_;
  std::vector<Slot> slots_;
  size_t slots_quarantined_ = 0;
  bool undrained_ = false;  // drained()
};

}  // namespace gpusleep
