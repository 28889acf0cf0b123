// DeviceChecksum: the chunk hash (chunk_hash.h) computed on one device by its kernel (chunk_hash_ptx.h).
//
// The kernel ships as PTX text and is JIT-compiled by the driver with cuModuleLoadDataEx the first time a device
// needs it, then launched with cuLaunchKernel: no CUDA toolkit at build or run time, nothing linked. If the
// module cannot be loaded (a driver that cannot JIT this PTX, a platform without a JIT), available() says
// false and why, once and for good: the allocator then verifies by reading the bytes back (Note [Verified
// wakes] in allocator.h).
//
// Each hash() call maps a small device buffer (one granule holds the sums of 1 TiB), zeroes one 64-bit sum per
// piece in it, launches one kernel per range on its own non-blocking stream, copies the sums to pinned host
// memory, waits for that stream only, and releases the buffer: between calls no GPU memory is held. The ranges must not
// be written while they are hashed (the allocator calls it on idle devices).
//
// Not thread-safe: the Allocator uses it under its lock, with the device's context current.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device_wait.h"
#include "loaded_module.h"
#include "pinned_host_buffer.h"
#include "release_queue.h"
#include "segment.h"
#include "stream.h"

namespace gpusleep {

struct HashRange {
  CUdeviceptr address = 0;  // 8-byte aligned
  size_t num_bytes = 0;
};

class DeviceChecksum {
 public:
  // Words each block hashes (64 KiB) and threads per block: piece sizes must be multiples of 64 KiB.
  static constexpr size_t kSpanWords = size_t{8} << 10;
  static constexpr unsigned kThreadsPerBlock = 256;

  // Its stream waits have `waits`' deadline (Note [Device waits with a deadline]); `waits` outlives it.
  DeviceChecksum(int device, DeviceLayout layout, ReleaseQueue& refused, DeviceWaits& waits);
  ~DeviceChecksum() = default;  // the owners release the stream, the buffers and the module
  DeviceChecksum(const DeviceChecksum&) = delete;
  DeviceChecksum& operator=(const DeviceChecksum&) = delete;

  // Loads the kernel on first call (RELAXED capture mode: loading is an "unsafe" call during other threads'
  // captures). False when it cannot be loaded; unavailable_reason() says why. A refusal of the PTX itself (no
  // JIT for it, an unsupported version) is final; any other failure (out of memory on a full GPU) is tried
  // again at the next call.
  bool available();
  const std::string& unavailable_reason() const noexcept { return unavailable_reason_; }

  // The piece hashes of each range, pieces of `piece_bytes` (a multiple of 64 KiB) from the range's start.
  // Throws OutOfMemory when the device has no granule free for the sums, CudaError; after a failure whose stream could
  // not be drained, drained() is false until a later synchronize succeeds (the kernels may still read the ranges).
  std::vector<std::vector<uint64_t>> hash(const std::vector<HashRange>& ranges, size_t piece_bytes);
  bool drained() const noexcept { return drained_; }
  // Pins the host buffer for `num_sums` sums now (reserve_host_memory), if it is smaller. Throws like pinning.
  void reserve_host_sums(size_t num_sums);
  // Pinned host buffers made for the sums so far (one 64 KiB buffer, grown for more than 8192 pieces).
  uint64_t host_buffers_pinned() const noexcept { return host_buffers_pinned_; }
  // After a failure: waits for this device's hash stream (until the deadline; at once if its last wait ran out);
  // never throws. False if the driver refuses or it did not drain.
  bool synchronize_noexcept() noexcept;

  // Gives everything back (close()); true when nothing is held any more.
  bool release() noexcept;

 private:
  void ensure_buffers(size_t num_sums);
  void release_device_sums(bool drained) noexcept;

  int device_;
  DeviceLayout layout_;
  ReleaseQueue& refused_;
  DeviceWaits& waits_;
  bool refused_for_good_ = false;
  std::string unavailable_reason_;
  LoadedModule module_;
  CUfunction function_ = nullptr;
  Stream stream_;
  std::unique_ptr<Segment> device_sums_;  // one 64-bit sum per piece, during hash() only
  PinnedHostBuffer host_sums_;
  size_t host_sums_capacity_ = 0;
  // Host buffers a refused synchronize may still be copying into: never reused or freed while we run.
  std::vector<PinnedHostBuffer> quarantined_;
  bool drained_ = true;
  uint64_t host_buffers_pinned_ = 0;
};

}  // namespace gpusleep
