// How much host memory may be pinned now without putting the process at risk.
//
// Pinned memory cannot be swapped or reclaimed: pinning more than the host or the container allows gets
// the process killed by the kernel's OOM killer (or its cgroup's), with no error to catch. So before
// pinning, gpusleep reads what the host (MemAvailable in /proc/meminfo) and the cgroups allow (for this
// process's cgroup and each parent up to the root: memory.max minus the working set, i.e. memory.current
// less the reclaimable inactive_file of memory.stat; cgroup v1: memory.limit_in_bytes minus
// memory.usage_in_bytes less total_inactive_file), and fails fast with HostOutOfMemory when the request
// plus a headroom (5% of what is available, at most 1 GiB) does not fit the tightest of them.
//
// Placing a backup on one host NUMA node (Note [Placing pinned backups] in pinned_host_buffer.h) also asks
// that node: its cpulist (a node without CPUs is device memory, never a host backup) and its own meminfo,
// MemFree plus the reclaimable Inactive(file), with the same headroom.
//
// The files are read from $GPUSLEEP_PROC_MEMINFO (default /proc/meminfo), below $GPUSLEEP_CGROUP_ROOT
// (default /sys/fs/cgroup) and below $GPUSLEEP_NUMA_NODE_ROOT (default /sys/devices/system/node); the tests
// point them at files they write.
#pragma once

#include <cstddef>
#include <optional>
#include <string>

namespace gpusleep {

struct HostMemoryBudget {
  std::optional<size_t> host_available_bytes;    // MemAvailable; nullopt when it cannot be read
  std::optional<size_t> cgroup_available_bytes;  // limit - usage of this process's cgroup; nullopt: no limit
  // The tighter of the two and its name ("MemAvailable" or "cgroup"); nullopt when neither is known.
  std::optional<size_t> available_bytes() const;
  std::string limited_by() const;
  // Whether `num_bytes` more can be pinned within available_bytes(), keeping pinning_headroom() free (true
  // when nothing is known). A distributed sleep asks it once for the sum of the ranks of one node.
  bool fits(size_t num_bytes) const;
};

HostMemoryBudget read_host_memory_budget();

// Throws HostOutOfMemory if pinning `num_bytes` more does not fit the budget. `what` says what it is for.
void check_host_memory_for_pinning(size_t num_bytes, const std::string& what);

// What gpusleep leaves free of `available_bytes` when it pins: 5%, at most 1 GiB.
size_t pinning_headroom(size_t available_bytes);

// One host NUMA node, as sysfs describes it (nodeN/cpulist and nodeN/meminfo).
struct NumaNodeMemory {
  bool has_cpus = false;                  // cpulist names a CPU; false for an unknown node
  std::optional<size_t> available_bytes;  // MemFree + Inactive(file); nullopt when it cannot be read
  // Whether `num_bytes` more can be pinned on this node alone, with pinning_headroom().
  bool fits(size_t num_bytes) const;
};

NumaNodeMemory read_numa_node_memory(int node);

}  // namespace gpusleep
