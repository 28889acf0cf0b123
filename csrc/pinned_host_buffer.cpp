#include "pinned_host_buffer.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <string>

#include "driver_api.h"
#include "errors.h"
#include "host_memory_budget.h"

namespace gpusleep {
namespace {

constexpr int kMpolPreferred = 1;  // <linux/mempolicy.h> MPOL_PREFERRED: the node first, others if it is full

[[noreturn]] void throw_pin_failure(const char* call, size_t size_bytes, CUresult result, int line) {
  const std::string what = format_bytes(size_bytes) + " of pinned host memory";
  if (result == CUDA_ERROR_OUT_OF_MEMORY) {
    throw HostOutOfMemory(describe_driver_failure(call, what, result, __FILE__, line) +
                              ". Level-1 sleep keeps the offloaded tags in pinned host memory: free host memory, "
                              "or use sleep(level=2).",
                          size_bytes, read_host_memory_budget().available_bytes(), "driver");
  }
  throw_driver_error(call, what, result, __FILE__, line);
}

// An anonymous mapping whose pages will come from `node` (preferred). nullptr if that cannot be arranged.
char* map_on_node(size_t size_bytes, int node) {
  if (node < 0 || node >= 1024) return nullptr;
  void* data = mmap(nullptr, size_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (data == MAP_FAILED) return nullptr;
  unsigned long mask[1024 / (8 * sizeof(unsigned long))] = {};
  mask[node / (8 * sizeof(unsigned long))] = 1UL << (node % (8 * sizeof(unsigned long)));
  if (syscall(SYS_mbind, data, size_bytes, kMpolPreferred, mask, 1024UL, 0U) != 0) {
    munmap(data, size_bytes);
    return nullptr;
  }
  return static_cast<char*>(data);
}

}  // namespace

CUresult PinnedHostBufferTraits::release(PinnedHostMemory memory, size_t size_bytes) noexcept {
  if (!memory.registered) return GPUSLEEP_CU(cuMemFreeHost, static_cast<void*>(memory.data));
  const CUresult result = GPUSLEEP_CU(cuMemHostUnregister, static_cast<void*>(memory.data));
  if (result == CUDA_SUCCESS) munmap(memory.data, size_bytes);
  return result;
}

PinnedHostBuffer::PinnedHostBuffer(size_t size_bytes, int numa_node) {
  if (char* placed = map_on_node(size_bytes, numa_node)) {
    const CUresult result = GPUSLEEP_CU(cuMemHostRegister, static_cast<void*>(placed), size_bytes,
                                        static_cast<unsigned>(CU_MEMHOSTREGISTER_PORTABLE));
    if (result != CUDA_SUCCESS) {
      munmap(placed, size_bytes);
      throw_pin_failure("cuMemHostRegister", size_bytes, result, __LINE__);
    }
    handle_ = {placed, true};
    size_bytes_ = size_bytes;
    numa_node_ = numa_node;
    return;
  }
  void* data = nullptr;
  const CUresult result =
      GPUSLEEP_CU(cuMemHostAlloc, &data, size_bytes, static_cast<unsigned>(CU_MEMHOSTALLOC_PORTABLE));
  if (result != CUDA_SUCCESS) throw_pin_failure("cuMemHostAlloc", size_bytes, result, __LINE__);
  handle_ = {static_cast<char*>(data), false};
  size_bytes_ = size_bytes;
}

}  // namespace gpusleep
