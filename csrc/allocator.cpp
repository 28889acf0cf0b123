#include "allocator.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>
#include <stdexcept>

#include "driver_api.h"
#include "errors.h"
#include "host_memory_budget.h"
#include "stream_capture.h"
#include "thread_tag.h"

namespace gpusleep {
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

std::string format_seconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", seconds);
  return text;
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

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

std::string join_tags(const std::vector<std::string>& tags) {
  std::string out = "[";
  for (size_t i = 0; i < tags.size(); ++i) out += (i ? ", '" : "'") + tags[i] + "'";
  return out + "]";
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
          contexts_, host_arena_, refused_, [this](int device) -> CopyEngine& { return copy_engine(device); },
          [this](int device) -> const DeviceLayout& { return device_layout(device); },
          /*chunk_bytes=*/0, counters_) {
  if (options_.chunk_bytes == 0) options_.chunk_bytes = env_size("GPUSLEEP_CHUNK_BYTES", kDefaultChunkBytes);
  if (options_.copy_streams <= 0) {
    options_.copy_streams = static_cast<int>(env_size("GPUSLEEP_COPY_STREAMS", kDefaultCopyStreams));
  }
  if (options_.copy_piece_bytes == 0) options_.copy_piece_bytes = kDefaultCopyPieceBytes;
  if (options_.wait_timeout_seconds < 0) throw InvalidArgument("wait_timeout_seconds must be positive");
  if (options_.wait_timeout_seconds == 0) {
    options_.wait_timeout_seconds = env_seconds("GPUSLEEP_WAIT_TIMEOUT_S", kDefaultWaitTimeoutSeconds);
  }
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
    counters_["stale_host_copy_files_removed"] += remove_stale_spill_files(options_.file_dir);
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
    ++counters_["refused_allocations_while_asleep"];
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
             .emplace(device, std::make_unique<CopyEngine>(device, options_.copy_streams, options_.copy_piece_bytes))
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
  counters_["peer_grants_refused"] += raw->take_peer_grants_refused();
  segments_.emplace(raw->base(), std::move(segment));
  tag_state(tag);
  ++counters_["segments_created"];
  // The first allocation on a device: that device is in use now, so memory mapped before on its peers
  // becomes readable by it too (Note [Peer access]).
  if (devices_used_.insert(device).second && segments_.size() > 1) {
    try {
      refresh_peer_access_unlocked();
    } catch (...) {
      ++counters_["peer_grants_refused"];  // the allocation itself succeeded; the peers get access at a wake
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
    counters_["peer_grants_refused"] += segment->take_peer_grants_refused();
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
  check_no_capture("freeing GPU memory");
  size_t freed = refused_.retry(contexts_);  // earlier refusals freed now count as freed by this call
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
    ++counters_["segments_destroyed"];
    segments_.erase(segment->base());
  }
  return freed;
}

void Allocator::synchronize_current(int device, const std::string& why) {
  CUcontext context = nullptr;
  GPUSLEEP_CU_CHECK(cuCtxGetCurrent, "device " + std::to_string(device), &context);
  CUresult result = CUDA_SUCCESS;
  if (waiters_[device].synchronize(context, options_.wait_timeout_seconds, &result) ==
      DeviceWaiter::Outcome::kTimedOut) {
    ++counters_["device_wait_timeouts"];
    throw CudaError(
        "gpusleep waited " + format_seconds(options_.wait_timeout_seconds) +
            " s for the work queued on "
            "device " +
            std::to_string(device) + " to finish (" + why +
            ": cuCtxSynchronize) and it has not. "
            "Nothing was changed. Work that never finishes is the usual cause: a collective waiting for a "
            "peer that died, or a persistent kernel. Finish or abort that work and call again, or raise the "
            "deadline (Allocator(wait_timeout_seconds=...), GPUSLEEP_WAIT_TIMEOUT_S).",
        CUDA_ERROR_TIMEOUT, cu_error_name(CUDA_ERROR_TIMEOUT));
  }
  if (result == CUDA_SUCCESS) return;
  if (result == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED || result == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED ||
      result == CUDA_ERROR_STREAM_CAPTURE_IMPLICIT) {
    throw CaptureInProgress("a CUDA graph capture is in progress on device " + std::to_string(device) +
                            ": gpusleep must wait for the "
                            "device (" +
                            why + "), which the driver refuses during a capture (" + cu_error_name(result) +
                            "). Call again once the capture has ended.");
  }
  throw_driver_error("cuCtxSynchronize", "device " + std::to_string(device) + ", " + why, result, __FILE__, __LINE__);
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

void Allocator::synchronize_devices(const std::vector<int>& devices) {
  for (int device : devices) {
    ScopedDeviceContext context(contexts_, device);
    synchronize_current(device, "waiting for the work using the memory");
    refused_.drained(device);  // every stream of the device finished, the copy streams of a failed wake too
  }
}

void Allocator::set_wait_timeout(double seconds) {
  if (!(seconds > 0)) throw InvalidArgument("wait_timeout_seconds must be a positive number of seconds");
  CallLock lock(*this);
  options_.wait_timeout_seconds = seconds;
}

void Allocator::check_no_capture(const std::string& call) {
  // Captures gpusleep has seen (global mode: a malloc on a capturing stream). Queries are allowed during
  // a capture; a stream whose capture has ended is forgotten.
  for (auto it = capturing_streams_.begin(); it != capturing_streams_.end();) {
    uint64_t id = 0;
    try {
      ScopedDeviceContext context(contexts_, it->second);
      id = capture_id_of(it->first);
    } catch (...) {
    }
    if (id == 0) {
      it = capturing_streams_.erase(it);
      continue;
    }
    throw CaptureInProgress("a CUDA graph capture is in progress on device " + std::to_string(it->second) + ": " +
                            call +
                            " would have to synchronize, unmap or release GPU memory, which "
                            "would invalidate the capture. Call again once the capture has ended.");
  }
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
  CallLock lock(*this);
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
  {
    std::lock_guard<std::mutex> queue(queued_frees_mutex_);
    frees.swap(queued_frees_);
    frees_queued_.store(false, std::memory_order_release);
  }
  for (CUdeviceptr address : frees) {
    try {
      torch_free_locked(address);
    } catch (...) {
      ++counters_["queued_frees_refused"];  // not a live allocation: what a direct torch_free would have reported
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
    ++counters_["frees_deferred_by_capture"];
  }
}

void Allocator::free_deferred() {
  for (auto it = deferred_frees_.begin(); it != deferred_frees_.end();) {
    auto segment = segments_.find(*it);
    if (segment == segments_.end()) {
      it = deferred_frees_.erase(it);
      continue;
    }
    try {
      destroy_segment(segment->second.get());
      it = deferred_frees_.erase(it);
    } catch (...) {
      return;  // the capture still runs (or the device refuses): try again at the next call
    }
  }
}

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
    ++counters_["sleeps"];
    last_sleep_ = report;
    return report;
  }
  check_no_capture("sleep()");
  std::vector<Segment*> sleeping_now;
  for (const auto& [base, segment] : segments_) {
    if (goes_to_sleep(*segment)) sleeping_now.push_back(segment.get());
  }
  // The devices are taken now: release_cached below destroys the cached segments among sleeping_now.
  const std::vector<int> sleeping_devices = devices_of(sleeping_now);
  const std::map<int, size_t> free_before = free_bytes_now(sleeping_devices);  // Note [Measured release]
  free_deferred();
  report.bytes_freed += refused_.retry(contexts_);  // what earlier refusals held, freed now
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
      ++counters_["kept_copy_mismatches"];
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
      new_bytes += had_copy[i] || tiers[i] != HostTier::kPinned ? 0 : offload[i]->user_bytes();
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
    if (!drained) ++counters_["host_extents_quarantined"];
    ++counters_["failed_sleeps"];
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
      ++counters_["host_extents_quarantined"];  // a failed wake's queued restore may still read it
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
  ++counters_["sleeps"];
  last_sleep_ = report;
  return report;
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
  check_no_capture("wake_up()");
  // Creating, mapping and granting memory and pinning are "unsafe" calls in the default GLOBAL mode: made while
  // another thread captures a graph, they would fail and invalidate that capture. Nothing here synchronizes
  // a device, so RELAXED is safe for the whole wake (Note [Captures]).
  RelaxedCaptureMode relaxed;
  refused_.retry(contexts_);

  std::vector<Segment*> waking = segments_waking(targets);
  for (const Segment* segment : waking) {
    if (refused_.mapping_overlaps(segment->base(), segment->reserved_bytes())) {
      ++counters_["failed_wakes"];
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
    ++counters_["failed_wakes"];
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
        ++counters_["cache_released_for_wake"];
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
      counters_["peer_grants_refused"] += segment->take_peer_grants_refused();
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
    ++counters_["failed_wakes"];
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
  ++counters_["wakes"];
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
    ++counters_["verified_wakes"];
    return;
  }
  ++counters_["wake_verification_failures"];
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
  ++counters_["host_copies_trusted"];
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
    if (!release_scratch_after_drain(engine, host_arena_, scratch)) ++counters_["host_extents_quarantined"];
    throw;
  }
  host_arena_.release(scratch);
  return same;
}

void Allocator::set_file_dir(const std::string& directory) {
  CallLock lock(*this);
  check_open();
  if (!directory.empty()) {
    prepare_spill_directory(directory);
    counters_["stale_host_copy_files_removed"] += remove_stale_spill_files(directory);
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
  for (size_t i : order) {
    const size_t need = offload[i]->user_bytes();
    const HostTier wanted = tags_.at(offload[i]->tag()).host_tier;
    bool placed = false;
    for (HostTier tier : {HostTier::kPinned, HostTier::kPageable, HostTier::kFile}) {
      if (tier < wanted) continue;  // only the tag's own tier or a lower one
      if (tier == HostTier::kPinned && options_.pinned_budget_bytes &&
          pinned_used + need > *options_.pinned_budget_bytes) {
        continue;
      }
      if (tier == HostTier::kPageable && options_.pageable_budget_bytes &&
          pageable_used + need > *options_.pageable_budget_bytes) {
        continue;
      }
      if (tier == HostTier::kFile && options_.file_dir.empty()) continue;
      tiers[i] = tier;
      (tier == HostTier::kPinned ? pinned_used : pageable_used) += tier == HostTier::kFile ? 0 : need;
      if (tier != wanted) ++counters_["host_copies_spilled"];
      placed = true;
      break;
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
    it = staging_rings_.emplace(device, std::make_unique<StagingRing>(device, options_.staging_bytes)).first;
  }
  return *it->second;
}

void Allocator::copy_out(Segment& segment, HostCopy& copy, size_t offset, size_t num_bytes) {
  if (copy.staged()) {
    staging_ring(segment.device()).device_to_host(segment.base() + offset, copy, offset, num_bytes);
    counters_["bytes_staged_out"] += num_bytes;
  } else {
    copy_engine(segment.device())
        .device_to_host(segment.base() + offset, slice_extents(copy.extents(), offset, num_bytes));
  }
}

void Allocator::copy_in(Segment& segment, const HostCopy& copy, size_t offset, size_t num_bytes) {
  if (copy.staged()) {
    staging_ring(segment.device()).host_to_device(segment.base() + offset, copy, offset, num_bytes);
    counters_["bytes_staged_in"] += num_bytes;
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
      total += segment->user_bytes();
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
  check_no_capture("empty_cache()");
  free_deferred();
  // The bytes of the cached segments given back: GPU memory that earlier calls' refusals held and that the
  // retries free now is not counted (it is the drop in bytes_release_pending), only what this call released.
  const size_t pending_before = refused_.bytes_pending();
  size_t released = refused_.retry(contexts_);
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
  out.counters.assign(counters_.begin(), counters_.end());
  out.counters.emplace_back("frees_queued_during_transition", frees_queued_total_.load(std::memory_order_relaxed));
  out.counters.emplace_back("arena_hits", arena_.hits());
  out.counters.emplace_back("arena_misses", arena_.misses());
  out.counters.emplace_back("segments_live", segments_.size());
  size_t slots_quarantined = 0;
  for (const auto& [device, ring] : staging_rings_) slots_quarantined += ring->slots_quarantined();
  out.counters.emplace_back("staging_slots_quarantined", slots_quarantined);
  out.counters.emplace_back("teardown_failures", teardown_failure_count());
  out.counters.emplace_back("release_refused", refused_.refusals() + contexts_.release_refusals());
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
      if (result == CUDA_SUCCESS && waiters_[device].synchronize(current, options_.wait_timeout_seconds, &result) ==
                                        DeviceWaiter::Outcome::kTimedOut) {
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
  refused_.retry(contexts_);
  if (segments_.empty() && copy_engines_.empty() && verifier_.objects_held() == 0 && host_arena_.buffers_held() == 0 &&
      refused_.empty()) {
    // Nothing left on any device: give the primary contexts back too. One whose release the driver refuses
    // stays retained and reported (objects_release_pending), and the next close() retries it.
    contexts_.release_all();
  }
}

}  // namespace gpusleep
