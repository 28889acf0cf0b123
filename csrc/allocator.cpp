#include "allocator.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>
#include <stdexcept>

#include "allocator_detail.h"
#include "driver_api.h"
#include "errors.h"
#include "host_memory_budget.h"
#include "stream_capture.h"
#include "thread_tag.h"

namespace gpusleep {
using detail::join_tags;

namespace {

constexpr size_t kDefaultChunkBytes = size_t{1} << 30;      // 1 GiB
constexpr int kDefaultCopyStreams = 4;
constexpr size_t kDefaultCopyPieceBytes = size_t{64} << 20;  // 64 MiB
constexpr size_t kDefaultStagingBytes = size_t{16} << 20;    // one slot of the staging ring (Note [Staging ring])
constexpr double kDefaultWaitTimeoutSeconds = 60;  // Note [Device waits with a deadline]

double env_seconds(const char* name, double fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const double parsed = std::strtod(value, &end);
  if (end == value || *end != '\0' || !(parsed > 0)) {
    throw InvalidArgument(std::string("environment variable ") + name + "='" + value +
                          "' is not a positive number of seconds");
  }
  return parsed;
}

size_t env_size(const char* name, size_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long parsed = std::strtoull(value, &end, 10);
  if (end == value || *end != '\0' || parsed == 0) {
    throw InvalidArgument(std::string("environment variable ") + name + "='" + value + "' is not a positive integer");
  }
  return static_cast<size_t>(parsed);
}

std::atomic<Allocator*> g_torch_backend{nullptr};
std::atomic<bool> g_global_mode_installed{false};  // PyTorch keeps routing to us even after close()

}  // namespace

Allocator* torch_backend() noexcept { return g_torch_backend.load(std::memory_order_acquire); }

bool global_mode_installed() noexcept { return g_global_mode_installed.load(std::memory_order_acquire); }

void set_torch_backend(Allocator* allocator) {
  Allocator* expected = nullptr;
  if (!g_torch_backend.compare_exchange_strong(expected, allocator) && expected != allocator) {
    throw std::runtime_error(
        "another gpusleep.Allocator is already PyTorch's allocator in this process; PyTorch accepts one "
        "pluggable allocator per process, so use that one (or close() it first)");
  }
}

void clear_torch_backend(Allocator* allocator) noexcept {
  Allocator* expected = allocator;
  g_torch_backend.compare_exchange_strong(expected, nullptr);
}

Allocator::Allocator(AllocatorOptions options)
    : options_(options),
      arena_([this](int device, const std::string& tag,
                    size_t size_bytes) { return create_segment(device, tag, size_bytes, /*pooled=*/true); },
             [this](const std::vector<Segment*>& segments) { return destroy_segments(segments, false); }),
      verifier_(
          contexts_, host_arena_, refused_, waits_, [this](int device) -> CopyEngine& { return copy_engine(device); },
          [this](int device) -> const DeviceLayout& { return device_layout(device); }, counters_) {
  if (options_.chunk_bytes == 0) options_.chunk_bytes = env_size("GPUSLEEP_CHUNK_BYTES", kDefaultChunkBytes);
  if (options_.copy_streams <= 0) {
    options_.copy_streams = static_cast<int>(env_size("GPUSLEEP_COPY_STREAMS", kDefaultCopyStreams));
  }
  if (options_.copy_piece_bytes == 0) options_.copy_piece_bytes = kDefaultCopyPieceBytes;
  if (options_.wait_timeout_seconds < 0) throw InvalidArgument("wait_timeout_seconds must be positive");
  if (options_.wait_timeout_seconds == 0) {
    options_.wait_timeout_seconds = env_seconds("GPUSLEEP_WAIT_TIMEOUT_S", kDefaultWaitTimeoutSeconds);
  }
  waits_.set_timeout_seconds(options_.wait_timeout_seconds);
  std::string verify = options_.verify;
  if (verify.empty()) {
    const char* from_env = std::getenv("GPUSLEEP_VERIFY");
    verify = from_env == nullptr || *from_env == '\0' ? "full" : from_env;
  }
  if (verify == "full") {
    verify_ = VerifyMode::kFull;
  } else if (verify == "off") {
    verify_ = VerifyMode::kOff;
  } else {
    throw InvalidArgument("verify='" + verify + "' must be 'full' (prove every restored byte, the default) or 'off'" +
                          (options_.verify.empty() ? " (from the environment variable GPUSLEEP_VERIFY)" : ""));
  }
  options_.verify = verify;
  if (options_.staging_bytes == 0) options_.staging_bytes = kDefaultStagingBytes;
  if (!options_.file_dir.empty()) {  // Note [Host tiers]: the file tier's directory; what killed processes left goes
    prepare_spill_directory(options_.file_dir);
    counters_.stale_host_copy_files_removed += remove_stale_spill_files(options_.file_dir);
  }
  const char* peers = std::getenv("GPUSLEEP_PEER_ACCESS");
  const std::string peers_setting = peers == nullptr ? "" : peers;
  if (peers_setting == "0") {
    peer_access_ = PeerAccess::kNone;
  } else if (peers_setting == "1") {
    peer_access_ = PeerAccess::kAll;
  } else if (!peers_setting.empty()) {
    throw InvalidArgument("environment variable GPUSLEEP_PEER_ACCESS='" + peers_setting +
                          "' must be 0 (no peer "
                          "GPU gets access), 1 (every peer that can) or unset (the peers in use)");
  }
}

Allocator::~Allocator() {
  try {
    close();
  } catch (...) {
    // close() reports failures through note_teardown_failure; nothing may escape a destructor.
  }
}

void Allocator::check_open() const {
  if (closed_) throw SleepStateError("this gpusleep.Allocator was closed; create a new one");
}

Allocator::TagState& Allocator::tag_state(const std::string& tag) {
  if (tag.empty()) throw InvalidArgument("a tag must be a non-empty string");
  auto it = tags_.find(tag);
  if (it == tags_.end()) it = tags_.emplace(tag, TagState{default_tag_policy(tag)}).first;
  return it->second;
}

void Allocator::check_tag_awake(const std::string& tag) {
  auto it = tags_.find(tag);
  if (it != tags_.end() && it->second.asleep) {
    ++counters_.refused_allocations_while_asleep;
    throw SleepStateError("tag '" + tag + "' is asleep (level " + std::to_string(it->second.level) +
                          "): allocations from it are refused until wake_up(tags=['" + tag + "'])");
  }
}

const DeviceLayout& Allocator::device_layout(int device) {
  auto it = layouts_.find(device);
  if (it != layouts_.end()) return it->second;
  DeviceLayout layout;
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  GPUSLEEP_CU_CHECK(cuMemGetAllocationGranularity, "minimum, device " + std::to_string(device),
                    &layout.granularity_bytes, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  // Peers: every other device that can access this one's memory (cuDeviceCanAccessPeer needs no context).
  // Which of them are granted access is decided at each map (Note [Peer access]).
  layout.access_devices.push_back(device);
  const DriverTable& d = driver();
  if (d.cuDeviceCanAccessPeer != nullptr && peer_access_ != PeerAccess::kNone) {
    const int count = contexts_.device_count();
    for (int peer = 0; peer < count; ++peer) {
      int can_access = 0;
      if (peer != device && GPUSLEEP_CU(cuDeviceCanAccessPeer, &can_access, peer, device) == CUDA_SUCCESS &&
          can_access == 1) {
        layout.access_devices.push_back(peer);
      }
    }
  }
  // GPUDirect RDMA with VMM: ask for NIC-registrable memory where the device supports it.
  int rdma = 0;
  if (GPUSLEEP_CU(cuDeviceGetAttribute, &rdma, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED, device) ==
      CUDA_SUCCESS) {
    layout.rdma_capable = rdma == 1;
  }
  // The host NUMA node nearest the device, for placing its backups (134: CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID,
  // spelled as a number because cuda.h before 12.2 lacks the name; older drivers refuse the query).
  int numa_node = -1;
  if (GPUSLEEP_CU(cuDeviceGetAttribute, &numa_node, static_cast<CUdevice_attribute>(134), device) == CUDA_SUCCESS) {
    layout.host_numa_node = numa_node;
  }
  return layouts_.emplace(device, std::move(layout)).first->second;
}

CopyEngine& Allocator::copy_engine(int device) {
  auto it = copy_engines_.find(device);
  if (it == copy_engines_.end()) {
    it = copy_engines_
             .emplace(device,
                      std::make_unique<CopyEngine>(device, options_.copy_streams, options_.copy_piece_bytes, waits_))
             .first;
  }
  return *it->second;
}

Segment* Allocator::create_segment(int device, const std::string& tag, size_t size_bytes, bool pooled) {
  // VMM calls, and the first retain of a device's primary context, must not invalidate a CUDA graph capture in
  // progress on another thread: RELAXED before anything else.
  RelaxedCaptureMode relaxed;
  ScopedDeviceContext context(contexts_, device);
  DeviceLayout layout = device_layout(device);
  layout.access_devices = access_devices_now(device);
  std::unique_ptr<Segment> segment;
  auto out_of_memory = [&](const char* reason) {
    const std::optional<size_t> free_bytes = measured_free_bytes();
    const size_t needed = round_up(size_bytes, layout.granularity_bytes);
    return OutOfMemory("allocating " + format_bytes(size_bytes) + " for tag '" + tag + "' on device " +
                           std::to_string(device) + " needs " + format_bytes(needed) + " of GPU memory but " +
                           (free_bytes ? format_bytes(*free_bytes) : std::string("an unknown amount")) + " is free (" +
                           reason + ")",
                       needed, free_bytes, device);
  };
  try {
    segment = std::make_unique<Segment>(device, tag, size_bytes, layout, options_.chunk_bytes, pooled, refused_);
  } catch (const OutOfMemory& error) {
    throw out_of_memory(error.what());
  } catch (const CudaError& error) {
    // No virtual address range that large (cuMemAddressReserve): the allocation cannot be had either.
    if (error.code() != CUDA_ERROR_OUT_OF_MEMORY) throw;
    throw out_of_memory((std::string("virtual address space exhausted: ") + error.what()).c_str());
  }
  Segment* raw = segment.get();
  counters_.peer_grants_refused += raw->take_peer_grants_refused();
  segments_.emplace(raw->base(), std::move(segment));
  tag_state(tag);
  ++counters_.segments_created;
  // The first allocation on a device: that device is in use now, so memory mapped before on its peers
  // becomes readable by it too (Note [Peer access]).
  if (devices_used_.insert(device).second && segments_.size() > 1) {
    try {
      refresh_peer_access_unlocked();
    } catch (...) {
      ++counters_.peer_grants_refused;  // the allocation itself succeeded; the peers get access at a wake
    }
  }
  return raw;
}

bool Allocator::context_in_use(int device) {
  const std::vector<int> retained = contexts_.retained_devices();
  if (std::find(retained.begin(), retained.end(), device) != retained.end()) return true;
  unsigned int flags = 0;
  int active = 0;
  return GPUSLEEP_CU(cuDevicePrimaryCtxGetState, static_cast<CUdevice>(device), &flags, &active) == CUDA_SUCCESS &&
         active == 1;
}

std::vector<int> Allocator::access_devices_now(int device) {
  const std::vector<int>& candidates = device_layout(device).access_devices;  // the owner first
  std::vector<int> devices = {device};
  for (size_t i = 1; i < candidates.size(); ++i) {
    if (peer_access_ == PeerAccess::kAll || context_in_use(candidates[i])) devices.push_back(candidates[i]);
  }
  return devices;
}

size_t Allocator::refresh_peer_access_unlocked() {
  std::map<int, std::vector<int>> wanted;  // per owning device: one state query per peer, not per segment
  size_t segments_granted = 0;
  RelaxedCaptureMode relaxed;  // adding a peer's access conflicts with no captured work
  for (auto& [base, segment] : segments_) {
    if (!segment->has_physical_memory()) continue;
    auto it = wanted.find(segment->device());
    if (it == wanted.end()) it = wanted.emplace(segment->device(), access_devices_now(segment->device())).first;
    ScopedDeviceContext context(contexts_, segment->device());
    bool granted = false;
    for (size_t i = 1; i < it->second.size(); ++i) granted = segment->grant_access_to(it->second[i]) || granted;
    counters_.peer_grants_refused += segment->take_peer_grants_refused();
    segments_granted += granted ? 1 : 0;
  }
  return segments_granted;
}

size_t Allocator::refresh_peer_access() {
  CallLock lock(*this);
  check_open();
  return refresh_peer_access_unlocked();
}

size_t Allocator::destroy_segments(const std::vector<Segment*>& segments, bool devices_idle) {
  if (segments.empty()) return 0;
  TransitionScope transition(*this, "freeing GPU memory", TransitionKind::kFree);
  size_t freed = transition.settle().bytes_freed;  // earlier refusals freed now count as freed by this call
  // Like cudaFree: no queued work (of the owner or of a peer) may still touch the memory when it is unmapped.
  // A device that has not drained since a failed wake may still read a segment's host copy. One wait per
  // device for the whole batch (Note [Batched release]); it throws before anything changed.
  if (!devices_idle) {
    std::vector<Segment*> waiting;
    for (Segment* segment : segments) {
      if (segment->has_physical_memory() || refused_.awaits_drain(segment->device())) waiting.push_back(segment);
    }
    if (!waiting.empty()) synchronize_devices(devices_touching(waiting));
  }
  for (int device : devices_of(segments)) {
    // Throws (no context now) before this device's segments change: the arena gives one device's segments per
    // call, so a failure leaves them all cached.
    ScopedDeviceContext context(contexts_, device);
    RelaxedCaptureMode relaxed;  // the device is idle: unmapping conflicts with no captured work
    for (Segment* segment : segments) {
      if (segment->device() != device) continue;
      release_host_copy(segment->backup);
      freed += segment->release_all(refused_);  // what the driver refuses is kept in refused_, never forgotten
    }
  }
  for (Segment* segment : segments) {
    ++counters_.segments_destroyed;
    segments_.erase(segment->base());
  }
  return freed;
}

int Allocator::common_host_numa_node(const std::vector<int>& devices) {
  int node = -2;
  for (int device : devices) {
    const int nearest = device_layout(device).host_numa_node;
    if (node == -2) node = nearest;
    if (nearest != node) return -1;  // GPUs on several sockets share one arena: no single good node
  }
  return node == -2 ? -1 : node;
}

void Allocator::set_wait_timeout(double seconds) {
  if (!(seconds > 0)) throw InvalidArgument("wait_timeout_seconds must be a positive number of seconds");
  CallLock lock(*this);
  options_.wait_timeout_seconds = seconds;
  waits_.set_timeout_seconds(seconds);
}

std::vector<int> Allocator::devices_touching(const std::vector<Segment*>& segments) {
  // The owners, and every peer that can access their memory and whose primary context is active, whoever
  // holds it (PyTorch, say): work queued there may still read or write the memory (Note [Peer access]).
  // A peer without an active context runs no work; waiting for it would create a context nobody asked for.
  std::set<int> owners, peers;
  for (const Segment* s : segments) {
    owners.insert(s->device());
    const std::vector<int>& candidates = device_layout(s->device()).access_devices;
    peers.insert(candidates.begin() + 1, candidates.end());
  }
  std::set<int> devices = owners;
  for (int peer : peers) {
    if (owners.count(peer) == 0 && context_in_use(peer)) devices.insert(peer);
  }
  return {devices.begin(), devices.end()};
}

std::vector<int> Allocator::devices_of(const std::vector<Segment*>& segments) const {
  std::set<int> devices;
  for (const Segment* s : segments) devices.insert(s->device());
  return {devices.begin(), devices.end()};
}

CUdeviceptr Allocator::allocate(size_t size_bytes, const std::string& tag, int device) {
  CallLock lock(*this);
  check_open();
  check_tag_awake(tag);
  return create_segment(device, tag, size_bytes, /*pooled=*/false)->base();
}

void Allocator::free(CUdeviceptr address) {
  CallLock lock(*this);
  check_open();
  auto it = segments_.find(address);
  if (it == segments_.end() || it->second->pooled()) {
    char hex[32];
    std::snprintf(hex, sizeof(hex), "0x%llx", static_cast<unsigned long long>(address));
    throw InvalidArgument(std::string("free(") + hex +
                          "): not a live allocation of this gpusleep.Allocator (freed twice, or never allocated "
                          "with allocate())");
  }
  destroy_segment(it->second.get());
}

CUdeviceptr Allocator::torch_malloc(size_t size_bytes, int device, CUstream stream) {
  // Global mode only: pool mode's caller holds PyTorch's device mutex (Note [Waiting without the GIL]).
  CallLock lock(
      *this, global_torch_mode_.load(std::memory_order_acquire) ? GilWhileWaiting::kRelease : GilWhileWaiting::kKeep);
  check_open();
  const std::string& tag = current_thread_tag();
  check_tag_awake(tag);
  if (torch_mode_ == TorchMode::kPool) {
    // PyTorch's caching allocator asks for whole segments, rarely: remember a capturing stream here too.
    if (capture_id_of(stream) != 0) {
      capturing_streams_[stream] = device;
    } else if (!deferred_frees_.empty()) {
      free_deferred();
    }
    return create_segment(device, tag, size_bytes, /*pooled=*/false)->base();
  }
  // PyTorch calls with the device's context current, so the query needs no switch (hot path: one call).
  const uint64_t capture_id = capture_id_of(stream);
  if (capture_id != 0) {
    capturing_streams_[stream] = device;
  } else if (!capturing_streams_.empty()) {
    capturing_streams_.erase(stream);
  }
  // Note [Shared graph pools]: a capture into a shared pool allocates from the pool's blocks.
  const uint64_t graph_pool = capture_id != 0 ? graph_pools_.arena_key(capture_id, stream) : 0;
  return arena_.allocate(size_bytes, device, tag, stream, graph_pool);
}

void Allocator::torch_free(CUdeviceptr address) {
  // Note [Frees never wait]: a busy lock (a sleep, a wake, any call) queues the free for its holder.
  std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock()) {
    std::lock_guard<std::mutex> queue(queued_frees_mutex_);
    queued_frees_.push_back(address);
    frees_queued_.store(true, std::memory_order_release);
    frees_queued_total_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  drain_queued_frees();
  torch_free_locked(address);
  drain_queued_frees();
}

void Allocator::drain_queued_frees() noexcept {
  if (!frees_queued_.load(std::memory_order_acquire)) return;
  std::vector<CUdeviceptr> frees;
  std::vector<GraphPoolHandle> pool_releases;
  {
    std::lock_guard<std::mutex> queue(queued_frees_mutex_);
    frees.swap(queued_frees_);
    pool_releases.swap(queued_pool_releases_);
    frees_queued_.store(false, std::memory_order_release);
  }
  for (CUdeviceptr address : frees) {
    try {
      torch_free_locked(address);
    } catch (...) {
      ++counters_.queued_frees_refused;  // not a live allocation: what a direct torch_free would have reported
    }
  }
  for (const GraphPoolHandle& handle : pool_releases) {  // after the frees: a freed output joins the retired pool
    try {
      release_graph_pool_locked(handle);
    } catch (...) {  // only an allocation failure: the pool stays live, as if its graph still existed
    }
  }
}

void Allocator::torch_free_locked(CUdeviceptr address) {
  if (closed_) return;  // PyTorch may free tensors after close(): their memory is gone already
  if (arena_.free(address)) return;
  auto it = segments_.find(address);
  if (it == segments_.end() || it->second->pooled()) {
    throw InvalidArgument("torch_free: address is not a live allocation of this gpusleep.Allocator");
  }
  try {
    destroy_segment(it->second.get());
  } catch (const CaptureInProgress&) {
    // PyTorch believes the memory freed and will not ask again: free it at the next call that may.
    deferred_frees_.push_back(address);
    ++counters_.frees_deferred_by_capture;
  }
}

size_t Allocator::free_bytes_on(int device) {
  ScopedDeviceContext context(contexts_, device);
  size_t free_bytes = 0, total_bytes = 0;
  GPUSLEEP_CU_CHECK(cuMemGetInfo, "device " + std::to_string(device), &free_bytes, &total_bytes);
  return free_bytes;
}

std::map<int, size_t> Allocator::free_bytes_now(const std::vector<int>& devices) noexcept {
  std::map<int, size_t> out;
  for (int device : devices) {
    try {
      out[device] = free_bytes_on(device);
    } catch (...) {
      // Not measurable now (no context): the device is left out of bytes_freed_measured.
    }
  }
  return out;
}

std::map<int, size_t> Allocator::physical_bytes_by_device(const std::vector<Segment*>& segments) {
  std::map<int, size_t> bytes;
  for (const Segment* s : segments) bytes[s->device()] += s->physical_bytes();
  return bytes;
}

size_t Allocator::release_physical_of(const std::vector<Segment*>& segments) noexcept {
  size_t freed = 0;
  for (int device : devices_of(segments)) {
    CUresult why = CUDA_ERROR_UNKNOWN;
    try {
      ScopedDeviceContext context(contexts_, device);
      // The devices are idle (waited for by the caller): a capture another thread began since cannot use
      // this memory, so unmapping in RELAXED mode neither conflicts with it nor invalidates it
      // (Note [Captures]).
      RelaxedCaptureMode relaxed;
      for (Segment* segment : segments) {
        if (segment->device() == device) freed += segment->release_physical(refused_);
      }
      continue;
    } catch (const CudaError& error) {
      why = error.code();
    } catch (...) {
    }
    // No context on this device now: its memory goes to the queue untried (no refusal), retried later.
    refused_.note_not_tried(why);
    for (Segment* segment : segments) {
      if (segment->device() == device && segment->has_physical_memory()) segment->give_up_physical(refused_);
    }
  }
  return freed;
}

void Allocator::set_policy(const std::string& tag, TagPolicy policy, bool keep_host_copy, bool verify_kept_copy,
                           HostTier host_tier) {
  CallLock lock(*this);
  check_open();
  if ((keep_host_copy || verify_kept_copy) && policy != TagPolicy::kOffload) {
    throw InvalidArgument("keep_host_copy and verify_kept_copy apply to the 'offload' policy only (tag '" + tag + "')");
  }
  if (host_tier == HostTier::kFile && options_.file_dir.empty()) {
    throw InvalidArgument("host_tier='file' for tag '" + tag +
                          "' needs a directory: create the Allocator with "
                          "file_dir=... (a local disk with room for the tag's bytes)");
  }
  TagState& state = tag_state(tag);
  state.host_tier = host_tier;  // new copies only: a kept copy stays in its tier until it is dropped
  state.policy = policy;
  state.keep_host_copy = keep_host_copy;
  state.verify_kept_copy = verify_kept_copy;
  if (!keep_host_copy) {
    for (auto& [base, segment] : segments_) {
      if (segment->tag() == tag && segment->state == SegmentState::kMapped) drop_kept_copy(*segment);
    }
  }
}

std::string Allocator::read_host_backup(CUdeviceptr address, size_t num_bytes) {
  CallLock lock(*this);
  check_open();
  auto it = segments_.upper_bound(address);
  Segment* segment = it == segments_.begin() ? nullptr : std::prev(it)->second.get();
  if (segment == nullptr || !segment->contains(address)) {
    throw InvalidArgument("read_host_backup: the address is not inside memory of this gpusleep.Allocator");
  }
  const size_t offset = address - segment->base();
  const bool kept = segment->state == SegmentState::kMapped && keeps_host_copy(*segment);
  if ((segment->state != SegmentState::kOffloaded && !kept) || segment->backup.empty()) {
    throw SleepStateError("read_host_backup: the memory of tag '" + segment->tag() +
                          "' at that address has no host "
                          "copy now (it is awake without a kept host copy, or was discarded rather than offloaded)");
  }
  if (num_bytes > segment->user_bytes() || offset > segment->user_bytes() - num_bytes) {
    throw InvalidArgument("read_host_backup: " + format_bytes(num_bytes) + " at offset " + std::to_string(offset) +
                          " runs past the " + format_bytes(segment->user_bytes()) + " the host copy holds");
  }
  std::string out(num_bytes, '\0');
  segment->backup.read(offset, out.data(), num_bytes);
  return out;
}

std::vector<uint64_t> Allocator::device_chunk_hashes(CUdeviceptr address) {
  CallLock lock(*this);
  check_open();
  Segment& segment = awake_segment_holding(address, 0, "device_chunk_hashes");
  if (!verifier_.kernel_on(segment.device())) {
    throw SleepStateError("device_chunk_hashes: " + verifier_.fallback_reason());
  }
  {
    ScopedDeviceContext context(contexts_, segment.device());
    synchronize_current(segment.device(), "device_chunk_hashes()");  // a snapshot after the work queued so far
  }
  std::vector<std::vector<uint64_t>> hashes = verifier_.device_hashes({&segment});
  if (hashes.front().empty() && segment.user_bytes() > 0) {
    throw OutOfMemory(
        "device_chunk_hashes: no GPU memory free for the hash sums on device " + std::to_string(segment.device()),
        device_layout(segment.device()).granularity_bytes, std::nullopt, segment.device());
  }
  return hashes.front();
}

void Allocator::flip_host_backup_byte(CUdeviceptr address) {
  CallLock lock(*this);
  check_open();
  auto it = segments_.upper_bound(address);
  Segment* segment = it == segments_.begin() ? nullptr : std::prev(it)->second.get();
  if (segment == nullptr || !segment->contains(address) || address - segment->base() >= segment->user_bytes()) {
    throw InvalidArgument("flip_host_backup_byte: the address is not inside memory of this gpusleep.Allocator");
  }
  if (segment->state != SegmentState::kOffloaded || segment->backup.empty()) {
    throw SleepStateError("flip_host_backup_byte: the memory at that address has no host copy while asleep");
  }
  char byte = 0;
  segment->backup.read(address - segment->base(), &byte, 1);
  byte = static_cast<char>(byte ^ 0xFF);
  segment->backup.write(address - segment->base(), &byte, 1);
}

Segment& Allocator::awake_segment_holding(CUdeviceptr address, size_t num_bytes, const char* call) {
  auto it = segments_.upper_bound(address);
  Segment* segment = it == segments_.begin() ? nullptr : std::prev(it)->second.get();
  if (segment == nullptr || !segment->contains(address)) {
    throw InvalidArgument(std::string(call) + ": the address is not inside memory of this gpusleep.Allocator");
  }
  const size_t offset = address - segment->base();
  if (num_bytes > segment->physical_bytes() || offset > segment->physical_bytes() - num_bytes) {
    throw InvalidArgument(std::string(call) + ": " + format_bytes(num_bytes) + " at offset " + std::to_string(offset) +
                          " runs past the " + format_bytes(segment->physical_bytes()) + " allocation");
  }
  if (segment->state != SegmentState::kMapped) {
    throw SleepStateError(std::string(call) + ": the memory of tag '" + segment->tag() +
                          "' at that address is asleep; wake it up first");
  }
  return *segment;
}

void Allocator::staged_copy(Segment& segment, CUdeviceptr address, char* host, size_t num_bytes, bool to_device) {
  if (num_bytes == 0) return;
  check_no_capture(to_device ? "write_device()" : "read_device()");
  RelaxedCaptureMode relaxed;  // staging may pin host memory, which is unsafe during other threads' captures
  ScopedDeviceContext context(contexts_, segment.device());
  if (num_bytes > host_arena_.bytes_free()) {
    check_host_memory_for_pinning(num_bytes - host_arena_.bytes_free(), to_device ? "write_device()" : "read_device()");
  }
  CopyEngine& engine = copy_engine(segment.device());
  const HostExtents staging = host_arena_.allocate(num_bytes);
  if (to_device) {
    size_t done = 0;
    for (const HostExtent& e : staging) std::memcpy(e.data, host + done, e.size_bytes), done += e.size_bytes;
    if (segment.backup_valid) drop_kept_copy(segment);  // the device bytes change: the kept copy is stale
  }
  try {
    to_device ? engine.host_to_device(address, staging) : engine.device_to_host(address, staging);
    engine.synchronize();
  } catch (...) {
    // Copies that may still run keep their staging: it is never handed out again (quarantined).
    if (engine.synchronize_noexcept()) host_arena_.release(staging);
    throw;
  }
  if (!to_device) {
    size_t done = 0;
    for (const HostExtent& e : staging) std::memcpy(host + done, e.data, e.size_bytes), done += e.size_bytes;
  }
  host_arena_.release(staging);
}

void Allocator::write_device(CUdeviceptr address, const std::string& data) {
  CallLock lock(*this);
  check_open();
  Segment& segment = awake_segment_holding(address, data.size(), "write_device");
  std::string copy = data;
  staged_copy(segment, address, copy.data(), copy.size(), /*to_device=*/true);
}

std::string Allocator::read_device(CUdeviceptr address, size_t num_bytes) {
  CallLock lock(*this);
  check_open();
  Segment& segment = awake_segment_holding(address, num_bytes, "read_device");
  std::string out(num_bytes, '\0');
  staged_copy(segment, address, out.data(), num_bytes, /*to_device=*/false);
  return out;
}

void Allocator::mark_changed(const std::string& tag) {
  CallLock lock(*this);
  check_open();
  if (tags_.find(tag) == tags_.end()) {
    throw InvalidArgument("mark_changed: unknown tag '" + tag + "'; known tags are " +
                          join_tags(known_tags_unlocked()));
  }
  for (auto& [base, segment] : segments_) {
    if (segment->tag() == tag) segment->backup_valid = false;
  }
}

bool Allocator::keeps_host_copy(const Segment& segment) const {
  auto it = tags_.find(segment.tag());
  return it != tags_.end() && it->second.keep_host_copy;
}

void Allocator::drop_kept_copy(Segment& segment) {
  release_host_copy(segment.backup);
  segment.backup_valid = false;
  segment.backup_hashes.clear();
}

void Allocator::set_file_dir(const std::string& directory) {
  CallLock lock(*this);
  check_open();
  if (!directory.empty()) {
    prepare_spill_directory(directory);
    counters_.stale_host_copy_files_removed += remove_stale_spill_files(directory);
  } else {
    for (const auto& [name, state] : tags_) {
      if (state.host_tier == HostTier::kFile) {
        throw InvalidArgument("set_file_dir(''): tag '" + name + "' still has host_tier='file'");
      }
    }
  }
  options_.file_dir = directory;
}

HostTier Allocator::host_tier(const std::string& tag) {
  CallLock lock(*this);
  return tag_state(tag).host_tier;
}

HostCopy Allocator::new_host_copy(HostTier tier, size_t size_bytes) {
  switch (tier) {
    case HostTier::kPageable: return HostCopy::pageable(size_bytes);
    case HostTier::kFile: return HostCopy::file(options_.file_dir, size_bytes);
    case HostTier::kPinned: break;
  }
  return HostCopy::pinned(host_arena_.allocate(size_bytes));
}

void Allocator::release_host_copy(HostCopy& copy) {
  if (copy.tier() == HostTier::kPinned) {
    const HostExtents extents = copy.take_extents();
    if (!extents.empty()) host_arena_.release(extents);
  }
  copy = HostCopy();  // a pageable buffer is unmapped, a file closed (it was unlinked when created)
}

size_t Allocator::host_copy_bytes_in(HostTier tier) const {
  size_t total = 0;
  for (const auto& [base, segment] : segments_) {
    if (!segment->backup.empty() && segment->backup.tier() == tier) total += segment->backup.size_bytes();
  }
  return total;
}

StagingRing& Allocator::staging_ring(int device) {
  auto it = staging_rings_.find(device);
  if (it == staging_rings_.end()) {
    it = staging_rings_.emplace(device, std::make_unique<StagingRing>(device, options_.staging_bytes, waits_)).first;
  }
  return *it->second;
}

void Allocator::copy_out(Segment& segment, HostCopy& copy, size_t offset, size_t num_bytes) {
  if (copy.staged()) {
    staging_ring(segment.device()).device_to_host(segment.base() + offset, copy, offset, num_bytes);
    counters_.bytes_staged_out += num_bytes;
  } else {
    copy_engine(segment.device())
        .device_to_host(segment.base() + offset, slice_extents(copy.extents(), offset, num_bytes));
  }
}

void Allocator::copy_in(Segment& segment, const HostCopy& copy, size_t offset, size_t num_bytes) {
  if (copy.staged()) {
    staging_ring(segment.device()).host_to_device(segment.base() + offset, copy, offset, num_bytes);
    counters_.bytes_staged_in += num_bytes;
  } else {
    copy_engine(segment.device())
        .host_to_device(segment.base() + offset, slice_extents(copy.extents(), offset, num_bytes));
  }
}

TagPolicy Allocator::policy(const std::string& tag) {
  CallLock lock(*this);
  auto it = tags_.find(tag);
  return it == tags_.end() ? default_tag_policy(tag) : it->second.policy;
}

bool Allocator::is_sleeping() {
  CallLock lock(*this);
  for (const auto& [name, state] : tags_) {
    if (state.asleep) return true;
  }
  return false;
}

bool Allocator::is_tag_sleeping(const std::string& tag) {
  CallLock lock(*this);
  auto it = tags_.find(tag);
  return it != tags_.end() && it->second.asleep;
}

std::vector<std::string> Allocator::sleeping_tags() {
  CallLock lock(*this);
  std::vector<std::string> out;
  for (const auto& [name, state] : tags_) {
    if (state.asleep) out.push_back(name);
  }
  return out;
}

std::vector<std::string> Allocator::known_tags_unlocked() const {
  std::vector<std::string> out;
  for (const auto& [name, state] : tags_) out.push_back(name);
  return out;
}

std::vector<std::string> Allocator::known_tags() {
  CallLock lock(*this);
  return known_tags_unlocked();
}

size_t Allocator::offload_bytes_for_level1() {
  // A segment that keeps a host copy (valid or stale) needs no new host memory: a valid copy is reused and
  // a stale one's extents are the destination of the new copy.
  size_t total = 0;
  for (const auto& [base, segment] : segments_) {
    auto it = tags_.find(segment->tag());
    if (segment->state == SegmentState::kMapped && segment->backup.empty() && it != tags_.end() &&
        it->second.policy == TagPolicy::kOffload && it->second.host_tier == HostTier::kPinned) {
      total += host_extent_bytes(segment->user_bytes());  // whole 4 KiB pages (host_arena.h)
    }
  }
  return total;
}

void Allocator::with_host_context(const std::function<void()>& work) {
  // Pinned memory is portable: any context will do. Use one this allocator already holds (it stays alive
  // as long as the allocator), else the thread's current one; never retain a context on a GPU nobody
  // asked for (docs/invariants.md, invariant 8). Pinning and unpinning (like cudaHostAlloc) are "unsafe" during
  // another thread's GLOBAL capture: RELAXED, as PyTorch does around cudaHostAlloc (Note [Captures]).
  RelaxedCaptureMode relaxed;
  std::optional<int> device;
  if (!segments_.empty()) device = segments_.begin()->second->device();
  if (!device) {
    const std::vector<int> retained = contexts_.retained_devices();
    if (!retained.empty()) device = retained.front();
  }
  if (device) {
    ScopedDeviceContext context(contexts_, *device);
    work();
    return;
  }
  // The thread's current context: hold its device's primary context, so that the pinned memory (which
  // belongs to a context) cannot be freed behind the allocator's back by a reset elsewhere.
  CUdevice current_device = 0;
  if (GPUSLEEP_CU(cuCtxGetDevice, &current_device) == CUDA_SUCCESS) {
    ScopedDeviceContext context(contexts_, static_cast<int>(current_device));
    work();
    return;
  }
  throw SleepStateError(
      "pinning or unpinning host memory needs a CUDA context, and this thread has none and the allocator has "
      "not used any GPU yet: allocate first, or make a device current (torch.cuda.init() or "
      "torch.cuda.set_device(n))");
}

HostMemoryReport Allocator::reserve_host_memory(std::optional<size_t> num_bytes) {
  CallLock lock(*this);
  check_open();
  const size_t wanted = num_bytes ? *num_bytes : offload_bytes_for_level1();
  const double pinned_before = host_arena_.pin_seconds_total();
  HostMemoryReport report;
  if (wanted > host_arena_.bytes_free()) {
    check_no_capture("reserve_host_memory()");
    check_host_memory_for_pinning(wanted - host_arena_.bytes_free(), "reserve_host_memory()");
    std::set<int> devices;
    for (const auto& [base, segment] : segments_) devices.insert(segment->device());
    host_arena_.set_numa_node(common_host_numa_node({devices.begin(), devices.end()}));
    with_host_context([&] { report.bytes_newly_pinned = host_arena_.reserve_free(wanted); });
  }
  if (verify_ == VerifyMode::kFull && !num_bytes) {
    // The sleep's chunk hashes come back through a small pinned buffer per device: pin it now too.
    std::map<int, size_t> pieces;
    for (const auto& [base, segment] : segments_) {
      if (segment->state != SegmentState::kMapped) continue;
      pieces[segment->device()] +=
          (segment->user_bytes() + ChunkVerifier::kPieceBytes - 1) / ChunkVerifier::kPieceBytes;
    }
    for (const auto& [device, count] : pieces) verifier_.reserve_host_sums(device, count);
  }
  report.pin_seconds = host_arena_.pin_seconds_total() - pinned_before;
  report.bytes_pinned = host_arena_.bytes_pinned();
  report.bytes_in_use = host_arena_.bytes_in_use();
  report.numa_node = host_arena_.placed_numa_node();
  return report;
}

size_t Allocator::host_bytes_to_pin_for_level1() {
  CallLock lock(*this);
  check_open();
  const size_t wanted = offload_bytes_for_level1();
  return wanted > host_arena_.bytes_free() ? wanted - host_arena_.bytes_free() : 0;
}

size_t Allocator::release_host_memory() {
  CallLock lock(*this);
  check_open();
  for (auto& [base, segment] : segments_) {
    if (segment->state == SegmentState::kMapped) drop_kept_copy(*segment);  // kept copies are a cache
  }
  if (host_arena_.bytes_pinned() == host_arena_.bytes_in_use()) return 0;  // nothing unused to unpin
  check_no_capture("release_host_memory()");
  size_t released = 0;
  with_host_context([&] { released = host_arena_.release_unused(); });
  return released;
}

size_t Allocator::empty_cache() {
  CallLock lock(*this);
  check_open();
  TransitionScope transition(*this, "empty_cache()", TransitionKind::kRelease);
  // The bytes of the cached segments given back: GPU memory that earlier calls' refusals held and that the
  // retries free now is not counted (it is the drop in bytes_release_pending), only what this call released.
  const TransitionScope::Settled settled = transition.settle();
  const size_t pending_before = settled.bytes_pending_before;
  size_t released = settled.bytes_freed;
  released += arena_.release_cached();
  const size_t pending_after = refused_.bytes_pending();
  const size_t retried = pending_before > pending_after ? pending_before - pending_after : 0;
  return released - std::min(released, retried);
}

AllocatorStatsRecord Allocator::stats() {
  CallLock lock(*this);
  AllocatorStatsRecord out;
  std::map<std::string, TagStatsRecord> by_tag;
  for (const auto& [name, state] : tags_) {
    TagStatsRecord& record = by_tag[name];
    record.tag = name;
    record.policy = tag_policy_name(state.policy);
    record.host_tier = host_tier_name(state.host_tier);
    record.is_sleeping = state.asleep;
    record.last_sleep_seconds = state.last_sleep_seconds;
    record.last_wake_seconds = state.last_wake_seconds;
    record.allocations = arena_.live_blocks(name);
    out.is_sleeping = out.is_sleeping || state.asleep;
  }
  for (const auto& [base, segment] : segments_) {
    TagStatsRecord& record = by_tag[segment->tag()];
    if (!segment->pooled()) ++record.allocations;
    record.bytes_reserved += segment->reserved_bytes();
    if (segment->state == SegmentState::kMapped) {
      record.bytes_mapped += segment->physical_bytes();
    } else {
      record.bytes_asleep += segment->physical_bytes();
    }
    record.bytes_backed_up += segment->backup.size_bytes();
    const HostTier tier = segment->backup.tier();
    (tier == HostTier::kPinned     ? record.bytes_pinned
     : tier == HostTier::kPageable ? record.bytes_pageable
                                   : record.bytes_file) += segment->backup.size_bytes();
  }
  for (auto& [name, record] : by_tag) out.tags.push_back(std::move(record));
  out.host.bytes_pinned = host_arena_.bytes_pinned();
  out.host.bytes_in_use = host_arena_.bytes_in_use();
  out.host.pin_seconds = host_arena_.pin_seconds_total();
  out.host.numa_node = host_arena_.placed_numa_node();
  out.host.bytes_pageable = host_copy_bytes_in(HostTier::kPageable);
  out.host.bytes_file = host_copy_bytes_in(HostTier::kFile);
  for (const auto& [device, ring] : staging_rings_) out.host.bytes_staging += ring->bytes_pinned();
  out.host.pinned_budget_bytes = options_.pinned_budget_bytes;
  out.host.pageable_budget_bytes = options_.pageable_budget_bytes;
  out.host.file_dir = options_.file_dir;
  out.bytes_cached = arena_.bytes_cached_mapped();
  out.has_sleep = last_sleep_.has_value();
  if (last_sleep_) out.last_sleep = *last_sleep_;
  out.has_wake = last_wake_.has_value();
  if (last_wake_) out.last_wake = *last_wake_;
  AllocatorReadings readings;  // Note [Typed counters]: read from their owners now
  readings.frees_queued_during_transition = frees_queued_total_.load(std::memory_order_relaxed);
  readings.arena_hits = arena_.hits();
  readings.arena_misses = arena_.misses();
  readings.arena_pools = arena_.pools();
  readings.segments_live = segments_.size();
  for (const auto& [device, ring] : staging_rings_) readings.staging_slots_quarantined += ring->slots_quarantined();
  readings.teardown_failures = teardown_failure_count();
  readings.device_wait_timeouts = waits_.timeouts();
  readings.release_refused = refused_.refusals() + contexts_.release_refusals();
  out.counters = named_counters(counters_, readings);
  out.bytes_release_pending = refused_.bytes_pending();
  out.objects_release_pending = refused_.objects_pending() + contexts_.releases_pending();
  if (closed_) {  // what close() could not release yet: a later close() retries it
    out.objects_release_pending += segments_.size() + host_arena_.buffers_held();
    for (const auto& [device, engine] : copy_engines_) out.objects_release_pending += engine->streams_held();
    out.objects_release_pending += verifier_.objects_held();
  }
  out.verify = options_.verify;
  out.verify_fallback_reason = verifier_.fallback_reason();
  return out;
}

void Allocator::set_torch_mode(TorchMode mode) {
  CallLock lock(*this);
  check_open();
  if (torch_mode_ != TorchMode::kNone && torch_mode_ != mode) {
    throw std::runtime_error(
        "this gpusleep.Allocator is already plugged into PyTorch in another mode; global and "
        "pool mode cannot be mixed in one allocator");
  }
  set_torch_backend(this);
  torch_mode_ = mode;
  global_torch_mode_.store(mode == TorchMode::kGlobal, std::memory_order_release);
  if (mode == TorchMode::kGlobal) g_global_mode_installed.store(true, std::memory_order_release);
}

TorchMode Allocator::torch_mode() {
  CallLock lock(*this);
  return torch_mode_;
}

void Allocator::close() {
  CallLock lock(*this);
  if (!closed_) {
    closed_ = true;
    clear_torch_backend(this);
    arena_.forget_all();
  }
  // Idempotent: releases whatever is still held. What cannot be released now (a context switch fails,
  // the driver refuses) stays owned, so that calling close() again retries it: nothing is forgotten.
  std::set<int> devices;
  for (const auto& [base, segment] : segments_) devices.insert(segment->device());
  for (const auto& [device, engine] : copy_engines_) devices.insert(device);
  for (const auto& [device, ring] : staging_rings_) devices.insert(device);
  for (int device : verifier_.devices()) devices.insert(device);
  for (int device : devices) {
    try {
      ScopedDeviceContext context(contexts_, device);
      CUcontext current = nullptr;
      CUresult result = GPUSLEEP_CU(cuCtxGetCurrent, &current);
      if (result == CUDA_SUCCESS &&
          waits_.synchronize_context(device, current, &result) == DeviceWaiter::Outcome::kTimedOut) {
        result = CUDA_ERROR_TIMEOUT;  // Note [Device waits with a deadline]: close() does not hang either
      }
      if (result == CUDA_SUCCESS) {
        refused_.drained(device);
      } else {
        note_teardown_failure("cuCtxSynchronize", result);
      }
      for (auto it = segments_.begin(); it != segments_.end();) {
        if (it->second->device() != device) {
          ++it;
          continue;
        }
        it->second->backup = HostCopy();  // pinned extents: release_all() below; the other tiers free themselves
        it->second->release_all(refused_);
        it = segments_.erase(it);
      }
      auto engine = copy_engines_.find(device);
      if (engine != copy_engines_.end() && engine->second->try_release_streams()) copy_engines_.erase(engine);
      staging_rings_.erase(device);
      verifier_.release(device);
    } catch (...) {
      // No context on this device now: its segments and streams stay, for the next close() to retry.
    }
  }
  if (host_arena_.bytes_pinned() > 0) {
    try {
      with_host_context([&] { host_arena_.release_all(); });
    } catch (...) {
      // No context to unpin with: the buffers stay pinned and owned, for the next close() to retry.
    }
  }
  refused_.retry(contexts_, waits_);
  if (segments_.empty() && copy_engines_.empty() && verifier_.objects_held() == 0 && host_arena_.buffers_held() == 0 &&
      refused_.empty()) {
    // Nothing left on any device: give the primary contexts back too. One whose release the driver refuses
    // stays retained and reported (objects_release_pending), and the next close() retries it.
    contexts_.release_all();
  }
}

}  // namespace gpusleep
