// Allocator: the registry of segments by tag and device, tag policies, and the sleep/wake state machine.
//
// Note [Sleep and wake are transactions]
// sleep(): (1) plan which segments of which tags are offloaded or discarded; (2) wait for all work on
// the devices concerned (cuCtxSynchronize: VMM unmap does not wait for kernels, docs/driver-rules.md
// section 7); (3) take exact-size pinned extents from the HostArena and enqueue every device->host copy
// on the CopyEngine streams; (4) one synchronize per device. Only when every copy has completed are the
// mappings unmapped and the physical chunks released. A failure before that point returns the host
// extents, changes nothing else and raises (docs/invariants.md, invariant 2).
// wake_up(): checks cuMemGetInfo against the bytes needed per device first (giving back unused cached
// segments if that is what it takes), then for each segment creates and maps its chunks; the
// host->device copy of each chunk is enqueued as soon as that chunk is mapped (Segment::map's
// chunk_ready), so creating and mapping the rest overlaps the copies already running. Discarded
// segments get one cuMemSetAccess for the whole range and a zero fill. If any create or map fails, every stream is
// synchronized, everything this call mapped is unmapped and released, the host copies stay, the tags
// stay asleep, and OutOfMemory says how many bytes were needed and how many were free (invariant 3).
// If a device's copy streams refuse to synchronize, its queued copies and fills may still write what this
// call mapped: that memory is not unmapped but kept in the ReleaseQueue, untried until the device has
// drained (Note [Refused releases]); the host copies they read stay with their asleep segments.
//
// A driver object the driver refuses to release never makes the transaction fail half-way: the commit
// phase cannot throw, and what is refused is kept in a ReleaseQueue and retried (Note [Refused releases]).
//
// Note [Kept host copies]
// Rationale: switching models on one GPU sleeps and wakes the same weights again and again; when they did
// not change, copying them to the host again is wasted PCIe time (seconds for a large model). Approach:
// a tag set to keep host copies (set_policy(tag, kOffload, keep_host_copy=true)) keeps each segment's
// backup after a wake, marked valid. The next level-1 sleep unmaps such a segment without copying it.
// What invalidates the copy (with verification off, the next level-1 sleep then copies the segment again):
//   - mark_changed(tag): the caller's promise; code that updates weights in place must call it;
//   - global mode: the caching arena handing out a block of that segment (a new tensor);
//   - pool mode: the Python layer entering Allocator.tag(tag), the only way PyTorch allocates in the tag's
//     MemPool (which reuses freed blocks without calling gpusleep); it calls mark_changed, no driver call;
//   - the compat layers' weight-update paths (vLLM's wake_up(tags=...), torch_memory_saver's resume(tag)),
//     which call mark_changed after the wake;
//   - a failed sleep, set_policy turning the option off, a discard (level 2), release_host_memory().
// With verify_kept_copy the sleep also copies four 64 KiB pieces of each segment back (the first and last
// bytes and two in between; the whole segment below 256 KiB) and compares them with the copy; if one
// differs it copies everything (counted in counters["kept_copy_mismatches"]); if the copy streams refuse to
// drain after that comparison, its host scratch is never handed out again
// (counters["host_extents_quarantined"]). The host memory stays in
// use while a copy is kept (stats' bytes_backed_up); release_host_memory() drops the kept copies of awake
// tags. Limitations: what is NOT detected is an in-place write to existing memory without mark_changed and
// outside the sampled pieces: load_state_dict / copy_ into existing parameters, an NCCL broadcast into the
// parameters, LoRA slots filled in place, buffers mutated by CUDA-graph replays or torch.compile, a KV
// cache built inside the weights tag, or an engine that writes weights after a full wake. The sleep then
// restores the old bytes with no error, unless verification is on (the default): then the sleep hashes every
// piece on the GPU and copies the changed ones, and none of this is needed (Note [Verified wakes]).
//
// Note [Verified wakes]
// Rationale: a wake that restores wrong bytes (a bad DMA, a copy to the wrong offset, a short copy, host memory
// changed while asleep) serves wrong weights with no error; no test on our driver double proves that the real
// driver and the user's hardware do not. So every wake proves it. Approach (VerifyMode::kFull, the default;
// "off" with Allocator(verify="off") or GPUSLEEP_VERIFY=off):
//   - level-1 sleep hashes each offloaded segment on its GPU (chunk_hash.h: one 64-bit sum per 4 MiB piece,
//     computed by a PTX kernel the driver JIT-compiles, device_checksum.h) before copying it out, and keeps the
//     hashes with the host copy (Segment::backup_hashes);
//   - wake, after every restore copy completed and before anything counts as awake, hashes the restored bytes
//     again and compares. A mismatch fails the wake transaction like a failed copy (invariant 3): what it
//     mapped is released, the tags stay asleep with their host copies, and WakeVerificationError names the
//     tags and the 4 MiB blocks that differ; calling wake_up again restores again.
//   - a re-sleep of a tag that keeps host copies (Note [Kept host copies]) hashes each segment on the GPU and
//     copies only the pieces whose hash changed since the copy was made: in-place writes, reused blocks and
//     weight updates are caught with or without mark_changed (which only matters with verify "off").
// Fallback: where the kernel cannot be loaded (cuModuleLoadDataEx refused: no JIT for this PTX), sleeps take no
// hashes, a wake reads the restored bytes back through pinned scratch and compares them with the host copy
// (twice the PCIe traffic of the wake), a kept copy is trusted as with verify "off", and
// stats().verify_fallback_reason says why (the Python layer warns once).
// Cost: hashing reads device memory at HBM speed (one pass at sleep, one at wake), against PCIe-speed copies;
// its share of a wake is measured by benchmarks/bench_sleep_wake.py (docs/reliability.md has the figures).
// Limitations: the hash detects accidents, not an adversary (a 64-bit sum of mixed words); a piece changed
// and changed back between two hashes is, rightly, not copied; level 2 discards and has nothing to verify.
//
// Note [Captures]
// During a CUDA graph capture the driver refuses (and the refusal invalidates the capture) any
// synchronize, unmap or release, from any thread in the default GLOBAL interaction mode. gpusleep needs
// those for sleep, wake, free and empty_cache, and for giving cached memory back when an allocation runs
// out. So: (1) an allocation made on a capturing stream never gives cached memory back; if no new
// segment can be created it fails with OutOfMemory and the capture stays valid; (2) every stream seen
// capturing in torch_malloc is remembered, and sleep/wake/free/empty_cache/host-memory calls first ask
// the driver whether it still captures (a query, allowed during captures) and raise CaptureInProgress if
// so; (3) a synchronize the driver refuses with a capture error (a capture gpusleep could not see: one
// that never allocated through it) is reported as CaptureInProgress too, though the driver has by then
// invalidated that capture. (4) Calls that need no device-wide wait run in RELAXED mode, which the driver
// allows during other threads' captures (as PyTorch does around cudaMalloc and cudaHostAlloc): creating
// segments (RELAXED before the first retain of a device's context, which creates it), the whole of a
// wake after its capture check, and pinning and unpinning host memory. In the default GLOBAL mode each of
// them would fail with 900 and invalidate any other thread's GLOBAL capture, seen or not.
//
// Note [Measured release]
// Rationale: users judge a sleep mode by whether the GPU memory really comes back, and bytes_freed only
// says what gpusleep released. Memory that something else still references stays allocated: an NCCL
// user-buffer registration or a dma-buf export (cuMemRetainAllocationHandle) keeps the old physical pages
// alive after cuMemRelease and cuMemUnmap, and a sleep that counted them freed would mislead a scheduler.
// Approach: sleep reads cuMemGetInfo's free bytes on each device whose memory goes to sleep before its
// first release and after its last one, and reports the rise (bytes_freed_measured, clamped at zero per
// device). The Python layer warns when it falls well short of bytes_freed (allocator.py names the likely
// causes). Limitation: free memory is the whole device's, so other processes allocating or freeing during
// the sleep move the figure either way; it is a measurement, not an accounting.
//
// Note [Peer access]
// Rationale: a mapping is readable only by the devices granted access (cuMemSetAccess). Other GPUs of the
// process read gpusleep memory (a pipeline stage on cuda:1, `x.to("cuda:1")`, DataParallel), so they need
// access, and once they have it, sleep, free and empty_cache must wait for their work too: VMM unmap does
// not wait for GPU work (docs/driver-rules.md section 7), and a peer reading unmapped memory takes a sticky
// illegal address. But granting every P2P-capable GPU costs page-table work on all of them at each map and
// unmap (8x on an 8-GPU box where each process uses one GPU), and a nearly full peer would fail this
// process's own allocation. Approach: a peer is "in use" when its primary context is active, whoever holds
// it (cuDevicePrimaryCtxGetState, a query that creates nothing): PyTorch and the CUDA runtime make it
// active on first use of a device. Each map grants the owner and the peers in use then (a wake re-grants);
// the first allocation on a device, and refresh_peer_access(), grant a newly used device access to the
// memory mapped before. A peer that refuses its grant (out of memory, exclusive mode) is left out and
// counted (counters["peer_grants_refused"]); only the owner's refusal fails. Sleep, free and empty_cache
// wait for the owners and every capable peer in use. GPUSLEEP_PEER_ACCESS=1 grants every capable peer,
// =0 none. Limitation: a device that comes into use after a map, and is never allocated on through
// gpusleep (pool mode), gets access only at the next wake or refresh_peer_access().
//
// Note [Frees never wait]
// Rationale: sleep and wake hold the allocator's lock for seconds (copies, pinning, device waits). In global
// mode every tensor free of the process comes through torch_free, from Python threads that hold the GIL (the
// HTTP loop, /is_sleeping, metrics) and from ProcessGroupNCCL's watchdog: a free that waited for the lock
// froze all of them behind a sleep (review 2026-12-06, finding 9). Approach: torch_free only try-locks; when
// the lock is busy it queues the address on a small list with its own mutex and returns at once. Every public
// call drains the queue when it takes the lock and again before it gives it back (CallLock), so the holder
// of a transition does the frees at its end and a free never waits for it; the same rule the frees refused
// during a capture follow (deferred_frees_). A queued block stays allocated until drained, so its address
// cannot be handed out twice, and its stream's order is kept. Limitation: a free queued in the instant after
// the holder's last drain waits for the next call of any thread (its block is only not reusable meanwhile).
// counters["frees_queued_during_transition"] counts them.
//
// Note [Batched release]
// Cached segments (sleep, empty_cache, the out-of-memory retry) are given back in one batch: one device-wide
// wait per device (the owners and the peers in use), then every segment unmapped and released, as PyTorch's
// release_cached_blocks does, instead of one cuCtxSynchronize per segment (review finding 13). A sleep waits
// once for all the memory it puts to sleep, cached segments included.
//
// Thread safety: every public method takes one mutex (torch_free only tries it: Note [Frees never wait]);
// sleep and wake hold it for their whole duration, so allocations from other threads wait for them; every
// device wait under it has a deadline (Note [Device waits with a deadline], device_wait.h). Lock order: the GIL
// (released by the bindings around long calls) before this mutex. The torch entry points (torch_entry.cpp) never take
// the GIL.
#pragma once

