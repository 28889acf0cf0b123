// ChunkVerifier: finds the pieces of device memory that differ from their host copy (Note [Verified wakes] in
// allocator.h): by the chunk hash on the GPU (DeviceChecksum, one per device) where the kernel loads, else by
// reading the bytes back and comparing them with the host copy.
//
// Not thread-safe: the Allocator uses it under its lock.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "allocator_counters.h"
#include "copy_engine.h"
#include "device_checksum.h"
#include "device_context.h"
#include "host_arena.h"
#include "release_queue.h"
#include "segment.h"

namespace gpusleep {

// A piece of a segment whose device bytes differ from its host copy.
struct PieceMismatch {
  const Segment* segment = nullptr;
  size_t offset_bytes = 0;
  size_t num_bytes = 0;
};

// The verdict on restored memory: what differs, and how much of it was checked by reading back.
struct Verification {
  std::vector<PieceMismatch> mismatches;
  size_t bytes_read_back = 0;  // checked without the GPU hash (the rest was hashed on the GPU)
};

class ChunkVerifier {
 public:
  // The unit of hashing, comparing and of a changed-piece re-sleep's copies.
  static constexpr size_t kPieceBytes = size_t{4} << 20;
  // The largest read-back of the fallback at a time (pinned scratch from the host arena).
  static constexpr size_t kReadBackBytes = size_t{64} << 20;

  using EngineFor = std::function<CopyEngine&(int device)>;
  using LayoutFor = std::function<const DeviceLayout&(int device)>;
  ChunkVerifier(DeviceContexts& contexts, HostArena& host_arena, ReleaseQueue& refused, DeviceWaits& waits,
                EngineFor engine_for, LayoutFor layout_for, AllocatorCounters& counters);

  // Whether `device` hashes on the GPU; loads the kernel the first time (a failure is final for the device,
  // counted in counters["verify_kernel_unavailable"], and its reason kept in fallback_reason()).
  bool kernel_on(int device);
  // Why a device hashes without the kernel now (the first such device's reason); empty while none does.
  std::string fallback_reason() const;

  // Piece hashes (kPieceBytes) of [base, base + user_bytes) of each segment, computed on its GPU; every
  // segment's device must have kernel_on(). The devices must not write them meanwhile. A device without a
  // free granule for the sums leaves its segments' hashes empty (counters["verify_hash_no_memory"]).
  // Throws CudaError.
  std::vector<std::vector<uint64_t>> device_hashes(const std::vector<Segment*>& segments);

  // The pieces of each mapped segment whose device bytes differ from what its sleep copied out: by hash on the
  // GPU where the segment has backup_hashes and its device has the kernel; else by reading the bytes back and
  // hashing them on the host against backup_hashes, or, without those, comparing them with the host copy. The
  // devices must be idle. Throws CudaError; the read-back scratch is quarantined if its copies cannot be
  // drained (counters["host_extents_quarantined"]).
  Verification verify(const std::vector<Segment*>& segments);

  // The (offset, bytes) of the pieces of a `total_bytes` range whose hashes differ between `now` and `then`
  // (equally long piece hash lists).
  static std::vector<std::pair<size_t, size_t>> changed_pieces(const std::vector<uint64_t>& now,
                                                               const std::vector<uint64_t>& then, size_t total_bytes);

  // Pins the host buffer that `num_sums` piece hashes of the device come back through, if the device has the
  // kernel (reserve_host_memory(): the next sleep then pins nothing). Best effort: a failure is left to hash().
  void reserve_host_sums(int device, size_t num_sums) noexcept;
  // Whether the host copy's bytes [offset, offset + num_bytes) (one piece) still have the hash the sleep took
  // of the device bytes it copied; true when there is no such hash. Hashes on the host (a failed wake only).
  bool host_copy_matches_its_hash(const Segment& segment, size_t offset_bytes, size_t num_bytes) const;
  // Waits for the device's hash stream (nothing to wait for without one); never throws.
  bool synchronize_noexcept(int device) noexcept;
  // close(): gives back the device's kernel, stream and buffers; true when nothing is held on it any more.
  bool release(int device) noexcept;
  size_t objects_held() const noexcept { return checksums_.size(); }
  std::vector<int> devices() const;  // the devices it holds a kernel, stream or buffer on

 private:
  DeviceChecksum& checksum(int device);
  // Reads the segment back; adds what differs to `into`, and its bytes to into.bytes_read_back.
  void read_back(Segment& segment, Verification& into);

  DeviceContexts& contexts_;
  HostArena& host_arena_;
  ReleaseQueue& refused_;
  DeviceWaits& waits_;  // the hash streams' deadline (Note [Device waits with a deadline])
  EngineFor engine_for_;
  LayoutFor layout_for_;
  AllocatorCounters& counters_;
  std::map<int, std::unique_ptr<DeviceChecksum>> checksums_;
  std::set<int> devices_without_kernel_;
  std::map<int, std::string> fallback_reasons_;  // by device, while it hashes without the kernel
};

}  // namespace gpusleep
