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
      chunk_bytes_(
          std::max(layout.granularity_bytes, chunk_bytes / layout.granularity_bytes * layout.granularity_bytes)),
      pooled_(pooled) {
  try {
    map(refused);
  } catch (...) {
    // The constructor failed: the destructor will not run, so hand back the range here, never forgetting it.
    // A mapping the driver refused to undo still lies inside it: then the range waits untried.
    if (refused.mapping_overlaps(base_, reserved_bytes_)) {
      refused.add(device_, std::move(reservation_), CUDA_SUCCESS);
    } else {
      const CUresult result = reservation_.try_release();
      if (result != CUDA_SUCCESS) refused.add(device_, std::move(reservation_), result);
    }
    throw;
  }
}

namespace {
CUmemAccessDesc read_write_for(int device) {
  CUmemAccessDesc access = {};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  return access;
}

// Read-write for `devices` (the owning device first, then the peers in use, Note [Peer access]): one
// cuMemSetAccess in the common case. A peer that refuses (out of memory for its page tables because another
// tenant filled it, EXCLUSIVE_PROCESS, ...) is left out: the owner's access is what the memory cannot do
// without, so only the owner's refusal fails the map (an out-of-memory then reports like cuMemCreate).
// `devices` drops the peers left out; the return value counts them.
size_t grant_access(CUdeviceptr at, size_t size, std::vector<int>& devices) {
  std::vector<CUmemAccessDesc> access;
  for (int device : devices) access.push_back(read_write_for(device));
  CUresult result = GPUSLEEP_CU(cuMemSetAccess, at, size, access.data(), access.size());
  if (result == CUDA_SUCCESS) return 0;
  if (devices.size() > 1) result = GPUSLEEP_CU(cuMemSetAccess, at, size, access.data(), size_t{1});
  if (result != CUDA_SUCCESS) {
    throw_driver_error("cuMemSetAccess",
                       "read-write for device " + std::to_string(devices.front()) + " and " +
                           std::to_string(devices.size() - 1) + " peer(s) on " + format_bytes(size),
                       result, __FILE__, __LINE__, size, devices.front());
  }
  // The owner has its access: find which peers refuse, one call each (rare: only after a refusal).
  std::vector<int> granted = {devices.front()};
  for (size_t i = 1; i < access.size(); ++i) {
    if (GPUSLEEP_CU(cuMemSetAccess, at, size, &access[i], size_t{1}) == CUDA_SUCCESS) granted.push_back(devices[i]);
  }
  const size_t refused = devices.size() - granted.size();
  devices = std::move(granted);
  return refused;
}

// Releases what a failed map() made; what the driver refuses goes to `refused`. With `drained` false,
// queued work may still write the mapping: it is not tried, it waits for the device to drain. The chunks
// the mapping covers come first in `chunks` (they are mapped in order); while the mapping stands they wait
// untried behind it (Note [Refused releases]). A chunk that was never mapped is released now.
void release_partial(int device, MappedRange& mapping, std::vector<PhysicalChunk>& chunks, ReleaseQueue& refused,
                     bool drained) noexcept {
  size_t mapped_bytes = mapping.size_bytes();
  const CUresult unmapped = drained ? mapping.try_release() : CUDA_SUCCESS;
  const bool still_mapped = mapping.owns();
  refused.add(device, std::move(mapping), unmapped);
  for (PhysicalChunk& chunk : chunks) {
    const bool behind_mapping = still_mapped && mapped_bytes > 0;
    mapped_bytes -= behind_mapping ? std::min(mapped_bytes, chunk.size_bytes()) : 0;
    if (behind_mapping) {
      refused.add(device, std::move(chunk), CUDA_SUCCESS);
      continue;
    }
    const CUresult released = chunk.try_release();
    if (released != CUDA_SUCCESS) refused.add(device, std::move(chunk), released);
  }
  chunks.clear();
}
}  // namespace

void Segment::map(ReleaseQueue& refused, const ChunkReady& chunk_ready, const std::function<bool()>& drain) {
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
        throw_driver_error("cuMemMap",
                           format_bytes(size) + " at offset " + std::to_string(offset) + " of a " +
                               format_bytes(physical_bytes_) + " segment on device " + std::to_string(device_),
                           result, __FILE__, __LINE__, size, device_);
      }
      if (mapping.empty()) {
        mapping = MappedRange(at, size);
      } else {
        mapping.extend(size);
      }
      if (chunk_ready) {
        peer_grants_refused_ += grant_access(at, size, layout_.access_devices);
        chunk_ready(offset, size);
      }
      offset += size;
    }
    if (!chunk_ready) {
      peer_grants_refused_ += grant_access(base(), physical_bytes_, layout_.access_devices);  // one call for the range
    }
  } catch (...) {
    // Copies chunk_ready queued into the mapping must be done before it goes; if the streams cannot be
    // drained, the memory stays mapped and owned by `refused` until the device has drained.
    const bool drained = !drain || drain();
    if (!drained) refused.await_drain(device_);
    release_partial(device_, mapping, chunks, refused, drained);
    throw;
  }
  chunks_ = std::move(chunks);
  mapping_ = std::move(mapping);
}

void Segment::set_access_devices(std::vector<int> devices) {
  if (devices.empty() || devices.front() != device_) {
    throw InvalidArgument("a segment's access devices start with its own device " + std::to_string(device_));
  }
  layout_.access_devices = std::move(devices);
}

bool Segment::grant_access_to(int peer) {
  if (!has_physical_memory()) return false;
  const std::vector<int>& granted = layout_.access_devices;
  if (std::find(granted.begin(), granted.end(), peer) != granted.end()) return false;
  const CUmemAccessDesc access = read_write_for(peer);
  if (GPUSLEEP_CU(cuMemSetAccess, base(), physical_bytes_, &access, size_t{1}) != CUDA_SUCCESS) {
    ++peer_grants_refused_;
    return false;
  }
  layout_.access_devices.push_back(peer);
  return true;
}

size_t Segment::take_peer_grants_refused() noexcept {
  const size_t refused = peer_grants_refused_;
  peer_grants_refused_ = 0;
  return refused;
}

size_t Segment::release_physical(ReleaseQueue& refused) noexcept {
  const CUresult unmapped = mapping_.try_release();
  if (unmapped != CUDA_SUCCESS) {
    // The chunks stay mapped: the driver would free them only at the unmap, so they wait untried.
    refused.add(device_, std::move(mapping_), unmapped);
    give_up_physical(refused);
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

void Segment::give_up_physical(ReleaseQueue& refused) noexcept {
  refused.add(device_, std::move(mapping_), CUDA_SUCCESS);
  for (PhysicalChunk& chunk : chunks_) refused.add(device_, std::move(chunk), CUDA_SUCCESS);
  chunks_.clear();
  mapping_ = MappedRange();
}

size_t Segment::release_all(ReleaseQueue& refused) noexcept {
  const size_t freed = release_physical(refused);
  if (refused.mapping_overlaps(base_, reserved_bytes_)) {
    // cuMemAddressFree fails while a mapping lies inside the range: the range waits for it, untried.
    refused.add(device_, std::move(reservation_), CUDA_SUCCESS);
    return freed;
  }
  const CUresult result = reservation_.try_release();
  if (result != CUDA_SUCCESS) refused.add(device_, std::move(reservation_), result);
  return freed;
}

}  // namespace gpusleep
