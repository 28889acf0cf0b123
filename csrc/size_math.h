// Size arithmetic that cannot overflow silently. A size that does not survive rounding up (allocate(2**64 - 1))
// is refused with InvalidArgument instead of wrapping around to a tiny or zero-byte allocation.
#pragma once

#include <cstddef>
#include <limits>
#include <string>

#include "errors.h"

namespace gpusleep {

// `value` rounded up to a multiple of `multiple` (> 0). Throws InvalidArgument if the result does not fit.
inline size_t round_up_checked(size_t value, size_t multiple, const char* what) {
  const size_t remainder = value % multiple;
  if (remainder == 0) return value;
  if (value > std::numeric_limits<size_t>::max() - (multiple - remainder)) {
    throw InvalidArgument(std::string(what) + ": " + std::to_string(value) +
                          " bytes is too large (rounding it up to a multiple of " + std::to_string(multiple) +
                          " bytes overflows)");
  }
  return value + (multiple - remainder);
}

// For sizes already known to fit (checked once where they enter the core).
inline size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace gpusleep
