// Exceptions of the C++ core and the macro that turns a failed driver call into one.
//
// The pybind11 translator (bindings.cpp) maps them to Python:
//   OutOfMemory      -> gpusleep.OutOfMemoryError (a MemoryError and a RuntimeError), with bytes_needed /
//                       bytes_free / device, all measured (never placeholders)
//   HostOutOfMemory  -> gpusleep.HostOutOfMemoryError: pinned host memory, not GPU memory
//   CaptureInProgress-> gpusleep.CaptureInProgressError: the call would invalidate a CUDA graph capture
//   CudaError        -> gpusleep.CudaError with .code and .name
//   DriverUnavailable-> gpusleep.DriverUnavailableError
//   SleepStateError  -> gpusleep.SleepStateError
//   WakeVerificationFailed -> gpusleep.WakeVerificationError, with .tags and .blocks ((tag, address, bytes))
//   InvalidArgument  -> ValueError
// Messages say what was asked, what went wrong (CUDA_ERROR_* name and text, file:line) and what to do.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace gpusleep {

class CudaError : public std::runtime_error {
 public:
  CudaError(const std::string& message, CUresult code, std::string name)
      : std::runtime_error(message), code_(code), name_(std::move(name)) {}
  CUresult code() const noexcept { return code_; }
  const std::string& name() const noexcept { return name_; }

 private:
  CUresult code_;
  std::string name_;
};

class DriverUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Out of GPU memory on `device`. A std::bad_alloc so generic C++ code treats it as one. bytes_free is what
// cuMemGetInfo said right after the failure, nullopt if that query failed too (never a made-up 0).
class OutOfMemory : public std::bad_alloc {
 public:
  OutOfMemory(std::string message, size_t bytes_needed, std::optional<size_t> bytes_free, int device)
      : message_(std::move(message)), bytes_needed_(bytes_needed), bytes_free_(bytes_free), device_(device) {}
  const char* what() const noexcept override { return message_.c_str(); }
  size_t bytes_needed() const noexcept { return bytes_needed_; }
  std::optional<size_t> bytes_free() const noexcept { return bytes_free_; }
  int device() const noexcept { return device_; }

 private:
  std::string message_;
  size_t bytes_needed_;
  std::optional<size_t> bytes_free_;
  int device_;
};

// Not enough host memory to pin a backup. `limited_by`: "MemAvailable", "cgroup" or "driver".
class HostOutOfMemory : public std::bad_alloc {
 public:
  HostOutOfMemory(std::string message, size_t bytes_needed, std::optional<size_t> bytes_available,
                  std::string limited_by)
      : message_(std::move(message)),
        bytes_needed_(bytes_needed),
        bytes_available_(bytes_available),
        limited_by_(std::move(limited_by)) {}
  const char* what() const noexcept override { return message_.c_str(); }
  size_t bytes_needed() const noexcept { return bytes_needed_; }
  std::optional<size_t> bytes_available() const noexcept { return bytes_available_; }
  const std::string& limited_by() const noexcept { return limited_by_; }

 private:
  std::string message_;
  size_t bytes_needed_;
  std::optional<size_t> bytes_available_;
  std::string limited_by_;
};

class SleepStateError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A CUDA graph capture is in progress and the call would synchronize, unmap or release.
class CaptureInProgress : public SleepStateError {
 public:
  using SleepStateError::SleepStateError;
};

// A verified wake found restored bytes that differ from their host copy (Note [Verified wakes] in allocator.h).
// The wake was rolled back: the tags are asleep with their host copies.
struct MismatchedBlock {
  std::string tag;
  CUdeviceptr address = 0;  // the first byte of the piece that differs
  size_t num_bytes = 0;
};
class WakeVerificationFailed : public std::runtime_error {
 public:
  WakeVerificationFailed(const std::string& message, std::vector<std::string> tags, std::vector<MismatchedBlock> blocks,
                         bool host_copy_damaged)
      : std::runtime_error(message),
        tags_(std::move(tags)),
        blocks_(std::move(blocks)),
        host_copy_damaged_(host_copy_damaged) {}
  const std::vector<std::string>& tags() const noexcept { return tags_; }
  const std::vector<MismatchedBlock>& blocks() const noexcept { return blocks_; }
  // The host copy no longer holds what the sleep hashed: another wake fails the same way.
  bool host_copy_damaged() const noexcept { return host_copy_damaged_; }

 private:
  std::vector<std::string> tags_;
  std::vector<MismatchedBlock> blocks_;
  bool host_copy_damaged_;
};

class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// "cuMemCreate(2.00 GiB on device 0) failed: CUDA_ERROR_OUT_OF_MEMORY (2): out of memory [csrc/segment.cpp:42]"
std::string describe_driver_failure(const char* call, const std::string& what, CUresult result, const char* file,
                                    int line);

// Throws CudaError for `result`. A call that allocates GPU memory passes the bytes it asked for and its device:
// then CUDA_ERROR_OUT_OF_MEMORY becomes OutOfMemory, with the free bytes measured on that device (its context
// is current). Any other call's CUDA_ERROR_OUT_OF_MEMORY stays a CudaError: there is no GPU figure to report.
[[noreturn]] void throw_driver_error(const char* call, const std::string& what, CUresult result, const char* file,
                                     int line, size_t bytes_needed = 0, int device = -1);

// Free bytes of the current context's device by cuMemGetInfo; nullopt if the query fails.
std::optional<size_t> measured_free_bytes() noexcept;

// "1.50 GiB (1610612736 bytes)"
std::string format_bytes(size_t num_bytes);

}  // namespace gpusleep

// GPUSLEEP_CU_CHECK(cuMemMap, "map 2.00 GiB at 0x7f..", ptr, size, 0, handle, 0): call, count, throw on failure.
#define GPUSLEEP_CU_CHECK(name, what, ...)                                                 \
  do {                                                                                     \
    const CUresult gpusleep_result_ = GPUSLEEP_CU(name, ##__VA_ARGS__);                    \
    if (gpusleep_result_ != CUDA_SUCCESS) {                                                \
      ::gpusleep::throw_driver_error(#name, (what), gpusleep_result_, __FILE__, __LINE__); \
    }                                                                                      \
  } while (0)

namespace gpusleep {
// Destructors never throw. A driver call that fails while releasing is recorded here instead, and shows up
// in Allocator.stats().counters["teardown_failures"] with the last message in last_teardown_failure().
void note_teardown_failure(const char* call, CUresult result) noexcept;
uint64_t teardown_failure_count() noexcept;
std::string last_teardown_failure();
}  // namespace gpusleep
