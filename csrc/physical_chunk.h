// PhysicalChunk: move-only owner of one cuMemCreate allocation (a CUmemGenericAllocationHandle).
// Released with cuMemRelease on destruction; the driver frees the memory once every mapping of it is gone.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <string>

#include "driver_api.h"
#include "driver_owner.h"
#include "errors.h"

namespace gpusleep {

struct PhysicalChunkTraits {
  static CUresult release(CUmemGenericAllocationHandle handle, size_t) noexcept {
    return GPUSLEEP_CU(cuMemRelease, handle);
  }
  static constexpr const char* kRelease = "cuMemRelease";
};

class PhysicalChunk : public DriverOwner<CUmemGenericAllocationHandle, PhysicalChunkTraits> {
 public:
  PhysicalChunk() = default;
  // Requires a current context. Throws OutOfMemory (with size and device) or CudaError. `rdma_capable`
  // asks for memory that NICs can register (GPUDirect RDMA: NCCL user buffers, KV-transfer stacks); only
  // pass it where the device reports CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED.
  PhysicalChunk(int device, size_t size_bytes, bool rdma_capable) {
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    prop.allocFlags.gpuDirectRDMACapable = rdma_capable ? 1 : 0;
    CUmemGenericAllocationHandle handle = 0;
    const CUresult result = GPUSLEEP_CU(cuMemCreate, &handle, size_bytes, &prop, 0ULL);
    if (result != CUDA_SUCCESS) {
      throw_driver_error("cuMemCreate", format_bytes(size_bytes) + " on device " + std::to_string(device), result,
                         __FILE__, __LINE__, size_bytes, device);
    }
    handle_ = handle;
    size_bytes_ = size_bytes;
  }

  CUmemGenericAllocationHandle handle() const noexcept { return handle_; }
};

}  // namespace gpusleep
