// PinnedHostBuffer: move-only owner of page-locked host memory, portable (any context's copies run at full
// DMA speed). Released on destruction.
//
// Where the GPU's nearest host NUMA node is known (CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID), the memory is placed
// on that node: an anonymous mapping with an MPOL_PREFERRED policy for the node, then cuMemHostRegister.
// On a multi-socket host a backup on the far socket crosses the inter-socket link on every copy. If the
// placement cannot be made (no such node, mbind refused), it falls back to cuMemHostAlloc, and numa_node()
// says -1.
#pragma once

#include <cuda.h>

#include <cstddef>

#include "driver_owner.h"

namespace gpusleep {

struct PinnedHostMemory {
  char* data = nullptr;
  bool registered = false;  // mmap + cuMemHostRegister (NUMA-placed); else cuMemHostAlloc
  bool operator==(const PinnedHostMemory& other) const noexcept {
    return data == other.data && registered == other.registered;
  }
};

struct PinnedHostBufferTraits {
  static CUresult release(PinnedHostMemory memory, size_t size_bytes) noexcept;
  static constexpr const char* kRelease = "cuMemFreeHost";
};

class PinnedHostBuffer : public DriverOwner<PinnedHostMemory, PinnedHostBufferTraits> {
 public:
  PinnedHostBuffer() = default;
  // Needs a current context. `numa_node` < 0: no placement. Throws HostOutOfMemory or CudaError.
  PinnedHostBuffer(size_t size_bytes, int numa_node);

  char* data() const noexcept { return handle_.data; }
  // The node the memory was placed on, or -1.
  int numa_node() const noexcept { return numa_node_; }

 private:
  int numa_node_ = -1;
};

}  // namespace gpusleep