#include <cuda.h>

#include <atomic>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "allocator_counters.h"
#include "caching_arena.h"
#include "chunk_verifier.h"
#include "copy_engine.h"
#include "device_context.h"
#include "device_wait.h"
#include "graph_pools.h"
#include "host_arena.h"
#include "host_tier.h"
#include "python_gil.h"
#include "release_queue.h"
#include "segment.h"
#include "staging_ring.h"
#include "stats.h"
#include "tag_policy.h"

namespace gpusleep {

enum class TorchMode { kNone, kGlobal, kPool };

// Note [Verified wakes]: kFull proves every restored byte before a wake completes; kOff trusts the copies.
enum class VerifyMode { kFull, kOff };

struct AllocatorOptions {
  size_t chunk_bytes = 0;       // largest physical chunk; 0: $GPUSLEEP_CHUNK_BYTES or 1 GiB
  int copy_streams = 0;         // copy streams per device; 0: $GPUSLEEP_COPY_STREAMS or 4
  size_t copy_piece_bytes = 0;  // largest single copy; 0: 64 MiB
  std::string verify;           // "full" or "off"; empty: $GPUSLEEP_VERIFY or "full"
  double wait_timeout_seconds = 0;  // deadline of a device-wide wait; 0: $GPUSLEEP_WAIT_TIMEOUT_S or 60
  // Host tiers (Note [Host tiers] in host_copy.h): the most pinned host memory level-1 copies may hold (nullopt: no
  // limit); the most pageable copies may hold (nullopt: no limit); the directory of the file tier (empty: none).
  std::optional<size_t> pinned_budget_bytes;
  std::optional<size_t> pageable_budget_bytes;
  std::string file_dir;
  size_t staging_bytes = 0;  // one slot of the staging ring (Note [Staging ring]); 0: 16 MiB
};

class Allocator {
 public:
  explicit Allocator(AllocatorOptions options = {});
  ~Allocator();
  Allocator(const Allocator&) = delete;
  Allocator& operator=(const Allocator&) = delete;

