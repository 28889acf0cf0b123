#include "pinned_host_buffer.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "device_context.h"
#include "driver_api.h"
#include "errors.h"
#include "host_memory_budget.h"
#include "parallel_pinning.h"
#include "size_math.h"

namespace gpusleep {
namespace {

constexpr int kMpolBind = 2;          // <linux/mempolicy.h> MPOL_BIND: that node or nothing
constexpr int kMaxNodes = 1024;       // the node mask passed to mbind
constexpr size_t kPageBytes = 4096;     // mappings are rounded to it (larger host pages round further)
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

// `size_bytes` of anonymous memory starting on a 2 MiB boundary (huge pages possible), or MAP_FAILED. The
// slack around the aligned part is unmapped again, so the mapping is exactly the page-rounded size.
void* map_aligned(size_t size_bytes, bool huge_pages) {
  const size_t alignment = huge_pages ? kHugePageBytes : 0;
  const size_t length = round_up(size_bytes, kPageBytes);
  void* raw = mmap(nullptr, length + alignment, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED || alignment == 0) return raw;
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = round_up(start, alignment);
  if (aligned > start) munmap(raw, aligned - start);
  const size_t tail = start + length + alignment - (aligned + length);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + length), tail);
  return reinterpret_cast<void*>(aligned);
}

// An anonymous mapping, kept out of fork() and core dumps, bound to `node` and populated there (in parallel,
// on huge pages where the kernel gives them: Note [Parallel pinning]). nullptr if any step is refused
// (nothing is left mapped then).
char* map_on_node(size_t size_bytes, int node, const PinningPlan& plan) {
  void* data = map_aligned(size_bytes, plan.huge_pages);
  if (data == MAP_FAILED) return nullptr;
  unsigned long mask[kMaxNodes / (8 * sizeof(unsigned long))] = {};
  mask[node / (8 * sizeof(unsigned long))] = 1UL << (node % (8 * sizeof(unsigned long)));
  if (plan.huge_pages) (void)madvise(data, size_bytes, MADV_HUGEPAGE);  // a request: THP may be off
  const bool placed =
      madvise(data, size_bytes, MADV_DONTFORK) == 0 && madvise(data, size_bytes, MADV_DONTDUMP) == 0 &&
      syscall(SYS_mbind, data, size_bytes, kMpolBind, mask, static_cast<unsigned long>(kMaxNodes), 0U) == 0 &&
      populate_in_parallel(static_cast<char*>(data), size_bytes, plan.threads);
  if (!placed) {
    munmap(data, size_bytes);
    return nullptr;
  }
  return static_cast<char*>(data);
}

}  // namespace

CUresult PinnedHostBufferTraits::release(PinnedHostMemory memory, size_t size_bytes) noexcept {
  if (!memory.registered) return GPUSLEEP_CU(cuMemFreeHost, static_cast<void*>(memory.data));
  const CUresult result = unregister_pieces(memory.data, size_bytes, memory.piece_bytes);
  if (result == CUDA_SUCCESS) munmap(memory.data, size_bytes);
  return result;
}

PinnedHostBuffer::PinnedHostBuffer(size_t size_bytes, int numa_node) {
  // Pinning, its rollback and its fallback are "unsafe" during another thread's GLOBAL capture: RELAXED for the
  // whole constructor, whoever calls it (Note [Captures] in allocator.h).
  const RelaxedCaptureMode relaxed;
  // Note [Placing pinned backups]: placed when everything allows it, else cuMemHostAlloc.
  const PinningPlan plan = PinningPlan::from_environment();
  CUcontext context = nullptr;
  char* placed = node_can_hold(numa_node, size_bytes) && host_register_supported() &&
                         GPUSLEEP_CU(cuCtxGetCurrent, &context) == CUDA_SUCCESS && context != nullptr
                     ? map_on_node(size_bytes, numa_node, plan)
                     : nullptr;
  if (placed != nullptr) {
    // Note [Parallel pinning]: every piece registered, or none.
    const size_t piece_bytes = plan.piece_bytes_for(size_bytes);
    const PieceRegistration registration = register_pieces(context, placed, size_bytes, piece_bytes, plan.threads);
    const CUresult result = registration.result;
    if (result == CUDA_SUCCESS) {
      handle_ = {placed, true, piece_bytes};
      size_bytes_ = size_bytes;
      numa_node_ = numa_node;
      return;
    }
    // A piece the driver would not unregister is still pinned: its mapping stays, quarantined (never reused,
    // never unmapped), as release() unmaps only after every unregister succeeded (Note [Parallel pinning]).
    if (registration.undone) munmap(placed, size_bytes);
    if (result == CUDA_ERROR_OUT_OF_MEMORY) throw_pin_failure("cuMemHostRegister", size_bytes, result, __LINE__);
    // Any other refusal (unsupported here, a driver that cannot pin this kind of memory): pin unplaced.
  }
  void* data = nullptr;
  const CUresult result =
      GPUSLEEP_CU(cuMemHostAlloc, &data, size_bytes, static_cast<unsigned>(CU_MEMHOSTALLOC_PORTABLE));
  if (result != CUDA_SUCCESS) throw_pin_failure("cuMemHostAlloc", size_bytes, result, __LINE__);
  handle_ = {static_cast<char*>(data), false, 0};
  size_bytes_ = size_bytes;
}

}  // namespace gpusleep
