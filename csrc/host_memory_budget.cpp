#include "host_memory_budget.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "errors.h"

namespace gpusleep {
namespace {

std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : fallback;
}

std::optional<size_t> read_number(const std::string& path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word == "max") return std::nullopt;
  char* end = nullptr;
  const unsigned long long value = std::strtoull(word.c_str(), &end, 10);
  if (end == word.c_str()) return std::nullopt;
  return static_cast<size_t>(value);
}

std::optional<size_t> read_mem_available(const std::string& meminfo_path) {
  std::ifstream in(meminfo_path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream fields(line.substr(13));
    unsigned long long kib = 0;
    if (fields >> kib) return static_cast<size_t>(kib) * 1024;
  }
  return std::nullopt;
}

// This process's cgroup v2 path ("0::/some/path" in /proc/self/cgroup), or "" at the root.
std::string own_cgroup_v2_path() {
  std::ifstream in(env_or("GPUSLEEP_PROC_SELF_CGROUP", "/proc/self/cgroup"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("0::", 0) == 0) return line.substr(3) == "/" ? "" : line.substr(3);
  }
  return "";
}

std::optional<size_t> limit_minus_usage(const std::string& limit_path, const std::string& usage_path) {
  const std::optional<size_t> limit = read_number(limit_path);
  const std::optional<size_t> usage = read_number(usage_path);
  if (!limit || !usage || *limit >= (size_t{1} << 62)) return std::nullopt;  // "max", or v1's "no limit"
  return *limit > *usage ? *limit - *usage : 0;
}

std::optional<size_t> read_cgroup_available(const std::string& root) {
  const std::string own = root + own_cgroup_v2_path();
  for (const std::string& dir : {own, root}) {
    if (auto v2 = limit_minus_usage(dir + "/memory.max", dir + "/memory.current")) return v2;
  }
  return limit_minus_usage(root + "/memory/memory.limit_in_bytes", root + "/memory/memory.usage_in_bytes");
}

}  // namespace

std::optional<size_t> HostMemoryBudget::available_bytes() const {
  if (host_available_bytes && cgroup_available_bytes) {
    return std::min(*host_available_bytes, *cgroup_available_bytes);
  }
  return host_available_bytes ? host_available_bytes : cgroup_available_bytes;
}

std::string HostMemoryBudget::limited_by() const {
  if (cgroup_available_bytes && (!host_available_bytes || *cgroup_available_bytes < *host_available_bytes)) {
    return "cgroup";
  }
  return host_available_bytes ? "MemAvailable" : "";
}

HostMemoryBudget read_host_memory_budget() {
  HostMemoryBudget budget;
  budget.host_available_bytes = read_mem_available(env_or("GPUSLEEP_PROC_MEMINFO", "/proc/meminfo"));
  budget.cgroup_available_bytes = read_cgroup_available(env_or("GPUSLEEP_CGROUP_ROOT", "/sys/fs/cgroup"));
  return budget;
}

void check_host_memory_for_pinning(size_t num_bytes, const std::string& what) {
  const HostMemoryBudget budget = read_host_memory_budget();
  const std::optional<size_t> available = budget.available_bytes();
  if (!available || num_bytes <= *available) return;
  const std::string limit = budget.limited_by();
  throw HostOutOfMemory("pinning " + format_bytes(num_bytes) + " of host memory for " + what + " would exceed what " +
                            (limit == "cgroup" ? "this process's cgroup (memory.max - memory.current)"
                                               : "the host (MemAvailable)") +
                            " allows: " + format_bytes(*available) +
                            ". Nothing was changed. Free host memory, raise the container's memory limit, offload "
                            "fewer tags (sleep(level=1, offload_tags=[...])) or use sleep(level=2).",
                        num_bytes, *available, limit);
}

}  // namespace gpusleep
