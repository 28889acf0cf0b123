// Primary contexts and the per-thread current context.
//
// Every driver call that needs a context runs under a ScopedDeviceContext, which makes the device's primary
// context (the one PyTorch and the runtime API use too) current on the calling thread and restores the
// previous one on exit. The driver's current context is per thread, so this is what makes the core
// callable from any thread, PyTorch's allocator threads included.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <vector>

namespace gpusleep {

// Owns one retain of a device's primary context; released (cuDevicePrimaryCtxRelease) on destruction.
class PrimaryContext {
 public:
  explicit PrimaryContext(int device);
  ~PrimaryContext();  // a refusal here is only counted (note_teardown_failure): use try_release() first
  // Releases the retain; on failure nothing changes (still owned) and the driver's code is returned.
  CUresult try_release() noexcept;
  PrimaryContext(PrimaryContext&& other) noexcept;
  PrimaryContext& operator=(PrimaryContext&&) = delete;
  PrimaryContext(const PrimaryContext&) = delete;
  PrimaryContext& operator=(const PrimaryContext&) = delete;

  CUcontext get() const noexcept { return context_; }
  int device() const noexcept { return device_; }

 private:
  int device_;
  CUdevice cu_device_ = 0;
  CUcontext context_ = nullptr;
};

// The primary contexts an allocator uses, retained lazily, each only when a call needs that device: using
// cuda:3 retains GPU 3's context and no other (a stray context costs hundreds of MiB of that GPU's memory
// and fails outright in EXCLUSIVE_PROCESS mode; docs/invariants.md, invariant 8). Thread-safe.
class DeviceContexts {
 public:
  CUcontext get(int device);
  int device_count();
  // The devices whose context this object has retained, in ascending order.
  std::vector<int> retained_devices();
  // Releases every retained context (the allocator holds nothing on any device any more). A context whose
  // release the driver refuses stays retained and owned here, counted in releases_pending() and
  // release_refusals(), and the next release_all() tries it again (Note [Refused releases]).
  void release_all();
  // Contexts whose release was refused and that are still retained.
  size_t releases_pending();
  // Refused cuDevicePrimaryCtxRelease calls since construction.
  uint64_t release_refusals() const noexcept { return release_refusals_; }

 private:
  std::mutex mutex_;
  std::map<int, PrimaryContext> contexts_;  // by device ordinal
  std::set<int> release_refused_;           // devices whose context release was refused, still retained
  uint64_t release_refusals_ = 0;
  int device_count_ = -1;
};

// Makes `device`'s primary context current on this thread for the scope; restores the previous one.
class ScopedDeviceContext {
 public:
  ScopedDeviceContext(DeviceContexts& contexts, int device);
  ~ScopedDeviceContext();
  ScopedDeviceContext(const ScopedDeviceContext&) = delete;
  ScopedDeviceContext& operator=(const ScopedDeviceContext&) = delete;

 private:
  CUcontext previous_ = nullptr;
  bool switched_ = false;
};

// While alive, this thread's stream-capture interaction mode is RELAXED, so that VMM calls made by the
// allocator during a CUDA graph capture do not invalidate the capture (PyTorch does the same around
// cudaMalloc). Restores the previous mode.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode();
  ~RelaxedCaptureMode();
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  CUstreamCaptureMode previous_ = CU_STREAM_CAPTURE_MODE_RELAXED;
  bool active_ = false;
};

}  // namespace gpusleep
