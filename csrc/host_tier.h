// HostTier: where a level-1 sleep keeps a segment's host copy (Note [Host tiers] in host_copy.h).
#pragma once

#include <stdexcept>
#include <string>

#include "errors.h"

namespace gpusleep {

enum class HostTier { kPinned, kPageable, kFile };

inline const char* host_tier_name(HostTier tier) {
  switch (tier) {
    case HostTier::kPinned: return "pinned";
    case HostTier::kPageable: return "pageable";
    case HostTier::kFile: return "file";
  }
  return "?";
}

inline HostTier parse_host_tier(const std::string& name) {
  if (name == "pinned") return HostTier::kPinned;
  if (name == "pageable") return HostTier::kPageable;
  if (name == "file") return HostTier::kFile;
  throw InvalidArgument("unknown host tier '" + name + "': use 'pinned', 'pageable' or 'file'");
}

}  // namespace gpusleep

namespace gpusleep {

// A system call of a pageable or file host copy failed (other than running out of memory or disk space, which are
// HostOutOfMemory): Python sees OSError with this errno (0: a short read or write).
class HostIOError : public std::runtime_error {
 public:
  HostIOError(const std::string& message, int error_number)
      : std::runtime_error(message), error_number_(error_number) {}
  int error_number() const noexcept { return error_number_; }

 private:
  int error_number_;
};

}  // namespace gpusleep
