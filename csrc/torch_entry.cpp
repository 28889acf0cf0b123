// The C entry points PyTorch's CUDAPluggableAllocator loads from this shared object by name.
//
// They route to the Allocator installed with Allocator::set_torch_mode (torch_backend()). They never
// throw, never take the GIL and never call into Python (DESIGN.md invariant 5): on any failure they
// return nullptr, and PyTorch raises its own out-of-memory error. The reason is kept per thread and can
// be read with gpusleep._C.last_torch_error().
#include <cuda.h>
#include <sys/types.h>

#include <exception>
#include <string>

#include "allocator.h"
#include "torch_entry.h"

namespace gpusleep {
namespace {
thread_local std::string t_last_torch_error;
}

const std::string& last_torch_error() { return t_last_torch_error; }

void* torch_malloc_entry(ssize_t size, int device, void* stream) noexcept {
  try {
    Allocator* allocator = torch_backend();
    if (allocator == nullptr) {
      t_last_torch_error = "no gpusleep.Allocator is installed as PyTorch's allocator";
      return nullptr;
    }
    if (size < 0) {
      t_last_torch_error = "negative allocation size";
      return nullptr;
    }
    return reinterpret_cast<void*>(
        allocator->torch_malloc(static_cast<size_t>(size), device, static_cast<CUstream>(stream)));
  } catch (const std::exception& error) {
    t_last_torch_error = error.what();
  } catch (...) {
    t_last_torch_error = "unknown error";
  }
  return nullptr;
}

void torch_free_entry(void* ptr, ssize_t /*size*/, int /*device*/, void* /*stream*/) noexcept {
  try {
    Allocator* allocator = torch_backend();
    if (allocator != nullptr && ptr != nullptr) allocator->torch_free(reinterpret_cast<CUdeviceptr>(ptr));
  } catch (const std::exception& error) {
    t_last_torch_error = error.what();
  } catch (...) {
    t_last_torch_error = "unknown error";
  }
}

}  // namespace gpusleep

extern "C" {
__attribute__((visibility("default"))) void* gpusleep_torch_malloc(ssize_t size, int device, void* stream) {
  return gpusleep::torch_malloc_entry(size, device, stream);
}

__attribute__((visibility("default"))) void gpusleep_torch_free(void* ptr, ssize_t size, int device, void* stream) {
  gpusleep::torch_free_entry(ptr, size, device, stream);
}
}
