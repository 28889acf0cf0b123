// Stream-capture queries the allocator needs: is a stream capturing a CUDA graph, and under which id.
//
// Both are queries, allowed during a capture in every interaction mode (cuda-vmm-rules.md section 12).
#pragma once

#include <cuda.h>

#include <cstdint>

namespace gpusleep {

// A nonzero id while `stream` is capturing a CUDA graph, else 0. Different captures get different ids,
// so that blocks of one capture's pool are never handed to a later capture.
uint64_t capture_id_of(CUstream stream);

}  // namespace gpusleep
