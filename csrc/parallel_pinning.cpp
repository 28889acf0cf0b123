#include "parallel_pinning.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <thread>
#include <vector>

#include "device_context.h"
#include "driver_api.h"
#include "errors.h"
#include "size_math.h"

namespace gpusleep {
namespace {

constexpr int kMaxPinThreads = 8;
constexpr int kMadvPopulateWrite = 23;  // MADV_POPULATE_WRITE (Linux 5.14); older kernels answer EINVAL

// The value of `name` as an unsigned number, or `fallback` when unset or not a number.
size_t env_number(const char* name, size_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long number = std::strtoull(value, &end, 0);
  return end != value && *end == '\0' ? static_cast<size_t>(number) : fallback;
}

}  // namespace

PinningPlan PinningPlan::from_environment() {
  PinningPlan plan;
  const unsigned hardware = std::max(1U, std::thread::hardware_concurrency());
  const size_t threads = env_number("GPUSLEEP_PIN_THREADS", std::min<size_t>(kMaxPinThreads, hardware));
  plan.threads = static_cast<int>(std::clamp<size_t>(threads, 1, 64));
  plan.piece_bytes = round_up(env_number("GPUSLEEP_PIN_PIECE_BYTES", kDefaultPinPieceBytes), kHugePageBytes);
  plan.huge_pages = env_number("GPUSLEEP_PIN_HUGE_PAGES", 1) != 0;
  return plan;
}

size_t PinningPlan::piece_bytes_for(size_t size_bytes) const noexcept {
  return piece_bytes == 0 || piece_bytes > size_bytes ? size_bytes : piece_bytes;
}

void run_in_parallel(size_t count, int threads, const std::function<void()>& enter,
                     const std::function<void(size_t)>& work) {
  std::atomic<size_t> next{0};
  const auto worker = [&] {
    try {
      enter();
      for (size_t i = next++; i < count; i = next++) work(i);
    } catch (...) {
      // Against the contract: end this worker, never std::terminate (the callers see the item as not done).
    }
  };
  const size_t helpers = std::min<size_t>(count, static_cast<size_t>(std::max(threads, 1))) - (count > 0 ? 1 : 0);
  std::vector<std::thread> pool;
  pool.reserve(helpers);
  try {
    for (size_t i = 0; i < helpers; ++i) pool.emplace_back(worker);
  } catch (const std::system_error&) {
    // No more threads: the ones started and this one do the rest.
  }
  worker();
  for (std::thread& thread : pool) thread.join();
}

bool populate_in_parallel(char* data, size_t size_bytes, int threads) {
  // Slices of whole huge pages, about two per thread so that a slow one does not hold the rest up.
  const size_t per_thread = size_bytes / static_cast<size_t>(std::max(threads, 1)) / 2;
  const size_t slice_bytes = std::max(kHugePageBytes, round_up(per_thread, kHugePageBytes));
  const size_t slices = (size_bytes + slice_bytes - 1) / slice_bytes;
  std::atomic<bool> refused{false};
  run_in_parallel(
      slices, threads, [] {},
      [&](size_t i) {
        const size_t offset = i * slice_bytes;
        const size_t length = std::min(slice_bytes, size_bytes - offset);
        if (madvise(data + offset, length, kMadvPopulateWrite) != 0 && errno != EINVAL) refused = true;
      });
  return !refused;
}

PieceRegistration register_pieces(CUcontext context, char* data, size_t size_bytes, size_t piece_bytes, int threads) {
  const size_t pieces = (size_bytes + piece_bytes - 1) / piece_bytes;
  std::vector<CUresult> results(pieces, CUDA_ERROR_NOT_INITIALIZED);  // NOT_INITIALIZED: never tried
  // Each worker acts for the caller: its context (a worker without it fails its pieces, and then all are
  // undone), and the relaxed capture mode the allocator pins under.
  const auto enter = [context] { (void)GPUSLEEP_CU(cuCtxSetCurrent, context); };
  run_in_parallel(pieces, threads, enter, [&](size_t i) {
    const RelaxedCaptureMode relaxed;
    const size_t offset = i * piece_bytes;
    results[i] =
        GPUSLEEP_CU(cuMemHostRegister, static_cast<void*>(data + offset), std::min(piece_bytes, size_bytes - offset),
                    static_cast<unsigned>(CU_MEMHOSTREGISTER_PORTABLE));
  });
  const auto failed = std::find_if(results.begin(), results.end(), [](CUresult r) { return r != CUDA_SUCCESS; });
  if (failed == results.end()) return {};
  // Every piece or none (Note [Parallel pinning]).
  PieceRegistration outcome{*failed, true};
  for (size_t i = 0; i < pieces; ++i) {
    if (results[i] != CUDA_SUCCESS) continue;
    const CUresult undone = GPUSLEEP_CU(cuMemHostUnregister, static_cast<void*>(data + i * piece_bytes));
    if (undone != CUDA_SUCCESS) {
      note_teardown_failure("cuMemHostUnregister", undone);
      outcome.undone = false;
    }
  }
  return outcome;
}

CUresult unregister_pieces(char* data, size_t size_bytes, size_t piece_bytes) noexcept {
  CUresult first = CUDA_SUCCESS;
  for (size_t offset = 0; offset < size_bytes; offset += piece_bytes) {
    const CUresult result = GPUSLEEP_CU(cuMemHostUnregister, static_cast<void*>(data + offset));
    if (result != CUDA_SUCCESS && result != CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED && first == CUDA_SUCCESS) {
      first = result;
    }
  }
  return first;
}

}  // namespace gpusleep