  // Low-level API: one segment per allocation.
  CUdeviceptr allocate(size_t size_bytes, const std::string& tag, int device);
  void free(CUdeviceptr address);

  // PyTorch entry points (global mode: caching arena; pool mode: one segment per call). Throw like
  // allocate(); torch_entry.cpp turns exceptions into nullptr.
  CUdeviceptr torch_malloc(size_t size_bytes, int device, CUstream stream);
  void torch_free(CUdeviceptr address);

  // only_tags: put just these tags to sleep (even a 'keep' tag), leave the others as they are.
  SleepReport sleep(int level, const std::optional<std::vector<std::string>>& offload_tags,
                    const std::optional<std::vector<std::string>>& only_tags = std::nullopt);
  // A copy of the host backup of [address, address + num_bytes) while its segment is offloaded, or awake with a
  // kept host copy (Note [Kept host copies]): the bytes as the last level-1 sleep copied them.
  std::string read_host_backup(CUdeviceptr address, size_t num_bytes);
  // Flips every bit of the byte of the host copy that `address` restores to (asleep, offloaded memory only):
  // damage for `gpusleep doctor` and the tests to prove that a verified wake refuses it (Note [Verified
  // wakes]). Flipping it again repairs it.
  void flip_host_backup_byte(CUdeviceptr address);
  // The chunk hashes (chunk_hash.h, one per 4 MiB piece) of the awake allocation holding `address`, computed on
  // its GPU after the work queued on the device so far: what the next sleep would keep with its host copy.
  // SleepStateError when the hash kernel cannot be loaded there.
  std::vector<uint64_t> device_chunk_hashes(CUdeviceptr address);
  // Synchronous copies into and out of awake memory of this allocator, through pinned staging taken from the
  // host arena (for tools and users without PyTorch: `gpusleep doctor`, tests). The range must lie inside one
  // awake allocation; other streams' work on it is not waited for.
  void write_device(CUdeviceptr address, const std::string& data);
  std::string read_device(CUdeviceptr address, size_t num_bytes);
  WakeReport wake_up(const std::optional<std::vector<std::string>>& tags, bool zero_fill);
  // Drops the sleep-time hashes of the sleeping tags' host copies (all sleeping tags when nullopt): the next wake
  // then only checks that the restore equals the host copy. The way out when WakeVerificationFailed says the host
  // copy itself no longer matches what the sleep hashed and the caller wants it back anyway.
  void trust_host_copies(const std::optional<std::vector<std::string>>& tags);
  // What wake_up(tags) would need, per device, against what is free now: a dry run that changes nothing
  // (for a collective wake's prepare phase, or a scheduler deciding what to evict).
  std::vector<WakePlanRecord> plan_wake(const std::optional<std::vector<std::string>>& tags);

