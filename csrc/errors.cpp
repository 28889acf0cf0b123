#include "errors.h"

#include <cstdio>

#include "driver_api.h"

namespace gpusleep {

std::string format_bytes(size_t num_bytes) {
  char buffer[64];
  const double gib = static_cast<double>(num_bytes) / (1024.0 * 1024.0 * 1024.0);
  if (gib >= 0.01) {
    std::snprintf(buffer, sizeof(buffer), "%.2f GiB (%zu bytes)", gib, num_bytes);
  } else {
    std::snprintf(buffer, sizeof(buffer), "%.2f MiB (%zu bytes)", static_cast<double>(num_bytes) / (1024.0 * 1024.0),
                  num_bytes);
  }
  return buffer;
}

std::string describe_driver_failure(const char* call, const std::string& what, CUresult result, const char* file,
                                    int line) {
  const char* base = file;
  for (const char* p = file; *p; ++p) {
    if (*p == '/') base = p + 1;
  }
  return std::string(call) + "(" + what + ") failed: " + cu_error_name(result) + " (" +
         std::to_string(static_cast<int>(result)) + "): " + cu_error_text(result) + " [" + base + ":" +
         std::to_string(line) + "]";
}

void throw_driver_error(const char* call, const std::string& what, CUresult result, const char* file, int line,
                        size_t bytes_needed, int device) {
  const std::string message = describe_driver_failure(call, what, result, file, line);
  if (result == CUDA_ERROR_OUT_OF_MEMORY && device >= 0 && bytes_needed > 0) {
    throw OutOfMemory(message, bytes_needed, measured_free_bytes(), device);
  }
  throw CudaError(message, result, cu_error_name(result));
}

std::optional<size_t> measured_free_bytes() noexcept {
  try {
    size_t free_bytes = 0, total_bytes = 0;
    if (GPUSLEEP_CU(cuMemGetInfo, &free_bytes, &total_bytes) == CUDA_SUCCESS) return free_bytes;
  } catch (...) {
  }
  return std::nullopt;
}

}  // namespace gpusleep

#include <atomic>
#include <mutex>

namespace gpusleep {
namespace {
std::atomic<uint64_t> g_teardown_failures{0};
std::mutex g_teardown_mutex;
std::string g_last_teardown_failure;
}  // namespace

void note_teardown_failure(const char* call, CUresult result) noexcept {
  g_teardown_failures.fetch_add(1, std::memory_order_relaxed);
  try {
    std::lock_guard<std::mutex> lock(g_teardown_mutex);
    g_last_teardown_failure = std::string(call) + " failed while releasing: " + cu_error_name(result);
  } catch (...) {
  }
}

uint64_t teardown_failure_count() noexcept { return g_teardown_failures.load(std::memory_order_relaxed); }

std::string last_teardown_failure() {
  std::lock_guard<std::mutex> lock(g_teardown_mutex);
  return g_last_teardown_failure;
}

}  // namespace gpusleep
