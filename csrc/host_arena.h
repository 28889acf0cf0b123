// HostArena: the pinned host memory that holds level-1 backups.
//
// Pinning runs at only a few GB/s, far below PCIe, so pinned memory is allocated once and reused across
// sleep/wake cycles: the arena keeps a list of pinned buffers (NUMA-placed where possible, Note [Placing
// pinned backups] in pinned_host_buffer.h, else cuMemHostAlloc) and a free list of extents. A backup
// of n bytes takes free extents first; only the shortfall is pinned, as one new buffer of exactly that
// size (no power-of-two rounding). reserve() pins ahead of time so that sleep never does;
// release_unused() unpins the buffers that hold no backup.
//
// An extent never crosses a registration boundary of its buffer (PinnedHostBuffer::piece_bytes(), Note
// [Parallel pinning] in parallel_pinning.h): free memory is coalesced only within one piece, so a backup that
// outgrows a piece gets one extent per piece, and every copy (issued per extent) has its host side inside
// one registration, as the driver requires (docs/driver-rules.md section 8b).
//
// Extents start on 4 KiB boundaries: every carve takes whole 4 KiB pages (host_extent_bytes), so two odd-sized
// backups carved from one buffer do not leave the second one unaligned (4 KiB aligned host addresses are what
// DMA engines copy fastest, and what a later O_DIRECT spill would need). A backup of n bytes gets extents that
// hold exactly n bytes; the page tail of its last extent is held with it and given back with it. So pinned
// bytes, bytes in use and the bytes to pin for a level-1 sleep are counted in 4 KiB pages.
//
// Not thread-safe: the Allocator calls it under its lock. Needs a current context for pinning and freeing.
#pragma once

#include <cstddef>
#include <map>
#include <vector>

#include "pinned_host_buffer.h"
#include "size_math.h"

namespace gpusleep {

constexpr size_t kHostExtentAlignBytes = 4096;

// The pinned bytes a backup of `num_bytes` takes: whole 4 KiB pages.
inline size_t host_extent_bytes(size_t num_bytes) { return round_up(num_bytes, kHostExtentAlignBytes); }

struct HostExtent {
  char* data = nullptr;
  size_t size_bytes = 0;
};
using HostExtents = std::vector<HostExtent>;

inline size_t total_bytes(const HostExtents& extents) {
  size_t total = 0;
  for (const HostExtent& e : extents) total += e.size_bytes;
  return total;
}

// The part [offset, offset + size) of the bytes that `extents` hold in order.
inline HostExtents slice_extents(const HostExtents& extents, size_t offset, size_t size) {
  HostExtents out;
  for (const HostExtent& e : extents) {
    if (size == 0) break;
    if (offset >= e.size_bytes) {
      offset -= e.size_bytes;
      continue;
    }
    const size_t take = e.size_bytes - offset < size ? e.size_bytes - offset : size;
    out.push_back({e.data + offset, take});
    size -= take;
    offset = 0;
  }
  return out;
}

class HostArena {
 public:
  // Takes host_extent_bytes(num_bytes) of pinned memory, pinning exactly the shortfall, as extents that start
  // on 4 KiB boundaries and hold num_bytes in all. Throws OutOfMemory.
  HostExtents allocate(size_t num_bytes);
  // Gives back extents that allocate() returned (with the page tail of each).
  void release(const HostExtents& extents);
  // Makes sure host_extent_bytes(num_bytes) are free (pins the shortfall). Returns the bytes newly pinned.
  size_t reserve_free(size_t num_bytes);
  // Frees every buffer that holds no backup. Returns the bytes unpinned. A buffer whose cuMemFreeHost
  // the driver refuses stays pinned (and free), and is tried again next time.
  size_t release_unused();
  // Drops every backup (the allocator is closing), then release_unused(). Returns the bytes unpinned.
  size_t release_all();

  size_t bytes_pinned() const noexcept { return bytes_pinned_; }
  size_t buffers_held() const noexcept;
  size_t bytes_free() const noexcept { return bytes_free_; }
  size_t bytes_in_use() const noexcept { return bytes_pinned_ - bytes_free_; }
  // Seconds spent pinning (placing, populating, registering or cuMemHostAlloc) since construction.
  double pin_seconds_total() const noexcept { return pin_seconds_total_; }
  // The host NUMA node new buffers are placed on (-1: no placement); the allocator sets it to the node
  // nearest the GPUs it offloads from.
  void set_numa_node(int node) noexcept { numa_node_ = node; }
  // The node every pinned buffer is on, or -1 (none pinned, no placement, or buffers on several nodes).
  int placed_numa_node() const noexcept;

 private:
  struct FreeExtent {
    size_t size_bytes;
    size_t buffer;  // index in buffers_
  };
  void pin(size_t num_bytes);
  void add_free(char* data, size_t size_bytes, size_t buffer);
  void add_free_buffer(size_t buffer);  // the whole buffer, one extent per registration piece
  bool same_piece(size_t buffer, const char* a, const char* b) const noexcept;
  size_t buffer_of(const char* data) const;

  std::vector<PinnedHostBuffer> buffers_;  // a freed slot keeps an empty buffer so indices stay stable
  std::map<char*, FreeExtent> free_;       // by address; adjacent extents of one buffer are coalesced
  size_t bytes_pinned_ = 0;
  size_t bytes_free_ = 0;
  double pin_seconds_total_ = 0;
  int numa_node_ = -1;
};

}  // namespace gpusleep
