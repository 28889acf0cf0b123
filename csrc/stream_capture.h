// Stream-capture queries the allocator needs: is a stream capturing a CUDA graph, and under which id.
//
// Both are queries, allowed during a capture in every interaction mode (docs/driver-rules.md section 12).
//
// The id comes from the driver's capture-info query, resolved by its versioned symbol: cuStreamGetCaptureInfo_v3
// (drivers >= 12.3), else cuStreamGetCaptureInfo_v2 (drivers >= 11.3); both report the capture's own id, unique
// per process. A driver with neither only says "capturing or not" (cuStreamIsCapturing), which cannot tell two
// consecutive captures on one stream apart: nothing guarantees that a query sees the stream idle between them.
// There every query of a capturing stream gets a fresh id, so no block is ever shared between captures; the
// price, on such drivers only, is that a capture reuses none of the blocks it frees (more graph memory).
#pragma once

#include <cuda.h>

#include <cstdint>

namespace gpusleep {

// A nonzero id while `stream` is capturing a CUDA graph, else 0. Different captures get different ids,
// so that blocks of one capture's pool are never handed to a later capture.
uint64_t capture_id_of(CUstream stream);

// True where the driver has no capture-info query: capture_id_of then gives every query of a capturing stream a
// new id, so one capture cannot be recognised by its id (only by its stream).
bool capture_ids_are_per_query();

}  // namespace gpusleep
