#include "host_tier_faults.h"

#include <atomic>
#include <map>
#include <mutex>

#include "errors.h"

namespace gpusleep {
namespace {

struct Armed {
  int countdown = 0;
  int error_number = 0;
};

std::mutex g_mutex;
std::map<std::string, Armed> g_armed;
std::atomic<bool> g_any{false};

}  // namespace

void fail_host_tier_call(const std::string& call, int nth, int error_number) {
  if (call != "file_write" && call != "file_read" && call != "file_create" && call != "pageable_alloc") {
    throw InvalidArgument("fail_host_tier_call: unknown call '" + call +
                          "': use file_write, file_read, file_create or pageable_alloc");
  }
  if (nth < 1) throw InvalidArgument("fail_host_tier_call: nth must be >= 1");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_armed[call] = Armed{nth, error_number};
  g_any = true;
}

void clear_host_tier_faults() noexcept {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_armed.clear();
  g_any = false;
}

int host_tier_fault(const char* call) noexcept {
  if (!g_any.load(std::memory_order_relaxed)) return -1;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_armed.find(call);
  if (it == g_armed.end() || --it->second.countdown > 0) return -1;
  const int error_number = it->second.error_number;
  g_armed.erase(it);
  g_any = !g_armed.empty();
  return error_number;
}

}  // namespace gpusleep
