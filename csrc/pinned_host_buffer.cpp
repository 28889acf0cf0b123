#include "pinned_host_buffer.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include "driver_api.h"
#include "errors.h"
#include "host_memory_budget.h"

namespace gpusleep {
namespace {

constexpr int kMpolBind = 2;          // <linux/mempolicy.h> MPOL_BIND: that node or nothing
constexpr int kMaxNodes = 1024;       // the node mask passed to mbind
constexpr int kMadvPopulateWrite = 23;  // MADV_POPULATE_WRITE (Linux 5.14); older kernels answer EINVAL
constexpr CUdevice_attribute kHostRegisterSupported = static_cast<CUdevice_attribute>(99);

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

// Whether the current context's device lets host memory be registered (CU_DEVICE_ATTRIBUTE_HOST_REGISTER_
// SUPPORTED). A query that fails counts as "no": the buffer is then pinned with cuMemHostAlloc.
bool host_register_supported() {
  CUdevice device = 0;
  int supported = 0;
  return GPUSLEEP_CU(cuCtxGetDevice, &device) == CUDA_SUCCESS &&
         GPUSLEEP_CU(cuDeviceGetAttribute, &supported, kHostRegisterSupported, device) == CUDA_SUCCESS &&
         supported == 1;
}

// Whether a buffer of `size_bytes` may be placed on `node`: a node with CPUs whose own free memory holds it.
bool node_can_hold(int node, size_t size_bytes) {
  if (node < 0 || node >= kMaxNodes) return false;
  const NumaNodeMemory memory = read_numa_node_memory(node);
  return memory.has_cpus && memory.fits(size_bytes);
}

// An anonymous mapping, kept out of fork() and core dumps, bound to `node` and populated there. nullptr if
// any step is refused (nothing is left mapped then).
char* map_on_node(size_t size_bytes, int node) {
  void* data = mmap(nullptr, size_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (data == MAP_FAILED) return nullptr;
  unsigned long mask[kMaxNodes / (8 * sizeof(unsigned long))] = {};
  mask[node / (8 * sizeof(unsigned long))] = 1UL << (node % (8 * sizeof(unsigned long)));
  const bool placed =
      madvise(data, size_bytes, MADV_DONTFORK) == 0 && madvise(data, size_bytes, MADV_DONTDUMP) == 0 &&
      syscall(SYS_mbind, data, size_bytes, kMpolBind, mask, static_cast<unsigned long>(kMaxNodes), 0U) == 0 &&
      (madvise(data, size_bytes, kMadvPopulateWrite) == 0 || errno == EINVAL);  // EINVAL: registration populates
  if (!placed) {
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
  // Note [Placing pinned backups]: placed when everything allows it, else cuMemHostAlloc.
  char* placed =
      node_can_hold(numa_node, size_bytes) && host_register_supported() ? map_on_node(size_bytes, numa_node) : nullptr;
  if (placed != nullptr) {
    const CUresult result = GPUSLEEP_CU(cuMemHostRegister, static_cast<void*>(placed), size_bytes,
                                        static_cast<unsigned>(CU_MEMHOSTREGISTER_PORTABLE));
    if (result == CUDA_SUCCESS) {
      handle_ = {placed, true};
      size_bytes_ = size_bytes;
      numa_node_ = numa_node;
      return;
    }
    munmap(placed, size_bytes);
    if (result == CUDA_ERROR_OUT_OF_MEMORY) throw_pin_failure("cuMemHostRegister", size_bytes, result, __LINE__);
    // Any other refusal (unsupported here, a driver that cannot pin this kind of memory): pin unplaced.
  }
  void* data = nullptr;
  const CUresult result =
      GPUSLEEP_CU(cuMemHostAlloc, &data, size_bytes, static_cast<unsigned>(CU_MEMHOSTALLOC_PORTABLE));
  if (result != CUDA_SUCCESS) throw_pin_failure("cuMemHostAlloc", size_bytes, result, __LINE__);
  handle_ = {static_cast<char*>(data), false};
  size_bytes_ = size_bytes;
}

}  // namespace gpusleep
