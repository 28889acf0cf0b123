#include "chunk_verifier.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "chunk_hash.h"
#include "errors.h"

namespace gpusleep {

namespace {
// Whether two equally long runs of host bytes, each split into extents differently, hold the same bytes.
bool same_bytes(const HostExtents& a, const HostExtents& b) {
  size_t ai = 0, bi = 0, ao = 0, bo = 0;
  while (ai < a.size() && bi < b.size()) {
    const size_t n = std::min(a[ai].size_bytes - ao, b[bi].size_bytes - bo);
    if (std::memcmp(a[ai].data + ao, b[bi].data + bo, n) != 0) return false;
    ao += n;
    bo += n;
    if (ao == a[ai].size_bytes) ++ai, ao = 0;
    if (bo == b[bi].size_bytes) ++bi, bo = 0;
  }
  return true;
}

// The host copy's bytes [offset, offset + n) (any tier: a pageable or file copy is read on the host, Note [Host
// tiers]), as one extent over `buffer`.
HostExtents host_copy_bytes(const HostCopy& copy, size_t offset, size_t n, std::vector<char>& buffer) {
  if (!copy.staged()) return slice_extents(copy.extents(), offset, n);
  buffer.resize(n);
  copy.read(offset, buffer.data(), n);
  return {HostExtent{buffer.data(), n}};
}
}  // namespace

ChunkVerifier::ChunkVerifier(DeviceContexts& contexts, HostArena& host_arena, ReleaseQueue& refused, DeviceWaits& waits,
                             EngineFor engine_for, LayoutFor layout_for, AllocatorCounters& counters)
    : contexts_(contexts),
      host_arena_(host_arena),
      refused_(refused),
      waits_(waits),
      engine_for_(std::move(engine_for)),
      layout_for_(std::move(layout_for)),
      counters_(counters) {}

DeviceChecksum& ChunkVerifier::checksum(int device) {
  auto it = checksums_.find(device);
  if (it == checksums_.end()) {
    it = checksums_.emplace(device, std::make_unique<DeviceChecksum>(device, layout_for_(device), refused_, waits_))
             .first;
  }
  return *it->second;
}

bool ChunkVerifier::kernel_on(int device) {
  ScopedDeviceContext context(contexts_, device);
  DeviceChecksum& on = checksum(device);
  if (on.available()) {
    fallback_reasons_.erase(device);
    return true;
  }
  if (devices_without_kernel_.insert(device).second) ++counters_.verify_kernel_unavailable;
  fallback_reasons_[device] = on.unavailable_reason();
  return false;
}

std::string ChunkVerifier::fallback_reason() const {
  return fallback_reasons_.empty() ? std::string() : fallback_reasons_.begin()->second;
}

std::vector<std::vector<uint64_t>> ChunkVerifier::device_hashes(const std::vector<Segment*>& segments) {
  std::vector<std::vector<uint64_t>> hashes(segments.size());
  std::map<int, std::vector<size_t>> by_device;
  for (size_t i = 0; i < segments.size(); ++i) by_device[segments[i]->device()].push_back(i);
  for (const auto& [device, indices] : by_device) {
    ScopedDeviceContext context(contexts_, device);
    std::vector<HashRange> ranges;
    size_t bytes = 0;
    for (size_t i : indices) {
      ranges.push_back({segments[i]->base(), segments[i]->user_bytes()});
      bytes += segments[i]->user_bytes();
    }
    std::vector<std::vector<uint64_t>> of_device;
    DeviceChecksum& on = checksum(device);
    const uint64_t pinned_before = on.host_buffers_pinned();
    // A hash that cannot be taken leaves these segments unhashed (the caller then copies or verifies without
    // the kernel), unless its kernels may still be reading them: then the transaction must fail.
    try {
      of_device = on.hash(ranges, kPieceBytes);
    } catch (const OutOfMemory&) {
      ++counters_.verify_hash_no_memory;  // no granule free for the sums
      continue;
    } catch (const HostOutOfMemory&) {
      ++counters_.verify_hash_no_memory;  // no pinned memory for the sums
      continue;
    } catch (const CudaError& error) {
      if (!on.drained()) throw;
      ++counters_.verify_hash_failed;
      fallback_reasons_[device] =
          std::string("the chunk hash failed on device ") + std::to_string(device) + ": " + error.what();
      continue;
    }
    counters_.verify_host_buffers_pinned += on.host_buffers_pinned() - pinned_before;
    for (size_t k = 0; k < indices.size(); ++k) hashes[indices[k]] = std::move(of_device[k]);
    counters_.bytes_hashed_on_gpu += bytes;
  }
  return hashes;
}

std::vector<std::pair<size_t, size_t>> ChunkVerifier::changed_pieces(const std::vector<uint64_t>& now,
                                                                     const std::vector<uint64_t>& then,
                                                                     size_t total_bytes) {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t piece = 0; piece < now.size(); ++piece) {
    if (now[piece] == then[piece]) continue;
    const size_t offset = piece * kPieceBytes;
    out.emplace_back(offset, std::min(kPieceBytes, total_bytes - offset));
  }
  return out;
}

