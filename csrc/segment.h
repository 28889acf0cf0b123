// Segment: one reserved virtual range and the physical chunks mapped into it.
//
// A segment is the unit that sleeps and wakes. Its address range is reserved once and kept until the
// segment is destroyed (docs/invariants.md, invariant 1); its physical memory comes and goes with map() and
// unmap(). Physical memory is created in chunks of at most `chunk_bytes` (large chunks mean few driver
// calls; a cap keeps a single cuMemCreate from needing one huge contiguous free area), each mapped with
// its own cuMemMap (the map size must equal the handle size), and access is granted with one
// cuMemSetAccess over the whole range, to the owning device and to the peers the allocator names
// (Note [Peer access] in allocator.h), so cross-device copies and kernels work on gpusleep memory.
//
// Bytes that hold data: a low-level allocation holds exactly what was asked for, so only those bytes are
// copied on offload. A pooled segment (global mode's caching arena) hands out every mapped byte, the
// granularity tail included, so all of its physical bytes hold data (docs/invariants.md, invariant 2).
//
// All methods need the segment's device context current on the calling thread (ScopedDeviceContext).
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "address_reservation.h"
#include "host_copy.h"
#include "mapped_range.h"
#include "physical_chunk.h"
#include "release_queue.h"
#include "size_math.h"

namespace gpusleep {

enum class SegmentState {
  kMapped,     // physical memory mapped, contents live
  kOffloaded,  // physical memory released, contents in `backup` (a host tier: Note [Host tiers] in host_copy.h)
  kDiscarded,  // physical memory released, contents dropped
};

// How a device's memory is created and who may access it (Allocator::device_layout).
struct DeviceLayout {
  size_t granularity_bytes = 0;     // the MINIMUM granularity
  // The device's layout: the owning device first, then every peer that can access it (cuDeviceCanAccessPeer).
  // A segment's copy: the devices it grants (or will grant at its next map) read-write access.
  std::vector<int> access_devices;
  bool rdma_capable = false;        // create chunks with gpuDirectRDMACapable
  int host_numa_node = -1;          // the host NUMA node nearest the device, -1 if unknown
};

class Segment {
 public:
  // Reserves the range and maps `user_bytes` rounded up to the granularity. A zero-byte segment
  // reserves one granule and maps nothing, so that it still has a unique address. Throws InvalidArgument
  // if the size does not survive rounding.
  Segment(int device, std::string tag, size_t user_bytes, const DeviceLayout& layout, size_t chunk_bytes, bool pooled,
          ReleaseQueue& refused);
  ~Segment() = default;  // unmaps, releases the chunks, then frees the range (member order)
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  // Called once per chunk, as soon as [offset, offset + size) of the segment is mapped and accessible.
  using ChunkReady = std::function<void(size_t offset_bytes, size_t size_bytes)>;

  // Creates and maps fresh physical memory (contents undefined). On failure everything made by this call
  // is released (what the driver refuses goes to `refused`) and the exception propagates; the segment is
  // unchanged.
  // Without `chunk_ready`, access is granted once for the whole range (fewest driver calls). With it,
  // each chunk gets its own cuMemSetAccess and is handed to `chunk_ready` before the next chunk is
  // created, so the caller's copy into it overlaps the creation of the rest; `drain` must then wait for
  // whatever chunk_ready queued, and is called before a failed map releases its chunks. If it returns
  // false (not drained: the copies may still run), nothing is released: the mapping and chunks go to
  // `refused` untried and the device is marked to drain first (Note [Refused releases]).
  void map(ReleaseQueue& refused, const ChunkReady& chunk_ready = nullptr,
           const std::function<bool()>& drain = nullptr);
  // Releases the physical memory. No GPU work may still use the range, and the device's context must be
  // current. Whatever the driver refuses to release goes to `refused` (Note [Refused releases]): when the
  // unmap is refused, the chunks it maps go there untried. Either way the segment holds no physical
  // memory afterwards. Returns the bytes of GPU memory really freed.
  size_t release_physical(ReleaseQueue& refused) noexcept;
  // The devices the next map() grants read-write access: the owning device first, then peers.
  void set_access_devices(std::vector<int> devices);
  // The devices granted access at the last map (peers that refused are left out).
  const std::vector<int>& access_devices() const noexcept { return layout_.access_devices; }
  // Grants `peer` read-write access to the mapped range too; false if it has it already, the segment holds
  // no physical memory, or the driver refuses (counted in take_peer_grants_refused()).
  bool grant_access_to(int peer);
  // Peers that refused a grant since the last call (the allocator's counters["peer_grants_refused"]).
  size_t take_peer_grants_refused() noexcept;
  // Hands the mapping and chunks to `refused` untried, without a driver call (when no context can be made
  // current, or queued work may still use them).
  void give_up_physical(ReleaseQueue& refused) noexcept;
  // release_physical, then the address range (untried while a refused mapping lies inside it). For
  // destruction: the segment is empty afterwards. Returns the bytes of GPU memory really freed.
  size_t release_all(ReleaseQueue& refused) noexcept;

  CUdeviceptr base() const noexcept { return base_; }
  int device() const noexcept { return device_; }
  const std::string& tag() const noexcept { return tag_; }
  bool pooled() const noexcept { return pooled_; }
  size_t user_bytes() const noexcept { return user_bytes_; }          // bytes that hold data (copied on offload)
  size_t physical_bytes() const noexcept { return physical_bytes_; }  // bytes of GPU memory when mapped
  size_t reserved_bytes() const noexcept { return reserved_bytes_; }
  bool has_physical_memory() const noexcept { return !chunks_.empty(); }
  bool contains(CUdeviceptr address) const noexcept { return address >= base() && address < base() + reserved_bytes(); }

  SegmentState state = SegmentState::kMapped;
  // The host copy: held while kOffloaded, and kept after a wake when the tag keeps host copies
  // (Note [Kept host copies] in allocator.h). Pinned, pageable or in a file (Note [Host tiers] in host_copy.h).
  HostCopy backup;
  // While mapped: whether `backup` still equals the device bytes (false once anything may have changed).
  bool backup_valid = false;
  // The chunk hashes of `backup`, one per ChunkVerifier::kPieceBytes piece, taken on the GPU from the device bytes
  // the backup was copied from (empty: not hashed; a verified wake then reads the bytes back to compare).
  std::vector<uint64_t> backup_hashes;

 private:
  // Order matters: members are destroyed bottom-up, so the mapping goes first, then the chunks, then the
  // reservation.
  AddressReservation reservation_;
  std::vector<PhysicalChunk> chunks_;
  MappedRange mapping_;
  CUdeviceptr base_;       // kept after release_all() hands the reservation away
  size_t reserved_bytes_;
  int device_;
  std::string tag_;
  DeviceLayout layout_;
  size_t physical_bytes_;
  size_t user_bytes_;
  size_t chunk_bytes_;
  bool pooled_;
  size_t peer_grants_refused_ = 0;
};

}  // namespace gpusleep
