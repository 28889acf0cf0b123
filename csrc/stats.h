// Typed figures the core reports; Python turns them into the frozen dataclasses of gpusleep.stats.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gpusleep {

// Where a level-1 sleep put one tag's host copies (Note [Host tiers] in host_copy.h).
struct HostPlacementRecord {
  std::string tag;
  std::string tier;  // "pinned", "pageable" or "file"
  size_t bytes = 0;  // bytes of host copies of the tag in that tier after the sleep
};

struct SleepReport {
  int level = 0;
  std::vector<std::string> tags;  // tags put to sleep, or deepened, by the call
  size_t bytes_offloaded = 0;
  size_t bytes_reused = 0;  // offloaded without a copy: a kept host copy still held them
  size_t pieces_changed = 0;  // pieces of kept host copies found changed by their hash, and copied again
  size_t bytes_hashed = 0;    // bytes hashed on the GPU (Note [Verified wakes])
  size_t bytes_discarded = 0;
  size_t bytes_freed = 0;            // physical GPU memory released
  size_t bytes_release_pending = 0;  // GPU memory the driver refused to release; retried later
  // How much the devices' free memory (cuMemGetInfo) rose over the call, summed over the devices whose memory
  // went to sleep: below bytes_freed when something else still holds the memory (Note [Measured release]).
  size_t bytes_freed_measured = 0;
  double seconds = 0;
  double copy_seconds = 0;
  double verify_seconds = 0;  // hashing on the GPU before the copies
  double host_pin_seconds = 0;
  // Host tiers: the bytes of the host copies this sleep left in each tier, and per tag.
  size_t bytes_pinned_tier = 0;
  size_t bytes_pageable_tier = 0;
  size_t bytes_file_tier = 0;
  std::vector<HostPlacementRecord> placements;
};

struct WakeReport {
  std::vector<std::string> tags;
  size_t bytes_restored = 0;
  size_t bytes_zeroed = 0;
  size_t bytes_mapped = 0;
  // Restored bytes proven equal to their host copy before the wake completed (Note [Verified wakes]): by the
  // chunk hash on the GPU, or by reading them back (the fallback).
  size_t bytes_verified_by_hash = 0;
  size_t bytes_verified_by_read_back = 0;
  double seconds = 0;
  double copy_seconds = 0;
  double verify_seconds = 0;
};

// plan_wake(): one device's figures for a wake that has not happened.
struct WakePlanRecord {
  int device = -1;
  size_t bytes_needed = 0;       // GPU memory the wake would map on the device
  size_t bytes_free = 0;         // cuMemGetInfo's free bytes now
  size_t bytes_reclaimable = 0;  // unused cached global-mode segments the wake would give back first
};

struct HostMemoryReport {
  size_t bytes_pinned = 0;
  size_t bytes_in_use = 0;
  size_t bytes_newly_pinned = 0;
  double pin_seconds = 0;
  int numa_node = -1;  // host NUMA node of the pinned memory, -1 if not placed (or on several nodes)
  // Host tiers (Note [Host tiers] in host_copy.h).
  size_t bytes_pageable = 0;  // held by pageable host copies
  size_t bytes_file = 0;      // held by file host copies
  size_t bytes_staging = 0;   // pinned by the staging rings (not in bytes_pinned)
  std::optional<size_t> pinned_budget_bytes;
  std::optional<size_t> pageable_budget_bytes;
  std::string file_dir;
};

struct TagStatsRecord {
  std::string tag;
  std::string policy;
  bool is_sleeping = false;
  size_t allocations = 0;
  size_t bytes_reserved = 0;
  size_t bytes_mapped = 0;
  size_t bytes_asleep = 0;
  size_t bytes_backed_up = 0;
  std::string host_tier = "pinned";  // where its level-1 copies go first
  size_t bytes_pinned = 0;           // its host copies per tier now (sum: bytes_backed_up)
  size_t bytes_pageable = 0;
  size_t bytes_file = 0;
  double last_sleep_seconds = 0;
  double last_wake_seconds = 0;
};

struct AllocatorStatsRecord {
  std::vector<TagStatsRecord> tags;
  bool is_sleeping = false;
  HostMemoryReport host;
  size_t bytes_cached = 0;
  bool has_sleep = false;
  SleepReport last_sleep;
  bool has_wake = false;
  WakeReport last_wake;
  size_t bytes_release_pending = 0;    // GPU memory held by objects the driver refused to release
  size_t objects_release_pending = 0;  // driver objects awaiting a retry (after close: all still held)
  std::string verify;                  // "full" or "off" (Note [Verified wakes])
  std::string verify_fallback_reason;  // why a device verifies by reading back; empty while all hash on the GPU
  std::vector<std::pair<std::string, uint64_t>> counters;
};

}  // namespace gpusleep
