// DeviceInfo: what a machine's driver and GPUs offer gpusleep, queried without allocating anything (for
// `gpusleep doctor` and bug reports).
//
// Each query holds the device's primary context only while it runs (cuMemGetInfo needs one); attributes a
// driver does not know are reported as -1 rather than guessed. Thread-safe: it keeps no state.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace gpusleep {

struct DeviceInfoRecord {
  int device = 0;
  std::string name;
  int driver_version = 0;            // cuDriverGetVersion: 12040 is CUDA 12.4
  int compute_capability_major = -1;
  int compute_capability_minor = -1;
  size_t total_bytes = 0;            // cuMemGetInfo with the primary context current
  size_t free_bytes = 0;
  int vmm_supported = -1;            // CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
  size_t granularity_minimum_bytes = 0;
  size_t granularity_recommended_bytes = 0;
  int rdma_with_vmm_supported = -1;  // 110: GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED
  int host_register_supported = -1;  // 99: HOST_REGISTER_SUPPORTED
  int host_numa_node = -1;           // 134: HOST_NUMA_ID (-1: none or unknown)
  bool primary_context_was_active = false;  // before this query (another library, or this process, holds it)
  std::vector<int> peers;            // devices that can access this one's memory (cuDeviceCanAccessPeer)
};

int device_count();  // cuDeviceGetCount; throws DriverUnavailable without a driver
DeviceInfoRecord device_info(int device);

}  // namespace gpusleep
