// Injected failures of the host tiers' own system calls, for the tests (the driver double injects the driver's).
//
// fail_host_tier_call("file_write", 2, ENOSPC) makes the second file write from now fail with ENOSPC (a full
// disk); "file_read" with 0 as errno makes a read come back short (end of file); "file_create" and
// "pageable_alloc" fail the creation of a spill file or a pageable buffer. Each injection fires once.
// Thread-safe; costs one relaxed atomic load per call when nothing is armed.
#pragma once

#include <string>

namespace gpusleep {

void fail_host_tier_call(const std::string& call, int nth, int error_number);
void clear_host_tier_faults() noexcept;
// Called by the tiers before each system call: -1 when the call goes ahead, else the errno to fail it with (0: a
// short read or write).
int host_tier_fault(const char* call) noexcept;

}  // namespace gpusleep