  // host_tier: where the tag's level-1 copies go first (Note [Host tiers] in host_copy.h); "file" needs a file_dir.
  void set_policy(const std::string& tag, TagPolicy policy, bool keep_host_copy = false, bool verify_kept_copy = false,
                  HostTier host_tier = HostTier::kPinned);
  HostTier host_tier(const std::string& tag);
  // The file tier's directory from now on (created 0700 if missing; stale files of killed processes deleted).
  // Copies already in files stay where they are. Empty: no file tier for new copies.
  void set_file_dir(const std::string& directory);
  // The tag's device bytes may have changed: its kept host copies are no longer trusted.
  void mark_changed(const std::string& tag);
  TagPolicy policy(const std::string& tag);
  bool is_sleeping();
  bool is_tag_sleeping(const std::string& tag);
  std::vector<std::string> sleeping_tags();
  std::vector<std::string> known_tags();

  // Grants the peers in use now (Note [Peer access]) access to every mapped segment that lacks it; returns
  // how many segments gained a peer.
  size_t refresh_peer_access();

  HostMemoryReport reserve_host_memory(std::optional<size_t> num_bytes);
  // The host memory sleep(level=1) would have to pin now: what it offloads less what kept copies and the
  // arena's free pinned memory already hold (what reserve_host_memory() with no size would pin).
  size_t host_bytes_to_pin_for_level1();
  size_t release_host_memory();
  size_t empty_cache();
  AllocatorStatsRecord stats();

