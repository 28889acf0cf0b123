#include "segment.h"

#include <algorithm>
#include <utility>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

Segment::Segment(int device, std::string tag, size_t user_bytes, size_t granularity_bytes, size_t chunk_bytes,
                 bool pooled)
    : reservation_(std::max(round_up(user_bytes, granularity_bytes), granularity_bytes), granularity_bytes),
      device_(device),
      tag_(std::move(tag)),
      user_bytes_(user_bytes),
      physical_bytes_(round_up(user_bytes, granularity_bytes)),
      chunk_bytes_(std::max(granularity_bytes, chunk_bytes / granularity_bytes * granularity_bytes)),
      pooled_(pooled) {
  map();
}

namespace {
void grant_read_write(CUdeviceptr at, size_t size, int device) {
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  const CUresult result = GPUSLEEP_CU(cuMemSetAccess, at, size, &access, size_t{1});
  if (result != CUDA_SUCCESS) {
    throw_driver_error("cuMemSetAccess", "read-write for device " + std::to_string(device) + " on " + format_bytes(size),
                       result, __FILE__, __LINE__, size, device);
  }
}
}  // namespace

void Segment::map(const ChunkReady& chunk_ready, const std::function<void()>& drain) {
  if (physical_bytes_ == 0 || !chunks_.empty()) return;  // nothing to map, or mapped already
  std::vector<PhysicalChunk> chunks;
  chunks.reserve((physical_bytes_ + chunk_bytes_ - 1) / chunk_bytes_);
  MappedRange mapping;  // declared before the try: released only after drain() has run
  try {
    size_t offset = 0;
    while (offset < physical_bytes_) {
      const size_t size = std::min(chunk_bytes_, physical_bytes_ - offset);
      chunks.emplace_back(device_, size);
      const CUdeviceptr at = base() + offset;
      const CUresult result = GPUSLEEP_CU(cuMemMap, at, size, size_t{0}, chunks.back().handle(), 0ULL);
      if (result != CUDA_SUCCESS) {
        throw_driver_error("cuMemMap", format_bytes(size) + " at offset " + std::to_string(offset) + " of a " +
                                           format_bytes(physical_bytes_) + " segment on device " +
                                           std::to_string(device_),
                           result, __FILE__, __LINE__, size, device_);
      }
      if (mapping.empty()) {
        mapping = MappedRange(at, size);
      } else {
        mapping.extend(size);
      }
      if (chunk_ready) {
        grant_read_write(at, size, device_);
        chunk_ready(offset, size);
      }
      offset += size;
    }
    if (!chunk_ready) grant_read_write(base(), physical_bytes_, device_);  // one call for the whole range
  } catch (...) {
    if (drain) drain();
    throw;
  }
  chunks_ = std::move(chunks);
  mapping_ = std::move(mapping);
}

void Segment::unmap() noexcept {
  mapping_.reset();
  chunks_.clear();
}

}  // namespace gpusleep
