// CopyEngine: the device<->host copies of one device, pipelined over several non-blocking streams.
//
// A copy is split into pieces of at most `piece_bytes` and each piece goes to the stream with the fewest
// bytes queued, so that large backups keep both DMA directions and all copy engines busy. Nothing waits
// per allocation: callers enqueue everything for a phase and call synchronize() once (docs/design.md,
// performance targets). Errors at enqueue throw at once; errors at execution surface from synchronize().
//
// Not thread-safe: the Allocator uses it under its lock, with the device's context current.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <vector>

#include "device_wait.h"
#include "host_arena.h"
#include "stream.h"

namespace gpusleep {

class CopyEngine {
 public:
  // Every wait for its streams has `waits`' deadline (Note [Device waits with a deadline]); `waits` outlives it.
  CopyEngine(int device, int num_streams, size_t piece_bytes, DeviceWaits& waits);

  // Copies [source, source + total_bytes(destination)) into the host extents, in order.
  void device_to_host(CUdeviceptr source, const HostExtents& destination);
  // Copies the host extents, in order, to [destination, ...).
  void host_to_device(CUdeviceptr destination, const HostExtents& source);
  void zero(CUdeviceptr destination, size_t num_bytes);

  // Waits for every stream, until one deadline; throws CudaError for the first failure (all streams are still
  // waited for), CUDA_ERROR_TIMEOUT naming the device when the deadline passed.
  void synchronize();
  // The same, for cleanup paths: never throws; false if any stream reported an error or did not drain (by the
  // deadline; at once if its last wait ran out): its copies may not have finished, so their host memory must not
  // be reused.
  bool synchronize_noexcept() noexcept;

  // Destroys the streams (waiting for nothing: call synchronize first). Returns true when every stream is
  // gone; a stream the driver refuses to destroy is kept, for the next call to try again.
  bool try_release_streams() noexcept;
  size_t streams_held() const noexcept;

  int device() const noexcept { return device_; }

 private:
  CUstream next_stream(size_t num_bytes);

  int device_;
  size_t piece_bytes_;
  DeviceWaits& waits_;
  std::vector<Stream> streams_;
  std::vector<size_t> queued_bytes_;  // per stream, since the last synchronize
};

// After copies into arena `scratch` failed: hands it back to `arena` once `engine`'s streams drain; if they do
// not, copies may still write it, so it is never handed out again. Returns whether it was handed back (the
// caller counts counters["host_extents_quarantined"] when not).
bool release_scratch_after_drain(CopyEngine& engine, HostArena& arena, const HostExtents& scratch) noexcept;

}  // namespace gpusleep
