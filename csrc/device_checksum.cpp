#include "device_checksum.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "chunk_hash_ptx.h"
#include "device_context.h"
#include "driver_api.h"
#include "errors.h"
#include "size_math.h"

namespace gpusleep {

namespace {
std::string refusal(const char* call, CUresult result) {
  return std::string(call) + " failed with " + cu_error_name(result) + " (" + cu_error_text(result) + ")";
}

size_t pieces_of(size_t num_bytes, size_t piece_bytes) { return (num_bytes + piece_bytes - 1) / piece_bytes; }
}  // namespace

DeviceChecksum::DeviceChecksum(int device, DeviceLayout layout, ReleaseQueue& refused, DeviceWaits& waits)
    : device_(device), layout_(std::move(layout)), refused_(refused), waits_(waits) {
  layout_.access_devices = {device};  // the sums are read and written by this device only
}

namespace {
// Refusals that say this driver will never run this PTX on this device: the JIT or the image itself. Anything
// else (out of memory while the GPU is full, a transient error) is tried again at the next call.
bool refused_for_good(CUresult result) {
  switch (result) {
    case CUDA_ERROR_INVALID_IMAGE:
    case CUDA_ERROR_NO_BINARY_FOR_GPU:
    case CUDA_ERROR_INVALID_PTX:
    case CUDA_ERROR_UNSUPPORTED_PTX_VERSION:
    case CUDA_ERROR_JIT_COMPILER_NOT_FOUND:
    case CUDA_ERROR_JIT_COMPILATION_DISABLED:
    case CUDA_ERROR_NOT_FOUND:
    case CUDA_ERROR_NOT_SUPPORTED: return true;
    default: return false;
  }
}
}  // namespace

bool DeviceChecksum::available() {
  if (function_ != nullptr) return true;
  if (refused_for_good_) return false;
  RelaxedCaptureMode relaxed;  // loading is an "unsafe" call during other threads' captures
  auto refuse = [&](const std::string& what, const char* call, CUresult result) {
    unavailable_reason_ = what + " on device " + std::to_string(device_) + ": " + refusal(call, result) +
                          (refused_for_good(result) ? "" : " (tried again at the next call)");
    refused_for_good_ = refused_for_good(result);
    module_.reset();
    return false;
  };
  CUresult result = module_.load(kChunkHashPtx);
  if (result != CUDA_SUCCESS) {
    const std::string& log = module_.jit_log();
    return refuse("the chunk hash kernel could not be loaded" + (log.empty() ? "" : " (the JIT said: " + log + ")"),
                  "cuModuleLoadDataEx", result);
  }
  CUfunction function = nullptr;
  result = GPUSLEEP_CU(cuModuleGetFunction, &function, module_.get(), kChunkHashKernelName);
  if (result != CUDA_SUCCESS) return refuse("the chunk hash kernel could not be found", "cuModuleGetFunction", result);
  // Lazy loading (CUDA_MODULE_LOADING=LAZY, the default since 12.2) would load the code at the first launch, in
  // the middle of a sleep or wake: load it now where the driver lets us say so (cuFuncLoad, drivers >= 12.4).
  if (driver().cuFuncLoad != nullptr) {
    result = GPUSLEEP_CU(cuFuncLoad, function);
    if (result != CUDA_SUCCESS) return refuse("the chunk hash kernel could not be loaded", "cuFuncLoad", result);
  }
  if (!stream_.owns()) {
    CUstream stream = nullptr;
    result = GPUSLEEP_CU(cuStreamCreate, &stream, static_cast<unsigned>(CU_STREAM_NON_BLOCKING));
    if (result != CUDA_SUCCESS) return refuse("no stream for the chunk hash kernel", "cuStreamCreate", result);
    stream_ = Stream::adopt(stream);
  }
  function_ = function;
  unavailable_reason_.clear();
  return true;
}

void DeviceChecksum::reserve_host_sums(size_t num_sums) {
  const size_t bytes = num_sums * sizeof(uint64_t);
  if (host_sums_capacity_ >= bytes && host_sums_capacity_ > 0) return;
  RelaxedCaptureMode relaxed;
  const size_t capacity = round_up(std::max<size_t>(bytes, 1), size_t{64} << 10);
  host_sums_ = PinnedHostBuffer(capacity, /*numa_node=*/-1);
  host_sums_capacity_ = capacity;
  ++host_buffers_pinned_;
}

void DeviceChecksum::ensure_buffers(size_t num_sums) {
  const size_t bytes = num_sums * sizeof(uint64_t);
  reserve_host_sums(num_sums);
  RelaxedCaptureMode relaxed;
  // Device memory for the sums lives only for one hash() call: a sleeping allocator holds no GPU memory.
  // One chunk per granule: the sums of 1 TiB (8 bytes per 4 MiB piece) fit one 2 MiB granule.
  device_sums_ =
      std::make_unique<Segment>(device_, "<gpusleep chunk hashes>", bytes, layout_, layout_.granularity_bytes,
                                /*pooled=*/false, refused_);
}

void DeviceChecksum::release_device_sums(bool drained) noexcept {
  if (!device_sums_) return;
  if (!drained) {
    device_sums_->give_up_physical(refused_);  // a kernel may still write it: untried until the device drains
    refused_.await_drain(device_);
  }
  device_sums_->release_all(refused_);
  device_sums_.reset();
}

bool DeviceChecksum::synchronize_noexcept() noexcept {
  if (!stream_.owns()) return true;
  const bool ok = waits_.drain_stream(stream_.get());
  if (ok) drained_ = true;
  return ok;
}

std::vector<std::vector<uint64_t>> DeviceChecksum::hash(const std::vector<HashRange>& ranges, size_t piece_bytes) {
  if (!available()) throw SleepStateError(unavailable_reason_);
  // Every call below may run while another thread captures a graph (a wake is relaxed as a whole, a sleep or
  // device_chunk_hashes() are not): the buffer's map and release and the stream's synchronize must not
  // invalidate that capture (Note [Captures]).
  RelaxedCaptureMode relaxed;
  const size_t span_bytes = kSpanWords * 8;
  if (piece_bytes == 0 || piece_bytes % span_bytes != 0) {
    throw InvalidArgument("chunk hash pieces must be a nonzero multiple of 64 KiB, got " + std::to_string(piece_bytes));
  }
  std::vector<std::vector<uint64_t>> hashes(ranges.size());
  std::vector<size_t> first_sum(ranges.size(), 0);
  size_t num_sums = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (ranges[i].address % 8 != 0) throw InvalidArgument("chunk hash ranges must be 8-byte aligned");
    first_sum[i] = num_sums;
    num_sums += pieces_of(ranges[i].num_bytes, piece_bytes);
  }
  if (num_sums == 0) return hashes;
  if (!drained_) {  // undrained since an earlier failure: a full wait now, not a drain's single query
    CUresult earlier = CUDA_SUCCESS;
    if (waits_.synchronize_stream(stream_.get(), waits_.deadline(), &earlier) == DeviceWaits::Outcome::kTimedOut) {
      throw waits_.timeout_error(device_, "waiting for its chunk hash stream: cuStreamSynchronize");
    }
    if (earlier != CUDA_SUCCESS) {
      throw CudaError("the chunk hash stream of device " + std::to_string(device_) +
                          " still refuses to synchronize after an earlier failure",
                      CUDA_ERROR_ILLEGAL_STATE, cu_error_name(CUDA_ERROR_ILLEGAL_STATE));
    }
    drained_ = true;
  }
  ensure_buffers(num_sums);  // throws OutOfMemory when the device has no room for the sums
  const size_t sum_bytes = num_sums * sizeof(uint64_t);
  CUstream stream = stream_.get();
  char* host_sums = host_sums_.data();
  try {
    GPUSLEEP_CU_CHECK(cuMemsetD8Async, "zero the chunk hash sums", device_sums_->base(), static_cast<unsigned char>(0),
                      sum_bytes, stream);
    for (size_t i = 0; i < ranges.size(); ++i) {
      const size_t words = (ranges[i].num_bytes + 7) / 8;
      if (words == 0) continue;
      unsigned long long data = ranges[i].address;
      unsigned long long num_bytes = ranges[i].num_bytes;
      unsigned long long span_words = kSpanWords;
      unsigned long long blocks_per_piece = piece_bytes / span_bytes;
      unsigned long long sums = device_sums_->base() + first_sum[i] * sizeof(uint64_t);
      void* params[] = {&data, &num_bytes, &span_words, &blocks_per_piece, &sums};
      const unsigned blocks = static_cast<unsigned>((words + kSpanWords - 1) / kSpanWords);
      GPUSLEEP_CU_CHECK(cuLaunchKernel, "chunk hash of " + format_bytes(ranges[i].num_bytes), function_, blocks, 1u, 1u,
                        kThreadsPerBlock, 1u, 1u, 0u, stream, params, nullptr);
    }
    GPUSLEEP_CU_CHECK(cuMemcpyDtoHAsync, "read the chunk hash sums", static_cast<void*>(host_sums),
                      device_sums_->base(), sum_bytes, stream);
    waits_.synchronize_stream_or_throw(device_, stream, "chunk hash stream");
  } catch (...) {
    const bool drained = synchronize_noexcept();
    if (!drained) {
      drained_ = false;  // kernels may still read the ranges, the copy may still write host_sums_
      quarantined_.push_back(std::move(host_sums_));
      host_sums_capacity_ = 0;
    }
    release_device_sums(drained);
    throw;
  }
  release_device_sums(/*drained=*/true);
  for (size_t i = 0; i < ranges.size(); ++i) {
    const size_t pieces = pieces_of(ranges[i].num_bytes, piece_bytes);
    if (pieces == 0) continue;  // an empty range has no piece (memcpy must not see its null data())
    hashes[i].resize(pieces);
    std::memcpy(hashes[i].data(), host_sums + first_sum[i] * sizeof(uint64_t), pieces * sizeof(uint64_t));
  }
  return hashes;
}

bool DeviceChecksum::release() noexcept {
  bool all = true;
  release_device_sums(drained_);
  if (stream_.try_release() != CUDA_SUCCESS) all = false;
  if (module_.try_release() != CUDA_SUCCESS) all = false;
  if (host_sums_.try_release() != CUDA_SUCCESS) all = false;
  host_sums_capacity_ = 0;
  function_ = nullptr;
  return all;
}

}  // namespace gpusleep