Verification ChunkVerifier::verify(const std::vector<Segment*>& segments) {
  Verification out;
  std::vector<Segment*> by_hash;
  for (Segment* segment : segments) {
    const size_t pieces = (segment->user_bytes() + kPieceBytes - 1) / kPieceBytes;
    if (segment->backup_hashes.size() == pieces && kernel_on(segment->device())) {
      by_hash.push_back(segment);
    } else {
      read_back(*segment, out);
    }
  }
  const std::vector<std::vector<uint64_t>> hashes = device_hashes(by_hash);
  for (size_t i = 0; i < by_hash.size(); ++i) {
    Segment& segment = *by_hash[i];
    if (hashes[i].size() != segment.backup_hashes.size()) {  // not hashed (no memory for the sums): read back
      read_back(segment, out);
      continue;
    }
    for (const auto& [offset, length] : changed_pieces(hashes[i], segment.backup_hashes, segment.user_bytes())) {
      out.mismatches.push_back({&segment, offset, length});
    }
  }
  return out;
}

void ChunkVerifier::read_back(Segment& segment, Verification& into) {
  const size_t total = segment.user_bytes();
  if (total == 0) return;
  // With the sleep's hashes, the bytes read back are hashed on the host and compared with them, which also
  // catches a host copy damaged while asleep; without them, they are compared with the host copy itself.
  const bool by_hash = segment.backup_hashes.size() == (total + kPieceBytes - 1) / kPieceBytes;
  ChunkHasher hasher(kPieceBytes);
  ScopedDeviceContext context(contexts_, segment.device());
  CopyEngine& engine = engine_for_(segment.device());
  const size_t window = std::min(total, kReadBackBytes);
  const HostExtents scratch = host_arena_.allocate(window);
  std::vector<char> host_bytes;  // a pageable or file copy's piece, read on the host
  try {
    for (size_t offset = 0; offset < total; offset += window) {
      const size_t length = std::min(window, total - offset);
      engine.device_to_host(segment.base() + offset, slice_extents(scratch, 0, length));
      engine.synchronize();
      if (by_hash) {
        for (const HostExtent& e : slice_extents(scratch, 0, length)) {
          hasher.add(reinterpret_cast<const unsigned char*>(e.data), e.size_bytes);
        }
        continue;
      }
      for (size_t at = 0; at < length; at += kPieceBytes) {
        const size_t n = std::min(kPieceBytes, length - at);
        if (!same_bytes(slice_extents(scratch, at, n), host_copy_bytes(segment.backup, offset + at, n, host_bytes))) {
          into.mismatches.push_back({&segment, offset + at, n});
        }
      }
    }
  } catch (...) {
    if (!release_scratch_after_drain(engine, host_arena_, scratch)) ++counters_.host_extents_quarantined;
    throw;
  }
  host_arena_.release(scratch);
  if (by_hash) {
    for (const auto& [offset, length] : changed_pieces(hasher.finish(), segment.backup_hashes, total)) {
      into.mismatches.push_back({&segment, offset, length});
    }
  }
  counters_.bytes_read_back_to_verify += total;
  into.bytes_read_back += total;
}

bool ChunkVerifier::host_copy_matches_its_hash(const Segment& segment, size_t offset_bytes, size_t num_bytes) const {
  const size_t piece = offset_bytes / kPieceBytes;
  if (piece >= segment.backup_hashes.size()) return true;  // no hash to disagree with
  std::vector<unsigned char> bytes;
  bytes.reserve(num_bytes);
  std::vector<char> buffer;
  for (const HostExtent& e : host_copy_bytes(segment.backup, offset_bytes, num_bytes, buffer)) {
    bytes.insert(bytes.end(), e.data, e.data + e.size_bytes);
  }
  return chunk_hash_bytes(bytes.data(), bytes.size(), offset_bytes / 8) == segment.backup_hashes[piece];
}

void ChunkVerifier::reserve_host_sums(int device, size_t num_sums) noexcept {
  try {
    if (!kernel_on(device)) return;
    ScopedDeviceContext context(contexts_, device);
    DeviceChecksum& on = checksum(device);
    const uint64_t pinned_before = on.host_buffers_pinned();
    on.reserve_host_sums(num_sums);
    counters_.verify_host_buffers_pinned += on.host_buffers_pinned() - pinned_before;
  } catch (...) {
  }
}

bool ChunkVerifier::synchronize_noexcept(int device) noexcept {
  auto it = checksums_.find(device);
  return it == checksums_.end() || it->second->synchronize_noexcept();
}

std::vector<int> ChunkVerifier::devices() const {
  std::vector<int> out;
  for (const auto& [device, checksum] : checksums_) out.push_back(device);
  return out;
}

bool ChunkVerifier::release(int device) noexcept {
  auto it = checksums_.find(device);
  if (it == checksums_.end()) return true;
  if (!it->second->release()) return false;
  checksums_.erase(it);
  return true;
}

}  // namespace gpusleep
