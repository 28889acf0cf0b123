#include "host_arena.h"

#include <algorithm>
#include <chrono>
#include <iterator>

#include "errors.h"

namespace gpusleep {

void HostArena::pin(size_t num_bytes) {
  const auto start = std::chrono::steady_clock::now();
  PinnedHostBuffer buffer(num_bytes, numa_node_);
  pin_seconds_total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  buffers_.push_back(std::move(buffer));
  bytes_pinned_ += num_bytes;
  add_free_buffer(buffers_.size() - 1);
}

void HostArena::add_free_buffer(size_t buffer) {
  // One free extent per registration piece: an extent never crosses a piece boundary (Note [Parallel pinning]).
  const PinnedHostBuffer& b = buffers_[buffer];
  for (size_t offset = 0; offset < b.size_bytes(); offset += b.piece_bytes()) {
    add_free(b.data() + offset, std::min(b.piece_bytes(), b.size_bytes() - offset), buffer);
  }
}

bool HostArena::same_piece(size_t buffer, const char* a, const char* b) const noexcept {
  const PinnedHostBuffer& owner = buffers_[buffer];
  return static_cast<size_t>(a - owner.data()) / owner.piece_bytes() ==
         static_cast<size_t>(b - owner.data()) / owner.piece_bytes();
}

size_t HostArena::reserve_free(size_t num_bytes) {
  const size_t wanted = host_extent_bytes(num_bytes);
  if (bytes_free_ >= wanted) return 0;
  const size_t shortfall = wanted - bytes_free_;  // whole pages: every buffer and every free extent is
  pin(shortfall);
  return shortfall;
}

HostExtents HostArena::allocate(size_t num_bytes) {
  HostExtents out;
  if (num_bytes == 0) return out;
  const size_t carved = host_extent_bytes(num_bytes);
  reserve_free(carved);
  size_t remaining = carved;  // whole pages, so every free extent stays 4 KiB aligned
  while (remaining > 0) {
    auto it = free_.begin();  // lowest address first: keeps backups in few, long extents
    char* data = it->first;
    const FreeExtent extent = it->second;
    free_.erase(it);
    const size_t take = extent.size_bytes < remaining ? extent.size_bytes : remaining;
    out.push_back({data, take});
    if (take < extent.size_bytes) free_.emplace(data + take, FreeExtent{extent.size_bytes - take, extent.buffer});
    bytes_free_ -= take;
    remaining -= take;
  }
  out.back().size_bytes -= carved - num_bytes;  // the page tail is held, not handed out (release() takes it back)
  return out;
}

size_t HostArena::buffer_of(const char* data) const {
  for (size_t i = 0; i < buffers_.size(); ++i) {
    const char* begin = buffers_[i].data();
    if (begin != nullptr && data >= begin && data < begin + buffers_[i].size_bytes()) return i;
  }
  throw InvalidArgument("host extent does not belong to the pinned arena");
}

void HostArena::add_free(char* data, size_t size_bytes, size_t buffer) {
  bytes_free_ += size_bytes;
  auto next = free_.lower_bound(data);
  if (next != free_.end() && next->second.buffer == buffer && data + size_bytes == next->first &&
      same_piece(buffer, data, next->first)) {
    size_bytes += next->second.size_bytes;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->second.buffer == buffer && prev->first + prev->second.size_bytes == data &&
        same_piece(buffer, prev->first, data)) {
      prev->second.size_bytes += size_bytes;
      return;
    }
  }
  free_.emplace(data, FreeExtent{size_bytes, buffer});
}

void HostArena::release(const HostExtents& extents) {
  // Every extent starts on a page boundary of a carve of whole pages: its page tail comes back with it.
  for (const HostExtent& e : extents) add_free(e.data, host_extent_bytes(e.size_bytes), buffer_of(e.data));
}

int HostArena::placed_numa_node() const noexcept {
  int node = -2;  // none seen yet
  for (const PinnedHostBuffer& buffer : buffers_) {
    if (buffer.data() == nullptr) continue;
    if (node == -2) node = buffer.numa_node();
    if (buffer.numa_node() != node) return -1;
  }
  return node == -2 ? -1 : node;
}

size_t HostArena::buffers_held() const noexcept {
  size_t held = 0;
  for (const PinnedHostBuffer& buffer : buffers_) held += buffer.data() != nullptr ? 1 : 0;
  return held;
}

size_t HostArena::release_all() {
  free_.clear();
  bytes_free_ = 0;
  for (size_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].data() != nullptr) add_free_buffer(i);
  }
  return release_unused();
}

size_t HostArena::release_unused() {
  size_t released = 0;
  for (size_t i = 0; i < buffers_.size(); ++i) {
    PinnedHostBuffer& buffer = buffers_[i];
    if (buffer.data() == nullptr) continue;
    // Wholly free: its free extents (one per piece at most) add up to its size.
    const auto first = free_.lower_bound(buffer.data());
    auto last = first;
    size_t free_bytes = 0;
    for (; last != free_.end() && last->second.buffer == i; ++last) free_bytes += last->second.size_bytes;
    if (free_bytes != buffer.size_bytes()) continue;
    const size_t size = buffer.size_bytes();
    if (buffer.try_release() != CUDA_SUCCESS) continue;  // refused: still pinned, still free, retried next time
    free_.erase(first, last);
    bytes_free_ -= size;
    bytes_pinned_ -= size;
    released += size;
  }
  return released;
}

}  // namespace gpusleep
