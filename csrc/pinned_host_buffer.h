// PinnedHostBuffer: move-only owner of page-locked host memory, portable (any context's copies run at full
// DMA speed). Released on destruction.
//
// Note [Placing pinned backups]
// Rationale: on a multi-socket host a backup on the far socket crosses the inter-socket link on every copy,
// so where the GPU's nearest host NUMA node is known (CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID) the backup is
// placed there: an anonymous mapping bound to the node, then cuMemHostRegister. That mapping is ordinary
// process memory, so four things are arranged that cuMemHostAlloc's driver mapping does not need:
// - fork() and core dumps: the mapping is MADV_DONTFORK and MADV_DONTDUMP right after mmap. Since Linux
//   5.11 fork() copies DMA-pinned anonymous pages into the child eagerly, so without it every fork (the
//   multiprocessing "fork" start method, DataLoader workers, pre-fork servers) would allocate and copy the
//   whole backup; and a crash would write it into the core dump. (libibverbs does the same for registered
//   memory.) A child never has the backup's range mapped.
// - bind, not prefer: MPOL_BIND, so pages come from that node or not at all; MPOL_PREFERRED silently took
//   them from any node when the node was short (on a GH200, from the GPU's own HBM node, which the sleep is
//   trying to free). The mapping is populated before registration (MADV_POPULATE_WRITE where the kernel
//   has it), so a population the kernel refuses is seen before anything is registered, and unmapped.
// - only a node with CPUs, and only if it has room: a node whose sysfs cpulist is empty is device memory
//   (GH200/GB200 HBM onlined by the driver's NUMA mode) and is never chosen. The node's own free memory
//   (sysfs nodeN/meminfo: MemFree plus Inactive(file)) must hold the buffer with the usual headroom
//   (host_memory_budget.h); the host-wide MemAvailable, checked by the caller, includes every node (HBM
//   too) and says nothing about this one. A bound mapping that outgrows its node may well end in the OOM
//   killer rather than an error, so this check, not the populate, is what keeps binding safe.
// - registration may be refused: where the device reports CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED = 0
//   nothing is registered, and a cuMemHostRegister failure other than out-of-memory unmaps the mapping.
// Approach: whenever placement is not possible (no node, a CPU-less or short node, registration
// unsupported or refused, madvise/mbind/populate refused), the buffer falls back to cuMemHostAlloc, which
// the caller's host-wide budget covers, and numa_node() says -1. An out-of-memory from cuMemHostRegister is
// not retried: the host is short, and HostOutOfMemory says so (limited_by "driver").
// Limitations: the fallback's pages follow the process's policy (the local node first, then any node): on a
// GH200 whose Grace node is short they can still come from HBM. On ATS systems cuMemHostRegister only
// populates (the pages stay migratable): the bind keeps the kernel's allocations on the node, whether the
// driver still migrates them is for a GH200 to tell (review 2026-12-06, section C item 5).
// The placed path populates and registers in parallel, in pieces, on huge pages where the kernel gives them
// (Note [Parallel pinning] in parallel_pinning.h); piece_bytes() says where its registrations end.
#pragma once

#include <cuda.h>

#include <cstddef>

#include "driver_owner.h"

namespace gpusleep {

struct PinnedHostMemory {
  char* data = nullptr;
  bool registered = false;  // mmap + cuMemHostRegister (NUMA-placed); else cuMemHostAlloc
  size_t piece_bytes = 0;   // registered: each cuMemHostRegister covers this much (the last piece the rest)
  bool operator==(const PinnedHostMemory& other) const noexcept {
    return data == other.data && registered == other.registered && piece_bytes == other.piece_bytes;
  }
};

struct PinnedHostBufferTraits {
  static CUresult release(PinnedHostMemory memory, size_t size_bytes) noexcept;
  static constexpr const char* kRelease = "cuMemFreeHost";
};

class PinnedHostBuffer : public DriverOwner<PinnedHostMemory, PinnedHostBufferTraits> {
 public:
  PinnedHostBuffer() = default;
  // Needs a current context. `numa_node` < 0: no placement (Note [Placing pinned backups]). Throws
  // HostOutOfMemory or CudaError.
  PinnedHostBuffer(size_t size_bytes, int numa_node);

  char* data() const noexcept { return handle_.data; }
  // The node the memory was placed on, or -1.
  int numa_node() const noexcept { return numa_node_; }
  // The size of each separate registration (every piece starts at data() + k * piece_bytes()); a host range
  // that crosses a multiple of it may not be the host side of one copy (docs/driver-rules.md section 8b).
  // size_bytes() for a cuMemHostAlloc buffer (one allocation).
  size_t piece_bytes() const noexcept { return handle_.registered ? handle_.piece_bytes : size_bytes_; }

 private:
  int numa_node_ = -1;
};

}  // namespace gpusleep
