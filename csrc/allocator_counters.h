// The allocator's counters (stats().counters in Python), declared once.
//
// Note [Typed counters]
// Rationale: the counters were a map from name to count, bumped by string at some forty places in five files;
// a misspelt name made a new counter that nobody read, and nothing listed what exists. Approach: one list,
// GPUSLEEP_ALLOCATOR_COUNTERS, names each counter and says what it counts. It generates the fields of
// AllocatorCounters (so `++counters_.sleeps` is checked by the compiler), the (name, value) pairs stats()
// reports, and the descriptions Python and the docs read (`gpusleep._C.counter_descriptions()`; docs/design.md
// lists them and tests/project/test_docs.py checks the list). GPUSLEEP_ALLOCATOR_READINGS
// lists what stats() reads from its owner when it runs (the arena, the release queue, the device waits): counts
// kept there, and gauges marked "(now)" that go down as well as up; they are not fields of AllocatorCounters, so
// nothing can bump one by mistake. Every counter is always reported, 0 until its event first happens.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace gpusleep {

// X(name, what it counts)
#define GPUSLEEP_ALLOCATOR_COUNTERS(X)                                                                            \
  X(sleeps, "sleep calls that completed, those with nothing left to do included")                                 \
  X(failed_sleeps, "sleeps that failed and were rolled back (invariant 2)")                                       \
  X(wakes, "wake_up calls that completed")                                                                        \
  X(failed_wakes, "wakes that failed and were rolled back: the tags stay asleep with their host copies")          \
  X(verified_wakes, "wakes whose restored bytes were verified (Note [Verified wakes])")                           \
  X(wake_verification_failures, "wakes refused because restored bytes differed from their hashes")                \
  X(host_copies_trusted, "trust_host_copies() calls: host copies accepted although their hash no longer matched") \
  X(kept_copy_mismatches, "re-sleeps that found a kept host copy changed and copied it again")                    \
  X(host_copies_spilled, "host copies placed in a later tier than their policy asked, for a budget")              \
  X(stale_host_copy_files_removed, "host-copy files of dead processes removed at start")                          \
  X(bytes_staged_out, "bytes copied to pageable or file host copies through the staging ring")                    \
  X(bytes_staged_in, "bytes restored from pageable or file host copies through the staging ring")                 \
  X(host_extents_quarantined, "pinned host extents set aside because a copy into them might still be running")    \
  X(cache_released_for_wake, "times cached global-mode segments were released to make room for a wake")           \
  X(refused_allocations_while_asleep, "allocations refused because their tag was asleep")                         \
  X(segments_created, "segments mapped")                                                                          \
  X(segments_destroyed, "segments unmapped and released")                                                         \
  X(peer_grants_refused, "peer-device access grants the driver refused (the owner's access was granted)")         \
  X(frees_deferred_by_capture, "frees refused during a stream capture, done at the next call that may")           \
  X(queued_frees_refused, "frees queued during a transition that named no live allocation")                       \
  X(verify_kernel_unavailable, "devices where the chunk-hash kernel could not load: wakes verified by read-back") \
  X(verify_hash_no_memory, "hashes not taken for want of a device granule or pinned memory for the sums")         \
  X(verify_hash_failed, "hashes not taken because the kernel launch or its wait failed")                          \
  X(verify_host_buffers_pinned, "pinned buffers allocated for the chunk sums")                                    \
  X(bytes_hashed_on_gpu, "bytes hashed by the chunk-hash kernel")                                                 \
  X(bytes_read_back_to_verify, "bytes read back to the host to verify a wake without the kernel")                 \
  X(gil_released_while_waiting, "global-mode allocations that gave the GIL up while they waited for a transition")

// Read from their owners when stats() runs (not stored in AllocatorCounters): counts kept elsewhere, and gauges
// (marked "now") that go down as well as up.
#define GPUSLEEP_ALLOCATOR_READINGS(X)                                                                           \
  X(frees_queued_during_transition, "frees queued because a transition held the lock (Note [Frees never wait])") \
  X(arena_hits, "global-mode allocations served from cached memory")                                             \
  X(arena_misses, "global-mode allocations that mapped a new segment")                                           \
  X(arena_pools, "global-mode arena pools: per device, tag, stream or graph pool (now)")                         \
  X(segments_live, "segments mapped (now)")                                                                      \
  X(staging_slots_quarantined, "staging ring slots set aside after a copy could not be drained")                 \
  X(teardown_failures,                                                                                           \
    "driver calls that failed inside a destructor, in the whole process (every allocator reports the same)")     \
  X(device_wait_timeouts, "device or stream waits that ran out of their deadline")                               \
  X(release_refused, "releases the driver refused, kept and retried later")

#define GPUSLEEP_COUNTER_FIELD(name, meaning) uint64_t name = 0;
#define GPUSLEEP_COUNTER_PAIR(name, meaning) {#name, source.name},
#define GPUSLEEP_COUNTER_DESCRIPTION(name, meaning) {#name, meaning},

// The events the allocator counts as they happen.
struct AllocatorCounters {
  GPUSLEEP_ALLOCATOR_COUNTERS(GPUSLEEP_COUNTER_FIELD)
};

// What stats() reads from the owners at the time.
struct AllocatorReadings {
  GPUSLEEP_ALLOCATOR_READINGS(GPUSLEEP_COUNTER_FIELD)
};

// (name, value) of every counter and reading, in the lists' order: stats().counters.
inline std::vector<std::pair<std::string, uint64_t>> named_counters(const AllocatorCounters& counters,
                                                                    const AllocatorReadings& readings) {
  std::vector<std::pair<std::string, uint64_t>> out;
  {
    const AllocatorCounters& source = counters;
    out = {GPUSLEEP_ALLOCATOR_COUNTERS(GPUSLEEP_COUNTER_PAIR)};
  }
  const AllocatorReadings& source = readings;
  const std::vector<std::pair<std::string, uint64_t>> read = {GPUSLEEP_ALLOCATOR_READINGS(GPUSLEEP_COUNTER_PAIR)};
  out.insert(out.end(), read.begin(), read.end());
  return out;
}

// (name, what it counts) of every counter and reading, in the same order.
inline std::vector<std::pair<std::string, std::string>> counter_descriptions() {
  return {GPUSLEEP_ALLOCATOR_COUNTERS(GPUSLEEP_COUNTER_DESCRIPTION)
              GPUSLEEP_ALLOCATOR_READINGS(GPUSLEEP_COUNTER_DESCRIPTION)};
}

#undef GPUSLEEP_COUNTER_FIELD
#undef GPUSLEEP_COUNTER_PAIR
#undef GPUSLEEP_COUNTER_DESCRIPTION

}  // namespace gpusleep
