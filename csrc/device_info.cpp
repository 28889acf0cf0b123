#include "device_info.h"

#include "device_context.h"
#include "driver_api.h"
#include "errors.h"

namespace gpusleep {
namespace {

int attribute_or_unknown(int attribute, int device) {
  int value = -1;
  if (GPUSLEEP_CU(cuDeviceGetAttribute, &value, static_cast<CUdevice_attribute>(attribute), device) != CUDA_SUCCESS) {
    return -1;
  }
  return value;
}

size_t granularity(int device, CUmemAllocationGranularity_flags which) {
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  size_t bytes = 0;
  return GPUSLEEP_CU(cuMemGetAllocationGranularity, &bytes, &prop, which) == CUDA_SUCCESS ? bytes : 0;
}

}  // namespace

int device_count() {
  int count = 0;
  GPUSLEEP_CU_CHECK(cuDeviceGetCount, "", &count);
  return count;
}

DeviceInfoRecord device_info(int device) {
  const int count = device_count();
  if (device < 0 || device >= count) {
    throw InvalidArgument("device " + std::to_string(device) + " does not exist: this machine has " +
                          std::to_string(count) + " CUDA device(s)");
  }
  DeviceInfoRecord info;
  info.device = device;
  GPUSLEEP_CU_CHECK(cuDriverGetVersion, "", &info.driver_version);
  char name[256] = {};
  if (GPUSLEEP_CU(cuDeviceGetName, name, static_cast<int>(sizeof(name)), device) == CUDA_SUCCESS) info.name = name;
  info.compute_capability_major = attribute_or_unknown(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
  info.compute_capability_minor = attribute_or_unknown(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
  info.vmm_supported = attribute_or_unknown(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device);
  // The numbers, not the names: cuda.h before 12.2 lacks some of them, and older drivers refuse the query.
  info.rdma_with_vmm_supported = attribute_or_unknown(110, device);
  info.host_register_supported = attribute_or_unknown(99, device);
  info.host_numa_node = attribute_or_unknown(134, device);
  unsigned int flags = 0;
  int active = 0;
  if (GPUSLEEP_CU(cuDevicePrimaryCtxGetState, static_cast<CUdevice>(device), &flags, &active) == CUDA_SUCCESS) {
    info.primary_context_was_active = active == 1;
  }
  for (int peer = 0; peer < count && driver().cuDeviceCanAccessPeer != nullptr; ++peer) {
    int can_access = 0;
    if (peer != device && GPUSLEEP_CU(cuDeviceCanAccessPeer, &can_access, peer, device) == CUDA_SUCCESS &&
        can_access == 1) {
      info.peers.push_back(peer);
    }
  }
  {
    PrimaryContext context(device);  // released at the end of the block: the query leaves no context behind
    CUcontext previous = nullptr;
    GPUSLEEP_CU_CHECK(cuCtxGetCurrent, "", &previous);
    GPUSLEEP_CU_CHECK(cuCtxSetCurrent, "primary context of device " + std::to_string(device), context.get());
    const CUresult result = GPUSLEEP_CU(cuMemGetInfo, &info.free_bytes, &info.total_bytes);
    info.granularity_minimum_bytes = granularity(device, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    info.granularity_recommended_bytes = granularity(device, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
    GPUSLEEP_CU(cuCtxSetCurrent, previous);
    if (result != CUDA_SUCCESS)
      throw_driver_error("cuMemGetInfo", "device " + std::to_string(device), result, __FILE__, __LINE__);
  }
  return info;
}

}  // namespace gpusleep