  // The deadline of every device-wide wait from now on (Note [Device waits with a deadline]).
  void set_wait_timeout(double seconds);
  double wait_timeout() const noexcept { return options_.wait_timeout_seconds; }

  void set_torch_mode(TorchMode mode);
  TorchMode torch_mode();
  void close();

  // ---- Shared CUDA graph pools in global mode (Note [Shared graph pools], defined in graph_pools.cpp) ----
  // Binds the capture now running on `stream` to the graph pool of `handle`: call right after capture_begin.
  // InvalidArgument if the stream is not capturing.
  void begin_graph_pool_capture(CUstream stream, GraphPoolHandle handle);
  void end_graph_pool_capture(CUstream stream);  // the capture on `stream` has ended
  // One graph of the pool is gone (reset or destroyed); returns whether it was the last, which retires the pool.
  // Never waits: while another call holds the lock the release is queued for it and false is returned.
  bool release_graph_pool(GraphPoolHandle handle);
  size_t graph_pool_graphs(GraphPoolHandle handle);  // graphs the pool counts now (0: none)
  // ---- end of shared CUDA graph pools ----

 private:
  struct TagState {
    TagPolicy policy;
    bool keep_host_copy = false;    // Note [Kept host copies]
    bool verify_kept_copy = false;
    HostTier host_tier = HostTier::kPinned;  // Note [Host tiers]
    uint64_t wake_order = 0;                 // when it last woke (0: never); the budget spills the oldest first
    bool asleep = false;
    int level = 0;
    double last_sleep_seconds = 0;
    double last_wake_seconds = 0;
  };
  enum class SleepAction { kNone, kOffload, kDiscard, kDropBackup };
  enum class PeerAccess { kInUse, kAll, kNone };  // GPUSLEEP_PEER_ACCESS unset, 1, 0 (Note [Peer access])

  TagState& tag_state(const std::string& tag);  // creates with the default policy
  // The sleeping tags wake_up(tags) would wake (all sleeping when nullopt); InvalidArgument for unknown ones.
  std::vector<std::string> wake_targets(const std::optional<std::vector<std::string>>& tags, const char* call) const;
  std::vector<Segment*> segments_waking(const std::vector<std::string>& targets) const;  // by device
  size_t free_bytes_on(int device);  // cuMemGetInfo's free bytes, with the device's context current
  std::map<int, size_t> free_bytes_now(const std::vector<int>& devices) noexcept;  // those measurable now
  static std::map<int, size_t> physical_bytes_by_device(const std::vector<Segment*>& segments);
  // Releases the segments' physical memory, per device with its context current and in RELAXED capture
  // mode (the devices must be idle); what is refused, or cannot be tried, goes to refused_. Never throws.
  // Returns the bytes really freed.
  size_t release_physical_of(const std::vector<Segment*>& segments) noexcept;
  const DeviceLayout& device_layout(int device);  // granularity, peers, RDMA; queried once per device
  CopyEngine& copy_engine(int device);
  Segment* create_segment(int device, const std::string& tag, size_t size_bytes, bool pooled);
  size_t destroy_segment(Segment* segment) { return destroy_segments({segment}, /*devices_idle=*/false); }
  // Unmaps and releases the segments and frees their ranges, after one device-wide wait per device touching
  // them (none when the caller has just waited: devices_idle). Throws (CaptureInProgress, a wait's timeout)
  // before changing anything. Returns the bytes of GPU memory really freed (Note [Batched release]).
  size_t destroy_segments(const std::vector<Segment*>& segments, bool devices_idle);
  // One device-wide wait per device, each with the deadline; a device that drained leaves refused_'s wait list.
  void synchronize_devices(const std::vector<int>& devices);
  // The host NUMA node nearest all of `devices`, or -1 if they differ or it is unknown.
  int common_host_numa_node(const std::vector<int>& devices);
  // cuCtxSynchronize on the current context, with the deadline (DeviceWaiter); a refusal because of a capture is a
  // CaptureInProgress, running out of time a CudaError CUDA_ERROR_TIMEOUT naming the device and `why`.
  void synchronize_current(int device, const std::string& why);
  // Throws CaptureInProgress while a capture gpusleep has seen is still running (Note [Captures]).
  void check_no_capture(const std::string& call);
  // Runs `work` with a context current for pinning: the thread's own, else one of a device in use.
  void with_host_context(const std::function<void()>& work);
  void check_open() const;
  void check_tag_awake(const std::string& tag);
  size_t offload_bytes_for_level1();
  std::vector<int> devices_of(const std::vector<Segment*>& segments) const;
  bool keeps_host_copy(const Segment& segment) const;
  // The restored segments' pieces that differ from their host copies (Note [Verified wakes]); throws
  // WakeVerificationError naming them, after filling the report's verification figures.
  void verify_restored(const std::vector<Segment*>& restored, const std::vector<std::string>& targets,
                       WakeReport& report);
  // Sampled pieces of the segment's device bytes equal its kept copy (the device must be idle).
  bool kept_copy_matches(Segment& segment);
  void drop_kept_copy(Segment& segment);
  // devices_of, plus every peer that can access them and is in use: what sleep, free and empty_cache wait for.
  std::vector<int> devices_touching(const std::vector<Segment*>& segments);
  // Whether the device's primary context is active (held here or by anyone else); creates nothing.
  bool context_in_use(int device);
  // The devices a map on `device` grants access: the owner, then the peers PeerAccess selects now.
  std::vector<int> access_devices_now(int device);
  size_t refresh_peer_access_unlocked();
  std::vector<std::string> known_tags_unlocked() const;
  // The awake segment holding [address, address + num_bytes); InvalidArgument / SleepStateError otherwise.
  Segment& awake_segment_holding(CUdeviceptr address, size_t num_bytes, const char* call);
  // Host tiers (Note [Host tiers] in host_copy.h). The tier of a new host copy for each segment of `offload` that
  // has none (had_copy false), within the budgets, least recently woken tags spilled first; HostOutOfMemory
  // when no configured tier can take a segment.
  std::vector<HostTier> place_copies(const std::vector<Segment*>& offload, const std::vector<bool>& had_copy);
  HostCopy new_host_copy(HostTier tier, size_t size_bytes);
  // Gives a pinned copy's extents back to the arena (a pageable or file copy frees itself); empties it.
  void release_host_copy(HostCopy& copy);
  size_t host_copy_bytes_in(HostTier tier) const;  // held now by segments' copies
  StagingRing& staging_ring(int device);  // Note [Staging ring]
  // Copies between a segment's device bytes and its host copy: pinned extents on the copy engine (asynchronous,
  // the caller synchronizes), other tiers through the staging ring (synchronous).
  void copy_out(Segment& segment, HostCopy& copy, size_t offset, size_t num_bytes);
  void copy_in(Segment& segment, const HostCopy& copy, size_t offset, size_t num_bytes);

