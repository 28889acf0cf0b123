// CachingArena: global-mode sub-allocation of PyTorch's tensor allocations from mapped segments.
//
// Note [Caching arena]
// Rationale: in global mode every tensor allocation comes through gpusleep, so a cached malloc/free pair
// must cost about what PyTorch's own caching allocator costs: no driver call, no GIL, a few map lookups.
// Approach: blocks are carved from segments (csrc/segment.h) and cached in pools keyed by
// (device, tag, stream, capture id, small/large). Small requests (<= 1 MiB) share 2 MiB segments (rounded
// to the granularity); requests under 10 MiB share 20 MiB segments; larger ones get a segment of their own
// size. Best fit within the pool, split when the rest is worth keeping, coalesce with free neighbours on
// free. A block freed on stream S is reused only by allocations on S, which stream order makes safe.
// Tags: every segment belongs to one tag, so a tag's segments sleep and wake together with their blocks.
// CUDA graphs: a block allocated while its stream captures goes to a pool keyed by the capture id. Blocks
// freed during that capture are reused within it; after the capture ends the pool is never allocated from
// again and empty_cache() skips it, because replays of the graph keep using that memory. Captures into a shared
// graph pool (torch.cuda.graph(pool=...)) use the pool's key instead of the capture id, so they share its blocks, and
// the pool is retired with its last graph (Note [Shared graph pools] in graph_pools.h).
// Limitations: PyTorch's record_stream hook cannot be installed without building against torch, so a
// tensor used on a second stream must be synchronized by the user before it is freed; the memory of a capture the
// torch glue did not see is held until the process exits.
//
// Not thread-safe: the Allocator calls it under its lock.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "segment.h"
#include "size_math.h"

namespace gpusleep {

class CachingArena {
 public:
  // How the arena gets and returns segments (the Allocator owns them). create_segment may throw
  // OutOfMemory; destroy_segments gives back a batch (one device-wide wait per device: Note [Batched release]
  // in allocator.h), throws before changing anything, and returns the bytes of GPU memory the driver really
  // freed (a refused release keeps them pending: Note [Refused releases]).
  using CreateSegment = std::function<Segment*(int device, const std::string& tag, size_t size_bytes)>;
  using DestroySegments = std::function<size_t(const std::vector<Segment*>&)>;

  CachingArena(CreateSegment create_segment, DestroySegments destroy_segments);
  ~CachingArena();
  CachingArena(const CachingArena&) = delete;
  CachingArena& operator=(const CachingArena&) = delete;

  // A block of at least `size_bytes` on `device` for `tag`, usable on `stream`. capture_id != 0 while the
  // stream captures a CUDA graph. Throws OutOfMemory after releasing this device's cached segments (never
  // during a capture: that would invalidate it), InvalidArgument if the size does not survive rounding.
  CUdeviceptr allocate(size_t size_bytes, int device, const std::string& tag, CUstream stream, uint64_t capture_id);
  // Returns false if `ptr` is not a live block of this arena.
  bool free(CUdeviceptr ptr);
  bool owns(CUdeviceptr ptr) const { return allocated_.count(ptr) != 0; }
  // Drops every block and pool without touching the segments (the Allocator is closing and frees them).
  void forget_all();

  // The graph pool `graph_pool` (a capture id or a shared pool's key, Note [Shared graph pools]) has no graph left:
  // its free segments become releasable cache, and it is never allocated from again. A retired pool is forgotten
  // once it holds no block, free or live (at once, or when release_cached gives its last segment back).
  void retire_graph_pool(uint64_t graph_pool);

  // Destroys every cached segment that is entirely free (outside live graph pools), for the devices and tags
  // that pass `select` (all when empty). Returns the bytes of GPU memory the driver really freed (what it
  // refused to release is pending in the Allocator's ReleaseQueue, not counted here), plus the physical
  // bytes of asleep segments given back (their stats' bytes_asleep). All of them go to one destroy call
  // (`destroy`, else the arena's destroy_segments). Exception-safe: if it throws, every segment stays cached
  // and the exception propagates.
  size_t release_cached(const std::function<bool(const Segment&)>& select = {}, const DestroySegments& destroy = {});

  // Bytes in free blocks, whether their segment is mapped or asleep.
  size_t bytes_cached() const noexcept { return bytes_cached_; }
  // Bytes in free blocks of mapped segments: the GPU memory the cache holds now (walks the pools).
  size_t bytes_cached_mapped() const;
  // The physical bytes release_cached(select) would give back now (a dry run).
  size_t bytes_cached_releasable(const std::function<bool(const Segment&)>& select) const;
  // Live blocks and their bytes of one tag.
  size_t live_blocks(const std::string& tag) const;
  // Pools the arena keeps now (per device, tag, stream, graph pool and size class).
  size_t pools() const noexcept { return pools_.size(); }
  uint64_t hits() const noexcept { return hits_; }
  uint64_t misses() const noexcept { return misses_; }

 private:
  struct Pool;
  struct Block {
    CUdeviceptr ptr;
    size_t size_bytes;
    Segment* segment;
    Pool* pool;
    Block* prev = nullptr;  // neighbours inside the segment, by address
    Block* next = nullptr;
    bool allocated = false;
  };
  struct BlockBySize {
    bool operator()(const Block* a, const Block* b) const {
      return a->size_bytes != b->size_bytes ? a->size_bytes < b->size_bytes : a->ptr < b->ptr;
    }
  };
  struct Pool {
    int device;
    std::string tag;
    uint64_t capture_id;  // the graph pool: a capture id or a shared pool's key; 0 outside captures
    bool small;
    bool retired = false;  // a graph pool without graphs: its free segments are ordinary cache
    std::set<Block*, BlockBySize> free_blocks;
    size_t blocks_allocated = 0;  // live blocks carved from this pool
  };
  using PoolKey = std::tuple<int, std::string, CUstream, uint64_t, bool>;

  // Forgets every retired pool that holds no block.
  void erase_spent_pools();

  Block* take_from_pool(Pool& pool, size_t size_bytes);
  void insert_free(Block* block);
  static bool spans_segment(const Block* block) { return block->prev == nullptr && block->next == nullptr; }

  CreateSegment create_segment_;
  DestroySegments destroy_segments_;
  std::map<PoolKey, Pool> pools_;
  std::unordered_map<CUdeviceptr, Block*> allocated_;
  size_t bytes_cached_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace gpusleep
