// Segment: one reserved virtual range and the physical chunks mapped into it.
//
// A segment is the unit that sleeps and wakes. Its address range is reserved once and kept until the
// segment is destroyed (DESIGN.md invariant 1); its physical memory comes and goes with map() and
// unmap(). Physical memory is created in chunks of at most `chunk_bytes` (large chunks mean few driver
// calls; a cap keeps a single cuMemCreate from needing one huge contiguous free area), each mapped with
// its own cuMemMap (the map size must equal the handle size), and access is granted with one
// cuMemSetAccess over the whole range.
//
// All methods need the segment's device context current on the calling thread (ScopedDeviceContext).
#pragma once

#include <cuda.h>

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "address_reservation.h"
#include "host_arena.h"
#include "mapped_range.h"
#include "physical_chunk.h"

namespace gpusleep {

enum class SegmentState {
  kMapped,     // physical memory mapped, contents live
  kOffloaded,  // physical memory released, contents in `backup` (pinned host memory)
  kDiscarded,  // physical memory released, contents dropped
};

class Segment {
 public:
  // Reserves the range and maps `user_bytes` rounded up to `granularity_bytes`. A zero-byte segment
  // reserves one granule and maps nothing, so that it still has a unique address.
  Segment(int device, std::string tag, size_t user_bytes, size_t granularity_bytes, size_t chunk_bytes, bool pooled);
  ~Segment() = default;  // unmaps, releases the chunks, then frees the range (member order)
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  // Called once per chunk, as soon as [offset, offset + size) of the segment is mapped and accessible.
  using ChunkReady = std::function<void(size_t offset_bytes, size_t size_bytes)>;

  // Creates and maps fresh physical memory (contents undefined). On failure everything made by this call
  // is released and the exception propagates; the segment is unchanged.
  // Without `chunk_ready`, access is granted once for the whole range (fewest driver calls). With it,
  // each chunk gets its own cuMemSetAccess and is handed to `chunk_ready` before the next chunk is
  // created, so the caller's copy into it overlaps the creation of the rest; `drain` must then wait for
  // whatever chunk_ready queued, and is called before a failed map releases its chunks.
  void map(const ChunkReady& chunk_ready = nullptr, const std::function<void()>& drain = nullptr);
  // Releases the physical memory. No GPU work may still use the range.
  void unmap() noexcept;

  CUdeviceptr base() const noexcept { return reservation_.base(); }
  int device() const noexcept { return device_; }
  const std::string& tag() const noexcept { return tag_; }
  bool pooled() const noexcept { return pooled_; }
  size_t user_bytes() const noexcept { return user_bytes_; }          // bytes that hold data (copied on offload)
  size_t physical_bytes() const noexcept { return physical_bytes_; }  // bytes of GPU memory when mapped
  size_t reserved_bytes() const noexcept { return reservation_.size_bytes(); }
  bool has_physical_memory() const noexcept { return !chunks_.empty(); }
  bool contains(CUdeviceptr address) const noexcept {
    return address >= base() && address < base() + reserved_bytes();
  }

  SegmentState state = SegmentState::kMapped;
  HostExtents backup;  // non-empty only while kOffloaded

 private:
  // Order matters: members are destroyed bottom-up, so the mapping goes first, then the chunks, then the
  // reservation.
  AddressReservation reservation_;
  std::vector<PhysicalChunk> chunks_;
  MappedRange mapping_;
  int device_;
  std::string tag_;
  size_t user_bytes_;
  size_t physical_bytes_;
  size_t chunk_bytes_;
  bool pooled_;
};

inline size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace gpusleep