  // Copies num_bytes between device memory at `address` and `host` through pinned staging, synchronously.
  void staged_copy(Segment& segment, CUdeviceptr address, char* host, size_t num_bytes, bool to_device);

  // The allocator's lock for one public call; drains the queued frees when taken and before it is given back
  // (Note [Frees never wait]).
  // Whether a call that finds the lock taken may give up the GIL while it waits (Note [Waiting without the GIL]).
  enum class GilWhileWaiting { kKeep, kRelease };
  class CallLock {
   public:
    explicit CallLock(Allocator& allocator, GilWhileWaiting gil = GilWhileWaiting::kKeep)
        : allocator_(allocator), lock_(allocator.mutex_, std::try_to_lock) {
      if (!lock_.owns_lock()) {
        if (gil == GilWhileWaiting::kRelease) gil_.release();
        lock_.lock();
        if (gil_.released()) ++allocator_.counters_.gil_released_while_waiting;
      }
      allocator_.drain_queued_frees();
    }
    ~CallLock() { allocator_.drain_queued_frees(); }
    CallLock(const CallLock&) = delete;
    CallLock& operator=(const CallLock&) = delete;

   private:
    Allocator& allocator_;
    GilReleasedWhileWaiting gil_;  // declared before lock_: taken back only after the lock is let go
    std::unique_lock<std::mutex> lock_;
  };
  void torch_free_locked(CUdeviceptr address);
  bool release_graph_pool_locked(GraphPoolHandle handle);  // graph_pools.cpp
  void drain_queued_frees() noexcept;  // with mutex_ held

