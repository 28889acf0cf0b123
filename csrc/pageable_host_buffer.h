// PageableHostBuffer: move-only owner of ordinary (pageable) host memory for one host copy of the "pageable" tier
// (Note [Host tiers] in host_copy.h): an anonymous private mapping, kept out of fork() children and core dumps,
// populated on first write. The kernel may swap or reclaim it under pressure; no pinned budget counts it.
// The device never reads it directly: copies go through the staging ring (Note [Staging ring]).
#pragma once

#include <cstddef>

namespace gpusleep {

class PageableHostBuffer {
 public:
  PageableHostBuffer() = default;
  // Throws HostOutOfMemory (limited_by "mmap") when the mapping is refused.
  explicit PageableHostBuffer(size_t size_bytes);
  ~PageableHostBuffer();
  PageableHostBuffer(PageableHostBuffer&& other) noexcept;
  PageableHostBuffer& operator=(PageableHostBuffer&& other) noexcept;
  PageableHostBuffer(const PageableHostBuffer&) = delete;
  PageableHostBuffer& operator=(const PageableHostBuffer&) = delete;

  char* data() const noexcept { return data_; }
  size_t size_bytes() const noexcept { return size_bytes_; }

 private:
  void reset() noexcept;
  char* data_ = nullptr;
  size_t size_bytes_ = 0;
};

}  // namespace gpusleep
