// Allocator::wake_up(): the wake transaction (Note [Sleep and wake are transactions] in allocator.h), with what it
// shares with plan_wake() (the tags and segments a wake concerns) and the check of what it restored (Note [Verified
// wakes]).
#include <algorithm>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "allocator.h"
#include "allocator_detail.h"
#include "errors.h"

namespace gpusleep {
using detail::Clock;
using detail::join_tags;
using detail::seconds_since;

std::vector<std::string> Allocator::wake_targets(const std::optional<std::vector<std::string>>& tags,
                                                 const char* call) const {
  std::vector<std::string> targets;
  if (tags) {
    for (const std::string& name : *tags) {
      auto it = tags_.find(name);
      if (it == tags_.end()) {
        throw InvalidArgument(std::string(call) + ": unknown tag '" + name + "'; known tags are " +
                              join_tags(known_tags_unlocked()));
      }
      if (it->second.asleep && std::find(targets.begin(), targets.end(), name) == targets.end()) {
        targets.push_back(name);
      }
    }
  } else {
    for (const auto& [name, state] : tags_) {
      if (state.asleep) targets.push_back(name);
    }
  }
  return targets;
}

std::vector<Segment*> Allocator::segments_waking(const std::vector<std::string>& targets) const {
  std::vector<Segment*> waking;
  for (const auto& [base, segment] : segments_) {
    if (segment->state != SegmentState::kMapped &&
        std::find(targets.begin(), targets.end(), segment->tag()) != targets.end()) {
      waking.push_back(segment.get());
    }
  }
  std::stable_sort(waking.begin(), waking.end(),
                   [](const Segment* a, const Segment* b) { return a->device() < b->device(); });
  return waking;
}

std::vector<WakePlanRecord> Allocator::plan_wake(const std::optional<std::vector<std::string>>& tags) {
  CallLock lock(*this);
  check_open();
  std::vector<WakePlanRecord> out;
  for (const auto& [device, bytes] : physical_bytes_by_device(segments_waking(wake_targets(tags, "plan_wake")))) {
    WakePlanRecord plan;
    plan.device = device;
    plan.bytes_needed = bytes;
    plan.bytes_free = free_bytes_on(device);
    const int on = device;
    plan.bytes_reclaimable = arena_.bytes_cached_releasable([on](const Segment& s) { return s.device() == on; });
    out.push_back(plan);
  }
  return out;
}

WakeReport Allocator::wake_up(const std::optional<std::vector<std::string>>& tags, bool zero_fill) {
  CallLock lock(*this);
  check_open();
  const auto start = Clock::now();
  const std::vector<std::string> targets = wake_targets(tags, "wake_up");
  WakeReport report;
  if (targets.empty()) return report;  // awake already: a no-op
  // Creating, mapping and granting memory and pinning are "unsafe" calls in the default GLOBAL mode: made while
  // another thread captures a graph, they would fail and invalidate that capture. Nothing here synchronizes
  // a device, so RELAXED is safe for the whole wake (Note [Captures]): the scope holds it until the end.
  TransitionScope transition(*this, "wake_up()", TransitionKind::kMap);
  transition.settle();

  std::vector<Segment*> waking = segments_waking(targets);
  for (const Segment* segment : waking) {
    if (refused_.mapping_overlaps(segment->base(), segment->reserved_bytes())) {
      ++counters_.failed_wakes;
      throw CudaError("wake_up(tags=" + join_tags(targets) +
                          "): the driver still refuses to unmap the old memory of a "
                          "segment of tag '" +
                          segment->tag() + "' on device " + std::to_string(segment->device()) +
                          " (last refusal: " + refused_.last_refusal() +
                          "), so new memory cannot be mapped at its "
                          "address yet. Nothing was changed: the tags stay asleep with their host copies; call wake_up "
                          "again later.",
                      CUDA_ERROR_ILLEGAL_STATE, cu_error_name(CUDA_ERROR_ILLEGAL_STATE));
    }
  }
  std::map<int, size_t> needed_bytes = physical_bytes_by_device(waking);
  auto out_of_memory = [&](int device, std::optional<size_t> free_bytes, const std::string& detail) {
    ++counters_.failed_wakes;
    return OutOfMemory("wake_up(tags=" + join_tags(targets) + ") needs " + format_bytes(needed_bytes[device]) +
                           " of GPU memory on device " + std::to_string(device) + " but only " +
                           (free_bytes ? format_bytes(*free_bytes) : std::string("an unknown amount")) + " is free" +
                           detail +
                           ". Nothing was changed: the tags stay asleep and their host copies are intact. Free GPU "
                           "memory (release tensors, torch.cuda.empty_cache()) and call wake_up again.",
                       needed_bytes[device], free_bytes, device);
  };
  for (const auto& [device, bytes] : needed_bytes) {
    size_t free_bytes = free_bytes_on(device);
    if (free_bytes < bytes) {
      // Our own cache comes first: unused global-mode segments of any awake tag on this device.
      const int on = device;
      if (arena_.release_cached([on](const Segment& s) { return s.device() == on; }) > 0) {
        ++counters_.cache_released_for_wake;
        free_bytes = free_bytes_on(device);
      }
    }
    if (free_bytes < bytes) throw out_of_memory(device, free_bytes, "");
  }

  std::vector<Segment*> mapped_now;
  std::vector<int> devices;
  for (const auto& [device, bytes] : needed_bytes) devices.push_back(device);
  // Waits for the copies and fills queued so far, then releases what this call mapped. A device whose copy
  // streams cannot be drained may still write that memory (and read the host copies, which stay with their
  // asleep segments): its segments are not unmapped but handed to refused_ untried, and retried only once
  // the device has drained (Note [Refused releases]).
  auto roll_back = [&]() noexcept {
    for (int device : devices) {
      bool drained = false;
      try {
        ScopedDeviceContext context(contexts_, device);
        drained = copy_engine(device).synchronize_noexcept();
        drained = verifier_.synchronize_noexcept(device) && drained;  // a hash kernel may still read it
        auto ring = staging_rings_.find(device);  // a staged restore that ran out of time may still write it
        if (ring != staging_rings_.end()) drained = ring->second->drained() && drained;
      } catch (...) {
      }
      if (drained) {
        refused_.drained(device);
      } else {
        refused_.await_drain(device);
      }
    }
    std::vector<Segment*> releasable;
    for (Segment* segment : mapped_now) {
      if (refused_.awaits_drain(segment->device())) {
        segment->give_up_physical(refused_);
      } else {
        releasable.push_back(segment);
      }
    }
    release_physical_of(releasable);
  };
  const auto copy_start = Clock::now();
  try {
    for (Segment* segment : waking) {
      ScopedDeviceContext context(contexts_, segment->device());
      CopyEngine& engine = copy_engine(segment->device());
      segment->set_access_devices(access_devices_now(segment->device()));  // the peers in use now
      if (segment->state == SegmentState::kOffloaded) {
        // Each chunk's copy starts as soon as it is mapped, overlapping the creation of the next one.
        segment->map(
            refused_,
            [&](size_t offset, size_t size) {
              const size_t end = std::min(offset + size, segment->user_bytes());
              if (end > offset) {
                copy_in(*segment, segment->backup, offset, end - offset);
              }
            },
            [&] { return engine.synchronize_noexcept(); });
      } else {
        segment->map(refused_);
      }
      mapped_now.push_back(segment);
      counters_.peer_grants_refused += segment->take_peer_grants_refused();
      report.bytes_mapped += segment->physical_bytes();
      if (segment->state == SegmentState::kOffloaded) {
        report.bytes_restored += segment->user_bytes();
      } else if (zero_fill && segment->physical_bytes() > 0) {
        engine.zero(segment->base(), segment->physical_bytes());
        report.bytes_zeroed += segment->physical_bytes();
      }
    }
    for (int device : devices) {
      ScopedDeviceContext context(contexts_, device);
      copy_engine(device).synchronize();
    }
    report.copy_seconds = seconds_since(copy_start);
    if (verify_ == VerifyMode::kFull) {
      std::vector<Segment*> restored;
      for (Segment* segment : waking) {
        if (segment->state == SegmentState::kOffloaded) restored.push_back(segment);
      }
      verify_restored(restored, targets, report);  // throws WakeVerificationFailed: rolled back below
    }
  } catch (const OutOfMemory& error) {
    roll_back();
    const int device = error.device() >= 0 ? error.device() : devices.front();
    std::optional<size_t> free_bytes;
    try {
      free_bytes = free_bytes_on(device);
    } catch (...) {
    }
    throw out_of_memory(device, free_bytes, std::string(" (") + error.what() + ")");
  } catch (...) {
    roll_back();
    ++counters_.failed_wakes;
    throw;
  }

  for (Segment* segment : waking) {
    if (segment->state == SegmentState::kOffloaded && keeps_host_copy(*segment)) {
      segment->backup_valid = true;  // the device bytes equal the host copy again: keep it
    } else {
      drop_kept_copy(*segment);
    }
    segment->state = SegmentState::kMapped;
  }
  report.seconds = seconds_since(start);
  for (const std::string& name : targets) {
    TagState& state = tags_.at(name);
    state.asleep = false;
    state.level = 0;
    state.last_wake_seconds = report.seconds;
    state.wake_order = ++wakes_so_far_;  // Note [Host tiers]: the budget spills the least recently woken first
  }
  report.tags = targets;
  ++counters_.wakes;
  last_wake_ = report;
  return report;
}

void Allocator::verify_restored(const std::vector<Segment*>& restored, const std::vector<std::string>& targets,
                                WakeReport& report) {
  if (restored.empty()) return;
  const auto start = Clock::now();
  const Verification verification = verifier_.verify(restored);
  const std::vector<PieceMismatch>& mismatches = verification.mismatches;
  size_t restored_bytes = 0;
  for (const Segment* segment : restored) restored_bytes += segment->user_bytes();
  report.bytes_verified_by_read_back = verification.bytes_read_back;
  report.bytes_verified_by_hash = restored_bytes - report.bytes_verified_by_read_back;
  report.verify_seconds = seconds_since(start);
  if (mismatches.empty()) {
    ++counters_.verified_wakes;
    return;
  }
  ++counters_.wake_verification_failures;
  std::vector<MismatchedBlock> blocks;
  std::set<std::string> bad_tags;
  std::string listed;
  bool host_copy_damaged = false;
  for (const PieceMismatch& m : mismatches) {
    blocks.push_back({m.segment->tag(), m.segment->base() + m.offset_bytes, m.num_bytes});
    bad_tags.insert(m.segment->tag());
    // Did the restore go wrong (a retry helps), or does the host copy itself no longer hold what the sleep
    // hashed (damaged or written while asleep, or written on the GPU between the sleep's hash and its copy)?
    host_copy_damaged =
        host_copy_damaged || !verifier_.host_copy_matches_its_hash(*m.segment, m.offset_bytes, m.num_bytes);
    if (blocks.size() <= 8) {
      std::ostringstream where;
      where << "0x" << std::hex << blocks.back().address;
      listed += (blocks.size() > 1 ? ", " : "") + std::string("tag '") + m.segment->tag() + "' " + where.str() + " (" +
                format_bytes(m.num_bytes) + ")";
    }
  }
  if (blocks.size() > 8) listed += ", and " + std::to_string(blocks.size() - 8) + " more";
  const bool by_read_back = report.bytes_verified_by_read_back > 0;
  const std::string tags_list = join_tags(std::vector<std::string>(bad_tags.begin(), bad_tags.end()));
  const std::string what_now =
      host_copy_damaged
          ? "The host copy itself no longer holds what the sleep hashed (host memory damaged or written while "
            "asleep, or GPU work that wrote the memory between the sleep's hash and its copy), so another wake_up "
            "fails the same way. If the host copy is what you want back, trust_host_copies(tags=" +
                tags_list +
                ") accepts it (the next wake then checks only that the restore equals it); otherwise sleep at level 2 "
                "and load the weights again."
          : "The host copy still holds what the sleep hashed, so the restore went wrong: call wake_up again to "
            "restore it again. If it fails again, the GPU's memory or the link is faulty (check dmesg for Xid "
            "errors and run `gpusleep doctor`).";
  throw WakeVerificationFailed(
      "wake_up(tags=" + join_tags(targets) + "): " + std::to_string(blocks.size()) +
          " block(s) of restored GPU memory "
          "differ from what the sleep copied out (" +
          (by_read_back ? "read back and compared" : "chunk hash on the GPU") + "): " + listed +
          ". The wake was rolled back: the tags stay asleep with their host copies and nothing is "
          "served from them. " +
          what_now,
      std::vector<std::string>(bad_tags.begin(), bad_tags.end()), std::move(blocks), host_copy_damaged);
}

void Allocator::trust_host_copies(const std::optional<std::vector<std::string>>& tags) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const std::vector<std::string> targets = wake_targets(tags, "trust_host_copies");
  for (const auto& [base, segment] : segments_) {
    if (segment->state == SegmentState::kOffloaded &&
        std::find(targets.begin(), targets.end(), segment->tag()) != targets.end()) {
      segment->backup_hashes.clear();
    }
  }
  ++counters_.host_copies_trusted;
}

}  // namespace gpusleep