  // Note [Transitions]
  // Every call that may wait for a device, unmap or release GPU memory (sleep, wake_up, empty_cache, freeing
  // segments) starts the same way once it knows it has work to do: (1) it refuses while a capture gpusleep has seen
  // still runs (Note [Captures]); (2) a sleep or an empty_cache frees the pool-mode segments whose torch_free a
  // capture deferred; (3) it retries what the driver refused to release before (Note [Refused releases]). A wake
  // waits for no device, so it skips (2) and runs in RELAXED capture mode from (1) to its end; destroy_segments,
  // the deferred frees' own path, skips (2) too. TransitionScope is that preamble, written once: its constructor
  // is (1) (and, for a wake, enters RELAXED mode until the scope ends), settle() is (2) and (3); the caller may
  // measure in between (a sleep reads the free memory before anything is released: Note [Measured release]).
  // Queued frees are drained by CallLock around every public call (Note [Frees never wait]). The transactions
  // themselves live in sleep_transaction.cpp and wake_transaction.cpp, this preamble and the device waits in
  // transition_scope.cpp.
  enum class TransitionKind {
    kRelease,  // sleep, empty_cache: (1), (2), (3)
    kFree,     // destroy_segments: (1), (3)
    kMap,      // wake_up: (1), RELAXED mode, (3)
  };
  class TransitionScope {
   public:
    // Throws CaptureInProgress (naming `call`) before anything changed.
    TransitionScope(Allocator& allocator, const std::string& call, TransitionKind kind);
    TransitionScope(const TransitionScope&) = delete;
    TransitionScope& operator=(const TransitionScope&) = delete;

    struct Settled {
      size_t bytes_freed = 0;           // GPU memory the retried releases freed
      size_t bytes_pending_before = 0;  // refused_.bytes_pending() after the deferred frees, before the retry
    };
    Settled settle();

   private:
    Allocator& allocator_;
    TransitionKind kind_;
    std::optional<RelaxedCaptureMode> relaxed_;
  };

  std::mutex mutex_;
  std::mutex queued_frees_mutex_;              // guards the two queues only; never held while taking mutex_
  std::vector<CUdeviceptr> queued_frees_;      // torch_free while mutex_ was busy (Note [Frees never wait])
  std::vector<GraphPoolHandle> queued_pool_releases_;  // release_graph_pool while mutex_ was busy, likewise
  std::atomic<bool> frees_queued_{false};
  std::atomic<uint64_t> frees_queued_total_{0};
  std::atomic<bool> global_torch_mode_{false};  // torch_mode_ == kGlobal, readable before the lock is taken
  DeviceWaits waits_{60.0};                    // deadline set by the constructor (Note [Device waits...])
  AllocatorOptions options_;
  DeviceContexts contexts_;
  std::map<int, DeviceLayout> layouts_;  // per device, queried once
  PeerAccess peer_access_ = PeerAccess::kInUse;
  std::set<int> devices_used_;  // devices this allocator created a segment on
  std::map<int, std::unique_ptr<CopyEngine>> copy_engines_;
  std::map<int, std::unique_ptr<StagingRing>> staging_rings_;  // Note [Staging ring]
  uint64_t wakes_so_far_ = 0;                                  // TagState::wake_order
  std::map<std::string, TagState> tags_;
  std::map<CUdeviceptr, std::unique_ptr<Segment>> segments_;  // by base address
  ReleaseQueue refused_;  // driver objects the driver refused to release (Note [Refused releases])
  std::map<CUstream, int> capturing_streams_;  // streams seen capturing -> device
  std::vector<CUdeviceptr> deferred_frees_;    // pool-mode torch_free refused during a capture
  void free_deferred();                        // retries them; stops at the first still refused
  HostArena host_arena_;
  CachingArena arena_;
  TorchMode torch_mode_ = TorchMode::kNone;
  bool closed_ = false;
  std::optional<SleepReport> last_sleep_;
  std::optional<WakeReport> last_wake_;
  AllocatorCounters counters_;  // Note [Typed counters]
  VerifyMode verify_ = VerifyMode::kFull;
  ChunkVerifier verifier_;  // after everything it refers to (Note [Verified wakes])

  // ---- Shared CUDA graph pools (Note [Shared graph pools]) ----
  GraphPools graph_pools_;
};

// The allocator PyTorch's pluggable entry points route to (nullptr when none).
Allocator* torch_backend() noexcept;
void set_torch_backend(Allocator* allocator);  // throws SleepStateError if another one is installed
void clear_torch_backend(Allocator* allocator) noexcept;
// True once any allocator was installed in global mode: PyTorch then calls our entry points for the rest
// of the process, even after that allocator is closed.
bool global_mode_installed() noexcept;

}  // namespace gpusleep
