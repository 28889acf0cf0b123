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

void Segment::map() {
  if (physical_bytes_ == 0 || !chunks_.empty()) return;  // nothing to map, or mapped already
  std::vector<PhysicalChunk> chunks;
  chunks.reserve((physical_bytes_ + chunk_bytes_ - 1) / chunk_bytes_);
  MappedRange mapping;
  size_t offset = 0;
  while (offset < physical_bytes_) {
    const size_t size = std::min(chunk_bytes_, physical_bytes_ - offset);
    chunks.emplace_back(device_, size);
    const CUdeviceptr at = base() + offset;
    const CUresult result = GPUSLEEP_CU(cuMemMap, at, size, size_t{0}, chunks.back().handle(), 0ULL);
    if (result != CUDA_SUCCESS) {
      throw_driver_error("cuMemMap", format_bytes(size) + " at offset " + std::to_string(offset) + " of a " +
                                         format_bytes(physical_bytes_) + " segment on device " + std::to_string(device_),
                         result, __FILE__, __LINE__, size, device_);
    }
    if (mapping.empty()) {
      mapping = MappedRange(at, size);
    } else {
      mapping.extend(size);
    }
    offset += size;
  }
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device_;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  const CUresult result = GPUSLEEP_CU(cuMemSetAccess, base(), physical_bytes_, &access, size_t{1});
  if (result != CUDA_SUCCESS) {
    throw_driver_error("cuMemSetAccess", "read-write for device " + std::to_string(device_) + " on " +
                                              format_bytes(physical_bytes_),
                       result, __FILE__, __LINE__, physical_bytes_, device_);
  }
  chunks_ = std::move(chunks);
  mapping_ = std::move(mapping);
}

void Segment::unmap() noexcept {
  mapping_.reset();
  chunks_.clear();
}

}  // namespace gpusleep
