// Allocator::sleep(): the sleep transaction (Note [Sleep and wake are transactions] in allocator.h), with the
// helpers only it uses: where each new host copy goes (place_copies) and the sampled check of a kept copy.
#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "allocator.h"
#include "allocator_detail.h"
#include "errors.h"
#include "host_memory_budget.h"

namespace gpusleep {
using detail::Clock;
using detail::join_tags;
using detail::seconds_since;

SleepReport Allocator::sleep(int level, const std::optional<std::vector<std::string>>& offload_tags,
                             const std::optional<std::vector<std::string>>& only_tags) {
  if (level != 1 && level != 2) throw InvalidArgument("sleep level must be 1 or 2, got " + std::to_string(level));
  if (offload_tags && level == 2) throw InvalidArgument("offload_tags applies to level 1 only");
  CallLock lock(*this);
  check_open();
  const auto start = Clock::now();
  if (only_tags) {
    for (const std::string& name : *only_tags) {
      if (tags_.find(name) == tags_.end()) {
        throw InvalidArgument("sleep: unknown tag '" + name + "'; known tags are " + join_tags(known_tags_unlocked()));
      }
    }
  }
  auto named = [&](const std::string& name) {
    return only_tags && std::find(only_tags->begin(), only_tags->end(), name) != only_tags->end();
  };

  for (const auto& [base, segment] : segments_) tag_state(segment->tag());
  if (offload_tags) {
    for (const std::string& name : *offload_tags) tag_state(name);
  }

  // 1. Plan.
  std::map<std::string, SleepAction> actions;
  for (auto& [name, state] : tags_) {
    const bool listed =
        offload_tags && std::find(offload_tags->begin(), offload_tags->end(), name) != offload_tags->end();
    if (only_tags && !named(name)) continue;  // sleep(tags=[...]): the other tags stay as they are
    if (!listed && !named(name) && state.policy == TagPolicy::kKeep) continue;  // a named tag sleeps even if kept
    if (state.asleep) {
      if (level == 2 && state.level == 1) actions[name] = SleepAction::kDropBackup;
      continue;
    }
    const bool offload = level == 1 && (offload_tags ? listed : state.policy == TagPolicy::kOffload);
    actions[name] = offload ? SleepAction::kOffload : SleepAction::kDiscard;
  }
  auto action_of = [&](const std::string& tag) {
    auto it = actions.find(tag);
    return it == actions.end() ? SleepAction::kNone : it->second;
  };
  auto goes_to_sleep = [&](const Segment& s) {
    const SleepAction a = action_of(s.tag());
    return a == SleepAction::kOffload || a == SleepAction::kDiscard;
  };

  SleepReport report;
  report.level = level;
  if (actions.empty()) {  // nothing to do: already asleep at this depth, or only kept tags
    report.seconds = seconds_since(start);
    ++counters_.sleeps;
    last_sleep_ = report;
    return report;
  }
  TransitionScope transition(*this, "sleep()", TransitionKind::kRelease);
  std::vector<Segment*> sleeping_now;
  for (const auto& [base, segment] : segments_) {
    if (goes_to_sleep(*segment)) sleeping_now.push_back(segment.get());
  }
  // The devices are taken now: release_cached below destroys the cached segments among sleeping_now.
  const std::vector<int> sleeping_devices = devices_of(sleeping_now);
  const std::map<int, size_t> free_before = free_bytes_now(sleeping_devices);  // Note [Measured release]
  report.bytes_freed += transition.settle().bytes_freed;  // what earlier refusals held, freed now
  const size_t pending_before = refused_.bytes_pending();
  // 2. Wait for the work that uses the memory: one device-wide wait per device, for everything that goes to
  // sleep, cached segments included (Note [Batched release]). Nothing has changed yet if it throws.
  synchronize_devices(devices_touching(sleeping_now));
  // Cached arena segments without a live block hold nothing worth copying: give them back first, in one batch,
  // without a second wait. Only what the driver really freed counts; what it refused is pending (reported below).
  report.bytes_freed += arena_.release_cached(
      goes_to_sleep, [this](const std::vector<Segment*>& segments) { return destroy_segments(segments, true); });

  std::vector<Segment*> offload, discard, drop;
  for (const auto& [base, segment] : segments_) {
    const SleepAction a = action_of(segment->tag());
    if (a == SleepAction::kOffload && segment->state == SegmentState::kMapped) offload.push_back(segment.get());
    if (a == SleepAction::kDiscard && segment->state == SegmentState::kMapped) discard.push_back(segment.get());
    if (a == SleepAction::kDropBackup && segment->state == SegmentState::kOffloaded) drop.push_back(segment.get());
  }

  std::vector<Segment*> releasing = offload;
  releasing.insert(releasing.end(), discard.begin(), discard.end());

  // 3. The host copy of each offloaded segment: its kept copy's extents (Note [Kept host copies]), else new
  // extents, pinning at most the shortfall, once. 4. What to copy into it: everything; nothing for a kept copy
  // that is trusted; with verification on (Note [Verified wakes]), only the pieces of a kept copy whose chunk
  // hash changed. 5. The copies, then one synchronize per device. Any failure: wait for what was queued, give
  // back the new extents and every kept copy a copy wrote into (it is stale now), hand the kept copies nothing
  // wrote into back to their segments, change nothing else, raise.
  const size_t offloads = offload.size();
  std::vector<HostCopy> backups(offloads);
  std::vector<bool> had_copy(offloads), trusted(offloads, false), written(offloads, false);
  std::vector<std::vector<std::pair<size_t, size_t>>> copy_ranges(offloads);  // (offset, bytes) to copy
  std::vector<std::vector<uint64_t>> new_hashes(offloads);                    // of the device bytes now
  for (size_t i = 0; i < offloads; ++i) {
    Segment& segment = *offload[i];
    had_copy[i] = !segment.backup.empty();
    if (!had_copy[i] || !keeps_host_copy(segment) || !segment.backup_valid) continue;
    // Valid by the hints: trusted without verification, and with it wherever no hash can be taken below (then
    // with the sampled check first where the tag asks for it, as without verification).
    trusted[i] = true;
    const bool sampled = tags_.at(segment.tag()).verify_kept_copy &&
                         (verify_ == VerifyMode::kOff || !verifier_.kernel_on(segment.device()));
    if (sampled && !kept_copy_matches(segment)) {
      ++counters_.kept_copy_mismatches;
      trusted[i] = false;
    }
  }
  const std::vector<int> copy_devices = devices_of(offload);
  const double pinned_before = host_arena_.pin_seconds_total();
  auto copy_start = Clock::now();
  try {
    // Note [Host tiers]: each new copy's tier, within the budgets; only the pinned ones need pinned memory.
    const std::vector<HostTier> tiers = place_copies(offload, had_copy);
    size_t new_bytes = 0;
    for (size_t i = 0; i < offloads; ++i) {
      new_bytes += had_copy[i] || tiers[i] != HostTier::kPinned ? 0 : host_extent_bytes(offload[i]->user_bytes());
    }
    if (new_bytes > host_arena_.bytes_free()) {
      check_host_memory_for_pinning(new_bytes - host_arena_.bytes_free(), "the backup of a level-1 sleep");
      host_arena_.set_numa_node(common_host_numa_node(copy_devices));
    }
    if (offloads > 0) {
      ScopedDeviceContext context(contexts_, offload.front()->device());
      for (size_t i = 0; i < offloads; ++i) {
        // held by `backups` until the commit
        backups[i] = had_copy[i] ? std::move(offload[i]->backup) : new_host_copy(tiers[i], offload[i]->user_bytes());
      }
    }
    report.host_pin_seconds = host_arena_.pin_seconds_total() - pinned_before;
    if (verify_ == VerifyMode::kFull) {
      const auto hash_start = Clock::now();
      std::vector<Segment*> hashed;
      std::vector<size_t> hashed_index;
      for (size_t i = 0; i < offloads; ++i) {
        if (verifier_.kernel_on(offload[i]->device())) {
          hashed.push_back(offload[i]);
          hashed_index.push_back(i);
        }
      }
      std::vector<std::vector<uint64_t>> hashes = verifier_.device_hashes(hashed);
      for (size_t k = 0; k < hashed.size(); ++k) {
        if (!hashes[k].empty()) report.bytes_hashed += hashed[k]->user_bytes();
        new_hashes[hashed_index[k]] = std::move(hashes[k]);
      }
      report.verify_seconds = seconds_since(hash_start);
    }
    for (size_t i = 0; i < offloads; ++i) {
      const Segment& segment = *offload[i];
      const std::vector<uint64_t>& now = new_hashes[i];
      const bool diffable =
          !now.empty() && had_copy[i] && keeps_host_copy(segment) && segment.backup_hashes.size() == now.size();
      if (diffable) {
        copy_ranges[i] = ChunkVerifier::changed_pieces(now, segment.backup_hashes, segment.user_bytes());
        report.pieces_changed += copy_ranges[i].size();
      } else if (!(trusted[i] && now.empty())) {
        copy_ranges[i].emplace_back(0, segment.user_bytes());
      }
    }
    copy_start = Clock::now();
    for (size_t i = 0; i < offloads; ++i) {
      if (copy_ranges[i].empty()) continue;
      ScopedDeviceContext context(contexts_, offload[i]->device());
      written[i] = true;  // before the first enqueue: a copy that fails half-way has written some of it
      for (const auto& [offset, length] : copy_ranges[i]) {
        copy_out(*offload[i], backups[i], offset, length);
      }
    }
    for (int device : copy_devices) {
      ScopedDeviceContext context(contexts_, device);
      copy_engine(device).synchronize();
    }
  } catch (...) {
    bool drained = true;
    for (int device : copy_devices) {
      try {
        ScopedDeviceContext context(contexts_, device);
        drained = copy_engine(device).synchronize_noexcept() && drained;
      } catch (...) {
        drained = false;  // copies into the extents may still be running: never hand them out again
      }
    }
    for (size_t i = 0; i < offloads; ++i) {
      Segment& segment = *offload[i];
      if (had_copy[i] && !written[i]) {
        if (!backups[i].empty()) segment.backup = std::move(backups[i]);  // untouched: still the kept copy
        continue;
      }
      if (had_copy[i]) {
        segment.backup_valid = false;  // written into: stale, dropped
        segment.backup_hashes.clear();
      }
      // A staged copy's DMA ran into the staging ring, never into it (Note [Staging ring]): always freed. Pinned
      // extents a copy may still write are never handed out again (dropped from the copy, kept by the arena).
      if (drained || backups[i].staged()) release_host_copy(backups[i]);
    }
    if (!drained) ++counters_.host_extents_quarantined;
    ++counters_.failed_sleeps;
    throw;
  }
  bool copied_any = false;
  for (const auto& ranges : copy_ranges) copied_any = copied_any || !ranges.empty();
  report.copy_seconds = copied_any ? seconds_since(copy_start) : 0.0;

  // 6. Commit: every copy has completed. From here on nothing throws: each segment's physical memory is
  // released, and what the driver refuses (or what cannot be tried because a context switch fails) is
  // kept in refused_ and retried later (Note [Refused releases]). The sleep itself is complete.
  for (size_t i = 0; i < offloads; ++i) {
    Segment& segment = *offload[i];
    segment.backup = std::move(backups[i]);
    segment.state = SegmentState::kOffloaded;
    segment.backup_valid = false;
    size_t copied = 0;
    for (const auto& range : copy_ranges[i]) copied += range.second;
    if (!new_hashes[i].empty()) {
      segment.backup_hashes = std::move(new_hashes[i]);  // the copy equals the device bytes just hashed
    } else if (copied > 0) {
      segment.backup_hashes.clear();  // copied without a hash: a wake verifies it by reading back
    }
    report.bytes_offloaded += copied;
    report.bytes_reused += segment.user_bytes() - copied;  // a trusted kept copy, or a kept copy's unchanged pieces
    const HostTier tier = segment.backup.tier();
    (tier == HostTier::kPinned     ? report.bytes_pinned_tier
     : tier == HostTier::kPageable ? report.bytes_pageable_tier
                                   : report.bytes_file_tier) += segment.user_bytes();
    auto placed = std::find_if(report.placements.begin(), report.placements.end(), [&](const HostPlacementRecord& p) {
      return p.tag == segment.tag() && p.tier == host_tier_name(tier);
    });
    if (placed == report.placements.end()) {
      report.placements.push_back({segment.tag(), host_tier_name(tier), 0});
      placed = std::prev(report.placements.end());
    }
    placed->bytes += segment.user_bytes();
  }
  for (Segment* segment : discard) {
    drop_kept_copy(*segment);  // a level-2 sleep of a tag that kept its host copy
    segment->state = SegmentState::kDiscarded;
    report.bytes_discarded += segment->physical_bytes();
  }
  report.bytes_freed += release_physical_of(releasing);
  report.bytes_release_pending = refused_.bytes_pending() - std::min(pending_before, refused_.bytes_pending());
  for (const auto& [device, after] : free_bytes_now(sleeping_devices)) {
    auto before = free_before.find(device);
    if (before != free_before.end() && after > before->second) report.bytes_freed_measured += after - before->second;
  }
  for (Segment* segment : drop) {
    if (refused_.awaits_drain(segment->device())) {
      ++counters_.host_extents_quarantined;  // a failed wake's queued restore may still read it
      segment->backup = HostCopy();              // pinned extents kept by the arena, never handed out again
    } else {
      release_host_copy(segment->backup);
    }
    segment->state = SegmentState::kDiscarded;
    report.bytes_discarded += segment->user_bytes();
  }
  report.seconds = seconds_since(start);
  for (const auto& [name, action] : actions) {
    TagState& state = tags_.at(name);
    state.asleep = true;
    state.level = action == SleepAction::kDropBackup ? 2 : level;
    state.last_sleep_seconds = report.seconds;
    report.tags.push_back(name);
  }
  ++counters_.sleeps;
  last_sleep_ = report;
  return report;
}

bool Allocator::kept_copy_matches(Segment& segment) {
  // Four pieces: the first and last bytes and two in between, 64 KiB each (or the whole segment).
  constexpr size_t kPieceBytes = size_t{64} << 10;
  const size_t total = segment.user_bytes();
  std::vector<size_t> offsets;
  if (total <= 4 * kPieceBytes) {
    offsets.push_back(0);
  } else {
    offsets = {0, total / 3 / kPieceBytes * kPieceBytes, 2 * total / 3 / kPieceBytes * kPieceBytes,
               total - kPieceBytes};
  }
  const size_t piece = std::min(total, total <= 4 * kPieceBytes ? total : kPieceBytes);
  ScopedDeviceContext context(contexts_, segment.device());
  CopyEngine& engine = copy_engine(segment.device());
  const HostExtents scratch = host_arena_.allocate(piece * offsets.size());
  bool same = true;
  try {
    for (size_t i = 0; i < offsets.size(); ++i) {
      engine.device_to_host(segment.base() + offsets[i], slice_extents(scratch, i * piece, piece));
    }
    engine.synchronize();
    for (size_t i = 0; i < offsets.size() && same; ++i) {
      const HostExtents fresh = slice_extents(scratch, i * piece, piece);
      std::vector<char> a, b(piece);
      for (const HostExtent& e : fresh) a.insert(a.end(), e.data, e.data + e.size_bytes);
      segment.backup.read(offsets[i], b.data(), piece);
      same = a == b;
    }
  } catch (...) {
    if (!release_scratch_after_drain(engine, host_arena_, scratch)) ++counters_.host_extents_quarantined;
    throw;
  }
  host_arena_.release(scratch);
  return same;
}

std::vector<HostTier> Allocator::place_copies(const std::vector<Segment*>& offload, const std::vector<bool>& had_copy) {
  std::vector<HostTier> tiers(offload.size(), HostTier::kPinned);
  std::vector<size_t> order;
  for (size_t i = 0; i < offload.size(); ++i) {
    if (had_copy[i]) {
      tiers[i] = offload[i]->backup.tier();  // a kept copy keeps its tier
    } else if (offload[i]->user_bytes() > 0) {
      order.push_back(i);
    }
  }
  // The most recently woken tags are placed first, so the least recently woken ones are what spills.
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return tags_.at(offload[a]->tag()).wake_order > tags_.at(offload[b]->tag()).wake_order;
  });
  size_t pinned_used = host_arena_.bytes_in_use();
  size_t pageable_used = host_copy_bytes_in(HostTier::kPageable);
  // Pageable copies take host memory as pinned ones do (only their pages can be reclaimed or swapped, slowly):
  // one that the host cannot hold beside this sleep's new pinned bytes goes to the next tier, never to the OOM
  // killer. New pinned bytes are those beyond the arena's free bytes (checked again before pinning).
  const HostMemoryBudget host = read_host_memory_budget();
  const size_t arena_free = host_arena_.bytes_free();
  size_t pinned_added = 0, pageable_added = 0;
  const auto host_bytes_added = [&] {
    return (pinned_added > arena_free ? pinned_added - arena_free : 0) + pageable_added;
  };
  bool pageable_short_of_host = false;
  for (size_t i : order) {
    const size_t need = offload[i]->user_bytes();
    const size_t pinned_need = host_extent_bytes(need);  // the arena carves whole 4 KiB pages (host_arena.h)
    const HostTier wanted = tags_.at(offload[i]->tag()).host_tier;
    bool placed = false;
    for (HostTier tier : {HostTier::kPinned, HostTier::kPageable, HostTier::kFile}) {
      if (tier < wanted) continue;  // only the tag's own tier or a lower one
      if (tier == HostTier::kPinned && options_.pinned_budget_bytes &&
          pinned_used + pinned_need > *options_.pinned_budget_bytes) {
        continue;
      }
      if (tier == HostTier::kPageable && options_.pageable_budget_bytes &&
          pageable_used + need > *options_.pageable_budget_bytes) {
        continue;
      }
      if (tier == HostTier::kPageable && !host.fits(host_bytes_added() + need)) {
        pageable_short_of_host = true;
        continue;
      }
      if (tier == HostTier::kFile && options_.file_dir.empty()) continue;
      tiers[i] = tier;
      const size_t held = tier == HostTier::kFile ? 0 : tier == HostTier::kPinned ? pinned_need : need;
      (tier == HostTier::kPinned ? pinned_used : pageable_used) += held;
      (tier == HostTier::kPinned ? pinned_added : pageable_added) += held;
      if (tier != wanted) ++counters_.host_copies_spilled;
      placed = true;
      break;
    }
    if (!placed && pageable_short_of_host) {
      const size_t available = host.available_bytes().value_or(0);
      throw HostOutOfMemory("sleep(level=1): the pageable host copy of " + format_bytes(need) + " of tag '" +
                                offload[i]->tag() + "' does not fit the host's memory (" + host.limited_by() + ": " +
                                format_bytes(available) + " available, " + format_bytes(host_bytes_added()) +
                                " already placed by this sleep, with headroom) and no file_dir is configured. "
                                "Nothing was changed. Free host memory, configure file_dir, or sleep at level 2.",
                            need, available, host.limited_by());
    }
    if (!placed) {
      throw HostOutOfMemory(
          "sleep(level=1): the host copy of " + format_bytes(need) + " of tag '" + offload[i]->tag() +
              "' fits no "
              "host tier: the pinned budget (" +
              (options_.pinned_budget_bytes ? format_bytes(*options_.pinned_budget_bytes) : std::string("none")) +
              ") and the pageable budget (" +
              (options_.pageable_budget_bytes ? format_bytes(*options_.pageable_budget_bytes) : std::string("none")) +
              ") are used up and no file_dir is configured. Nothing was changed. Raise a budget, configure "
              "file_dir, or sleep at level 2.",
          need, std::nullopt, "budget");
    }
  }
  return tiers;
}

}  // namespace gpusleep
