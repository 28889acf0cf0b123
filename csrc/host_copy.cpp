#include "host_copy.h"

#include <cstring>
#include <utility>

namespace gpusleep {

HostCopy HostCopy::pinned(HostExtents extents) {
  HostCopy copy;
  copy.tier_ = HostTier::kPinned;
  copy.size_bytes_ = total_bytes(extents);
  copy.extents_ = std::move(extents);
  return copy;
}

HostCopy HostCopy::pageable(size_t size_bytes) {
  HostCopy copy;
  copy.tier_ = HostTier::kPageable;
  copy.pageable_ = PageableHostBuffer(size_bytes);
  copy.size_bytes_ = size_bytes;
  return copy;
}

HostCopy HostCopy::file(const std::string& directory, size_t size_bytes) {
  HostCopy copy;
  copy.tier_ = HostTier::kFile;
  copy.file_ = SpillFile(directory, size_bytes);
  copy.size_bytes_ = size_bytes;
  return copy;
}

HostCopy& HostCopy::operator=(HostCopy&& other) noexcept {
  if (this != &other) {
    tier_ = std::exchange(other.tier_, HostTier::kPinned);
    size_bytes_ = std::exchange(other.size_bytes_, 0);
    extents_ = std::exchange(other.extents_, HostExtents{});
    pageable_ = std::move(other.pageable_);
    file_ = std::move(other.file_);
  }
  return *this;
}

HostExtents HostCopy::take_extents() noexcept {
  HostExtents out = std::exchange(extents_, HostExtents{});
  *this = HostCopy();
  return out;
}

void HostCopy::read(size_t offset, char* data, size_t n, size_t room) const {
  switch (tier_) {
    case HostTier::kPinned: {
      size_t done = 0;
      for (const HostExtent& e : slice_extents(extents_, offset, n)) {
        std::memcpy(data + done, e.data, e.size_bytes);
        done += e.size_bytes;
      }
      return;
    }
    case HostTier::kPageable: std::memcpy(data, pageable_.data() + offset, n); return;
    case HostTier::kFile: file_.read_at(offset, data, n, room < n ? n : room); return;
  }
}

void HostCopy::write(size_t offset, const char* data, size_t n, size_t room) {
  switch (tier_) {
    case HostTier::kPinned: {
      size_t done = 0;
      for (const HostExtent& e : slice_extents(extents_, offset, n)) {
        std::memcpy(e.data, data + done, e.size_bytes);
        done += e.size_bytes;
      }
      return;
    }
    case HostTier::kPageable: std::memcpy(pageable_.data() + offset, data, n); return;
    case HostTier::kFile: file_.write_at(offset, data, n, room < n ? n : room); return;
  }
}

}  // namespace gpusleep
