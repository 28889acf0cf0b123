// Small helpers the Allocator's source files share (allocator.cpp, transition_scope.cpp, sleep_transaction.cpp,
// wake_transaction.cpp, and device_wait.cpp's timeout message): how messages spell tag lists and seconds, and the
// clock reports are timed with.
#pragma once

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace gpusleep {
namespace detail {

// ['a', 'b']
inline std::string join_tags(const std::vector<std::string>& tags) {
  std::string out = "[";
  for (size_t i = 0; i < tags.size(); ++i) out += (i ? ", '" : "'") + tags[i] + "'";
  return out + "]";
}

inline std::string format_seconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", seconds);
  return text;
}

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace detail
}  // namespace gpusleep
