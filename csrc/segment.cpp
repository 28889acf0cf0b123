#include "segment.h"

#include <algorithm>
#include <utility>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

namespace {
size_t reserved_size_for(size_t user_bytes, size_t granularity_bytes) {
  return std::max(round_up_checked(user_bytes, granularity_bytes, "allocation size"), granularity_bytes);
}
}  // namespace

Segment::Segment(int device, std::string tag, size_t user_bytes, const DeviceLayout& layout, size_t chunk_bytes,
                 bool pooled, ReleaseQueue& refused)
    : reservation_(reserved_size_for(user_bytes, layout.granularity_bytes), layout.granularity_bytes, device),
      base_(reservation_.base()),
      reserved_bytes_(reservation_.size_bytes()),
      device_(device),
      tag_(std::move(tag)),
      layout_(layout),
      physical_bytes_(round_up(user_bytes, layout.granularity_bytes)),
      user_bytes_(pooled ? physical_bytes_ : user_bytes),
      chunk_bytes_(std::max(layout.granularity_bytes, chunk_bytes / layout.granularity_bytes * layout.granularity_bytes)),
      pooled_(pooled) {
  try {
    map(refused);
  } catch (...) {
    // The constructor failed: the destructor will not run, so hand back the range here, never forgetting it.
    const CUresult result = reservation_.try_release();
    if (result != CUDA_SUCCESS) refused.add(device_, std::move(reservation_), result);
    throw;
  }
}

namespace {
// One cuMemSetAccess: read-write for the owning device and every peer that can access it.
// Out of memory here is GPU memory (the page tables of the new mapping), so it reports like cuMemCreate.
// `devices` drops the peers if they had to be left out.
void grant_access(CUdeviceptr at, size_t size, std::vector<int>& devices) {
  std::vector<CUmemAccessDesc> access(devices.size());
  for (size_t i = 0; i < devices.size(); ++i) {
    access[i].location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access[i].location.id = devices[i];
    access[i].flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  }
  CUresult result = GPUSLEEP_CU(cuMemSetAccess, at, size, access.data(), access.size());
  if (result != CUDA_SUCCESS && result != CUDA_ERROR_OUT_OF_MEMORY && devices.size() > 1) {
    // A peer refused (another process owns it in EXCLUSIVE_PROCESS mode, say): the owner's access is what
    // the memory cannot do without, so grant that alone rather than fail the allocation.
    result = GPUSLEEP_CU(cuMemSetAccess, at, size, access.data(), size_t{1});
    if (result == CUDA_SUCCESS) {
      devices.resize(1);
      return;
    }
  }
  if (result != CUDA_SUCCESS) {
    throw_driver_error("cuMemSetAccess",
                       "read-write for device " + std::to_string(devices.front()) + " and " +
                           std::to_string(devices.size() - 1) + " peer(s) on " + format_bytes(size),
                       result, __FILE__, __LINE__, size, devices.front());
  }
}

// Releases what a failed map() made; what the driver refuses goes to `refused`.
void release_partial(int device, MappedRange& mapping, std::vector<PhysicalChunk>& chunks,
                     ReleaseQueue& refused) noexcept {
  const CUresult unmapped = mapping.try_release();
  if (unmapped != CUDA_SUCCESS) {
    refused.add(device, std::move(mapping), unmapped);
  }
  for (PhysicalChunk& chunk : chunks) {
    const CUresult released = chunk.try_release();
    if (released != CUDA_SUCCESS) refused.add(device, std::move(chunk), released);
  }
  chunks.clear();
}
}  // namespace

void Segment::map(ReleaseQueue& refused, const ChunkReady& chunk_ready, const std::function<void()>& drain) {
  if (physical_bytes_ == 0 || !chunks_.empty()) return;  // nothing to map, or mapped already
  std::vector<PhysicalChunk> chunks;
  chunks.reserve((physical_bytes_ + chunk_bytes_ - 1) / chunk_bytes_);
  MappedRange mapping;  // declared before the try: released only after drain() has run
  try {
    size_t offset = 0;
    while (offset < physical_bytes_) {
      const size_t size = std::min(chunk_bytes_, physical_bytes_ - offset);
      chunks.emplace_back(device_, size, layout_.rdma_capable);
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
        grant_access(at, size, layout_.access_devices);
        chunk_ready(offset, size);
      }
      offset += size;
    }
    if (!chunk_ready) grant_access(base(), physical_bytes_, layout_.access_devices);  // one call for the range
  } catch (...) {
    if (drain) drain();
    release_partial(device_, mapping, chunks, refused);
    throw;
  }
  chunks_ = std::move(chunks);
  mapping_ = std::move(mapping);
}

size_t Segment::release_physical(ReleaseQueue& refused) noexcept {
  const CUresult unmapped = mapping_.try_release();
  if (unmapped != CUDA_SUCCESS) {
    give_up_physical(refused, unmapped);
    return 0;
  }
  size_t freed = 0;
  for (PhysicalChunk& chunk : chunks_) {
    const size_t size = chunk.size_bytes();
    const CUresult released = chunk.try_release();
    if (released == CUDA_SUCCESS) {
      freed += size;
    } else {
      refused.add(device_, std::move(chunk), released);
    }
  }
  chunks_.clear();
  return freed;
}

void Segment::give_up_physical(ReleaseQueue& refused, CUresult why) noexcept {
  refused.add(device_, std::move(mapping_), why);
  for (PhysicalChunk& chunk : chunks_) refused.add(device_, std::move(chunk), CUDA_SUCCESS);
  chunks_.clear();
  mapping_ = MappedRange();
}

void Segment::release_all(ReleaseQueue& refused) noexcept {
  release_physical(refused);
  const CUresult freed = reservation_.try_release();
  if (freed != CUDA_SUCCESS) refused.add(device_, std::move(reservation_), freed);
}

}  // namespace gpusleep
