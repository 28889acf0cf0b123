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

// A field of a memory.stat file ("inactive_file 12345"), 0 when absent.
size_t stat_field(const std::string& path, const std::string& field) {
  std::ifstream in(path);
  std::string name;
  unsigned long long value = 0;
  while (in >> name >> value) {
    if (name == field) return static_cast<size_t>(value);
  }
  return 0;
}

// limit - working set, where the working set leaves out reclaimable file cache (inactive_file), as the
// kubelet counts it: a container that just read its weights from disk is not "full".
std::optional<size_t> limit_minus_working_set(const std::string& dir, const char* limit_file, const char* usage_file,
                                              const char* inactive_field) {
  const std::optional<size_t> limit = read_number(dir + "/" + limit_file);
  const std::optional<size_t> usage = read_number(dir + "/" + usage_file);
  if (!limit || !usage || *limit >= (size_t{1} << 62)) return std::nullopt;  // "max", or v1's "no limit"
  const size_t inactive = stat_field(dir + "/memory.stat", inactive_field);
  const size_t working_set = *usage > inactive ? *usage - inactive : 0;
  return *limit > working_set ? *limit - working_set : 0;
}

// The tightest limit on the way from this process's cgroup up to the root (a pod-level parent counts).
std::optional<size_t> read_cgroup_available(const std::string& root) {
  std::optional<size_t> tightest;
  auto consider = [&](std::optional<size_t> available) {
    if (available && (!tightest || *available < *tightest)) tightest = available;
  };
  std::string path = own_cgroup_v2_path();
  while (true) {
    consider(limit_minus_working_set(root + path, "memory.max", "memory.current", "inactive_file"));
    if (path.empty()) break;
    path = path.substr(0, path.rfind('/'));
  }
  consider(limit_minus_working_set(root + "/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                   "total_inactive_file"));
  return tightest;
}

// A field of a sysfs node meminfo file ("Node 0 MemFree:   123 kB"), in bytes.
std::optional<size_t> node_meminfo_field(const std::string& path, const std::string& field) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string node_word, node_id, name;
    unsigned long long kib = 0;
    if (words >> node_word >> node_id >> name >> kib && name == field + ":") return static_cast<size_t>(kib) * 1024;
  }
  return std::nullopt;
}

}  // namespace

size_t pinning_headroom(size_t available_bytes) { return std::min(available_bytes / 20, size_t{1} << 30); }

bool NumaNodeMemory::fits(size_t num_bytes) const {
  return available_bytes && num_bytes + pinning_headroom(*available_bytes) <= *available_bytes;
}

NumaNodeMemory read_numa_node_memory(int node) {
  NumaNodeMemory out;
  if (node < 0) return out;
  const std::string dir =
      env_or("GPUSLEEP_NUMA_NODE_ROOT", "/sys/devices/system/node") + "/node" + std::to_string(node);
  std::ifstream cpulist(dir + "/cpulist");
  std::string cpus;
  out.has_cpus = static_cast<bool>(cpulist >> cpus);  // "0-15,32-47"; empty for a memory-only node
  const std::optional<size_t> mem_free = node_meminfo_field(dir + "/meminfo", "MemFree");
  if (mem_free) out.available_bytes = *mem_free + node_meminfo_field(dir + "/meminfo", "Inactive(file)").value_or(0);
  return out;
}

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

bool HostMemoryBudget::fits(size_t num_bytes) const {
  // Headroom: MemAvailable is an estimate, and pinned pages cannot be reclaimed, so pinning the last of it
  // invites the OOM killer. Keep 5% of what is available, at most 1 GiB.
  const std::optional<size_t> available = available_bytes();
  return !available || num_bytes + pinning_headroom(*available) <= *available;
}

HostMemoryBudget read_host_memory_budget() {
  HostMemoryBudget budget;
  budget.host_available_bytes = read_mem_available(env_or("GPUSLEEP_PROC_MEMINFO", "/proc/meminfo"));
  budget.cgroup_available_bytes = read_cgroup_available(env_or("GPUSLEEP_CGROUP_ROOT", "/sys/fs/cgroup"));
  return budget;
}

void check_host_memory_for_pinning(size_t num_bytes, const std::string& what) {
  const HostMemoryBudget budget = read_host_memory_budget();
  if (budget.fits(num_bytes)) return;
  const size_t available = *budget.available_bytes();
  const size_t headroom = pinning_headroom(available);
  const std::string limit = budget.limited_by();
  throw HostOutOfMemory(
      "pinning " + format_bytes(num_bytes) + " of host memory for " + what + " would exceed what " +
          (limit == "cgroup" ? "this process's cgroup (memory.max - memory.current)" : "the host (MemAvailable)") +
          " allows: " + format_bytes(available) + " (gpusleep keeps " + format_bytes(headroom) + " of it free)" +
          ". Nothing was changed. Free host memory, raise the container's memory limit, offload "
          "fewer tags (sleep(level=1, offload_tags=[...])) or use sleep(level=2).",
      num_bytes, available, limit);
}

}  // namespace gpusleep
