#include "caching_arena.h"

#include <iterator>
#include <utility>

#include "errors.h"

namespace gpusleep {
namespace {
constexpr size_t kMinBlockBytes = 512;
constexpr size_t kSmallRequestBytes = 1 << 20;        // <= 1 MiB: small pool
constexpr size_t kSmallSegmentBytes = 2 << 20;        // small pools grow by 2 MiB
constexpr size_t kMediumRequestBytes = 10 << 20;      // < 10 MiB: shares a 20 MiB segment
constexpr size_t kMediumSegmentBytes = 20 << 20;
constexpr size_t kLargeSplitRemainderBytes = 1 << 20;  // large blocks split only when > 1 MiB is left

size_t segment_size_for(size_t rounded) {
  if (rounded <= kSmallRequestBytes) return kSmallSegmentBytes;
  if (rounded < kMediumRequestBytes) return kMediumSegmentBytes;
  return rounded;
}
}  // namespace

CachingArena::CachingArena(CreateSegment create_segment, DestroySegments destroy_segments)
    : create_segment_(std::move(create_segment)), destroy_segments_(std::move(destroy_segments)) {}

CachingArena::~CachingArena() { forget_all(); }

void CachingArena::forget_all() {
  // Blocks only; segments belong to the Allocator, which destroys them.
  for (auto& [key, pool] : pools_) {
    for (Block* block : pool.free_blocks) delete block;
  }
  for (auto& [ptr, block] : allocated_) delete block;
  pools_.clear();
  allocated_.clear();
  bytes_cached_ = 0;
}

CachingArena::Block* CachingArena::take_from_pool(Pool& pool, size_t size_bytes) {
  Block probe{0, size_bytes, nullptr, nullptr};
  auto it = pool.free_blocks.lower_bound(&probe);
  if (it == pool.free_blocks.end()) return nullptr;
  Block* block = *it;
  pool.free_blocks.erase(it);
  bytes_cached_ -= block->size_bytes;
  const size_t remainder = block->size_bytes - size_bytes;
  const bool split = pool.small ? remainder >= kMinBlockBytes : remainder > kLargeSplitRemainderBytes;
  if (split) {
    Block* rest = new Block{block->ptr + size_bytes, remainder, block->segment, &pool};
    rest->prev = block;
    rest->next = block->next;
    if (block->next != nullptr) block->next->prev = rest;
    block->next = rest;
    block->size_bytes = size_bytes;
    pool.free_blocks.insert(rest);
    bytes_cached_ += remainder;
  }
  return block;
}

CUdeviceptr CachingArena::allocate(size_t size_bytes, int device, const std::string& tag, CUstream stream,
                                   uint64_t capture_id) {
  const size_t rounded =
      size_bytes == 0 ? kMinBlockBytes : round_up_checked(size_bytes, kMinBlockBytes, "allocation size");
  const bool small = rounded <= kSmallRequestBytes;
  PoolKey key{device, tag, stream, capture_id, small};
  auto pool_it = pools_.find(key);
  if (pool_it == pools_.end()) {
    pool_it = pools_.emplace(std::move(key), Pool{device, tag, capture_id, small, false, {}}).first;
  }
  Pool& pool = pool_it->second;
  Block* block = take_from_pool(pool, rounded);
  if (block != nullptr) {
    ++hits_;
  } else {
    ++misses_;
    const size_t segment_bytes = segment_size_for(rounded);
    Segment* segment = nullptr;
    try {
      segment = create_segment_(device, tag, segment_bytes);
    } catch (const OutOfMemory& error) {
      if (capture_id != 0) {
        // Giving cached memory back needs a device synchronize and unmaps, which would invalidate the
        // capture (docs/driver-rules.md section 12): fail this allocation instead and keep the capture valid.
        throw OutOfMemory(std::string(error.what()) +
                              ". This allocation was made during a CUDA graph capture, when gpusleep cannot give "
                              "its cached memory back to the driver; free memory before capturing",
                          error.bytes_needed(), error.bytes_free(), error.device());
      }
      // Give the device's unused cache back to the driver and try once more.
      size_t released = 0;
      try {
        released = release_cached([device](const Segment& s) { return s.device() == device; });
      } catch (const CaptureInProgress&) {
        // Another thread is capturing: keep the cache, report the original failure.
      }
      if (released == 0) throw;
      segment = create_segment_(device, tag, segment_bytes);
    }
    // The segment's physical size may exceed the request (granularity); the block covers all of it.
    Block* whole = new Block{segment->base(), segment->physical_bytes(), segment, &pool};
    pool.free_blocks.insert(whole);
    bytes_cached_ += whole->size_bytes;
    block = take_from_pool(pool, rounded);
  }
  block->allocated = true;
  ++pool.blocks_allocated;
  block->segment->backup_valid = false;  // a new tensor will be written here: a kept host copy is stale
  allocated_.emplace(block->ptr, block);
  return block->ptr;
}

void CachingArena::insert_free(Block* block) {
  Pool& pool = *block->pool;
  for (Block* neighbour : {block->prev, block->next}) {
    if (neighbour == nullptr || neighbour->allocated) continue;
    pool.free_blocks.erase(neighbour);
    bytes_cached_ -= neighbour->size_bytes;
    if (neighbour == block->prev) {
      block->ptr = neighbour->ptr;
      block->prev = neighbour->prev;
      if (block->prev != nullptr) block->prev->next = block;
    } else {
      block->next = neighbour->next;
      if (block->next != nullptr) block->next->prev = block;
    }
    block->size_bytes += neighbour->size_bytes;
    delete neighbour;
  }
  pool.free_blocks.insert(block);
  bytes_cached_ += block->size_bytes;
}

bool CachingArena::free(CUdeviceptr ptr) {
  auto it = allocated_.find(ptr);
  if (it == allocated_.end()) return false;
  Block* block = it->second;
  allocated_.erase(it);
  block->allocated = false;
  --block->pool->blocks_allocated;
  insert_free(block);
  return true;
}

size_t CachingArena::release_cached(const std::function<bool(const Segment&)>& select, const DestroySegments& destroy) {
  // Free blocks spanning their whole segment, by device: one destroy call per device (one device-wide wait
  // each, Note [Batched release]), so that a failure leaves that device's segments cached and changes nothing.
  std::map<int, std::vector<std::pair<Pool*, Block*>>> whole;
  for (auto& [key, pool] : pools_) {
    if (pool.capture_id != 0 && !pool.retired) continue;
    for (Block* block : pool.free_blocks) {
      if (spans_segment(block) && (!select || select(*block->segment))) {
        whole[block->segment->device()].emplace_back(&pool, block);
      }
    }
  }
  size_t released = 0;
  for (auto& [device, blocks] : whole) {
    std::vector<Segment*> segments;
    size_t asleep_bytes = 0;
    for (auto& [pool, block] : blocks) {
      segments.push_back(block->segment);
      // An asleep segment holds no GPU memory: what goes is its reservation and the bytes it had asleep.
      asleep_bytes += block->segment->has_physical_memory() ? 0 : block->segment->physical_bytes();
    }
    // May throw before changing anything: this device's blocks then stay cached (earlier devices' are gone).
    released += (destroy ? destroy(segments) : destroy_segments_(segments)) + asleep_bytes;
    for (auto& [pool, block] : blocks) {
      pool->free_blocks.erase(block);
      bytes_cached_ -= block->size_bytes;
      delete block;
    }
  }
  erase_spent_pools();
  return released;
}

void CachingArena::retire_graph_pool(uint64_t graph_pool) {
  for (auto& [key, pool] : pools_) {
    if (pool.capture_id == graph_pool) pool.retired = true;
  }
  erase_spent_pools();
}

void CachingArena::erase_spent_pools() {
  // A retired pool is never allocated from again: once it holds no block nothing refers to it.
  for (auto it = pools_.begin(); it != pools_.end();) {
    const Pool& pool = it->second;
    it = pool.retired && pool.free_blocks.empty() && pool.blocks_allocated == 0 ? pools_.erase(it) : std::next(it);
  }
}

size_t CachingArena::bytes_cached_mapped() const {
  size_t total = 0;
  for (const auto& [key, pool] : pools_) {
    for (const Block* block : pool.free_blocks) total += block->segment->has_physical_memory() ? block->size_bytes : 0;
  }
  return total;
}

size_t CachingArena::bytes_cached_releasable(const std::function<bool(const Segment&)>& select) const {
  size_t total = 0;
  for (const auto& [key, pool] : pools_) {
    if (pool.capture_id != 0 && !pool.retired) continue;
    for (const Block* block : pool.free_blocks) {
      if (spans_segment(block) && block->segment->has_physical_memory() && (!select || select(*block->segment))) {
        total += block->segment->physical_bytes();
      }
    }
  }
  return total;
}

size_t CachingArena::live_blocks(const std::string& tag) const {
  size_t count = 0;
  for (const auto& [ptr, block] : allocated_) count += block->pool->tag == tag ? 1 : 0;
  return count;
}

}  // namespace gpusleep
