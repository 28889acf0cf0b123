// HostCopy: the host copy of one offloaded segment, in one of three tiers.
//
// Note [Host tiers]
// Rationale: pinned memory is the fastest home for a sleeping model's bytes (the GPU's DMA engines read and write
// it directly), but it cannot be swapped or reclaimed, and ten models sleeping on one server need ten models'
// worth of it. So a level-1 sleep puts each segment's copy in one of three tiers:
//   - pinned: exact-size extents of the HostArena (today's default; fastest, counted by the pinned budget);
//   - pageable: ordinary anonymous memory (PageableHostBuffer); the kernel may swap or reclaim it;
//   - file: one file per segment on a local disk (SpillFile), unlinked as soon as it is open.
// Approach: the tag's policy names its tier (set_policy(..., host_tier=...)); AllocatorOptions::pinned_budget_bytes
// caps the pinned copies, and a sleep that would exceed it places the rest in the next tier (pageable, within its
// own budget, then file where a file_dir is configured), least recently woken tags first (Allocator::place_copies).
// Pageable and file copies move through a small pinned staging ring (Note [Staging ring], staging_ring.h), never
// through a pageable cuMemcpy. A copy keeps its tier while it is kept (Note [Kept host copies]).
// Every tier is a transaction as before: a copy is made before anything is released, and a failed write, a full
// disk or a short read throws before the old state changes (the new copy's owner frees it on the way out).
// Limitations: pinned extents belong to the HostArena, which the allocator gives them back to (this class only
// holds them); pageable copies under memory pressure may be swapped out, and then wake at the disk's speed.
//
// Not thread-safe: the allocator uses it under its lock.
#pragma once

#include <cstddef>
#include <string>
#include <utility>

#include "host_arena.h"
#include "host_tier.h"
#include "pageable_host_buffer.h"
#include "spill_file.h"

namespace gpusleep {

class HostCopy {
 public:
  HostCopy() = default;
  // A copy in `extents` of the pinned arena (the caller gives them back to the arena: take_extents()).
  static HostCopy pinned(HostExtents extents);
  // A new, uninitialized pageable copy of `size_bytes`. Throws HostOutOfMemory.
  static HostCopy pageable(size_t size_bytes);
  // A new file copy of `size_bytes` in `directory`. Throws HostOutOfMemory (disk full) or HostIOError.
  static HostCopy file(const std::string& directory, size_t size_bytes);

  HostCopy(HostCopy&& other) noexcept { *this = std::move(other); }
  HostCopy& operator=(HostCopy&& other) noexcept;  // leaves `other` empty
  HostCopy(const HostCopy&) = delete;
  HostCopy& operator=(const HostCopy&) = delete;

  bool empty() const noexcept { return size_bytes_ == 0 && extents_.empty(); }
  HostTier tier() const noexcept { return tier_; }
  size_t size_bytes() const noexcept { return size_bytes_; }
  // Whether device copies must go through the staging ring (pageable and file).
  bool staged() const noexcept { return !empty() && tier_ != HostTier::kPinned; }
  // The pinned extents (empty for the other tiers).
  const HostExtents& extents() const noexcept { return extents_; }
  // Empties the copy and returns its pinned extents, for the caller to give back to the arena.
  HostExtents take_extents() noexcept;

  // Host-side access to [offset, offset + n). `room` (>= n): the bytes `data` may hold, which lets a file copy use
  // padded O_DIRECT I/O (SpillFile). Throw HostIOError / HostOutOfMemory for a file copy.
  void read(size_t offset, char* data, size_t n, size_t room = 0) const;
  void write(size_t offset, const char* data, size_t n, size_t room = 0);

 private:
  HostTier tier_ = HostTier::kPinned;
  size_t size_bytes_ = 0;
  HostExtents extents_;
  PageableHostBuffer pageable_;
  SpillFile file_;
};

}  // namespace gpusleep
