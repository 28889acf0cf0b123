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
// The files are read from $GPUSLEEP_PROC_MEMINFO (default /proc/meminfo) and below $GPUSLEEP_CGROUP_ROOT
// (default /sys/fs/cgroup); the tests point them at files they write.
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
};

HostMemoryBudget read_host_memory_budget();

// Throws HostOutOfMemory if pinning `num_bytes` more does not fit the budget. `what` says what it is for.
void check_host_memory_for_pinning(size_t num_bytes, const std::string& what);

}  // namespace gpusleep
