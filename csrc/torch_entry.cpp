// The C entry points PyTorch's CUDAPluggableAllocator loads from this shared object by name.
//
// They route to the Allocator installed with Allocator::set_torch_mode (torch_backend()). They never
// take the GIL and never call into Python (docs/invariants.md, invariant 5). On failure the reason is kept per
// thread (gpusleep._C.last_torch_error()) and:
// - in pool mode malloc returns nullptr: PyTorch's caching allocator, which owns the MemPool, turns that
//   into its own torch.OutOfMemoryError;
// - in global mode malloc throws. Note [Global-mode allocation failure]: CUDAPluggableAllocator::allocate
//   does not check the pointer it gets back, so a nullptr would become a tensor at address 0 and the next
//   kernel would raise a sticky illegal-address error that ends the process's use of the GPU. A C++
//   exception instead unwinds into PyTorch, which raises a RuntimeError with our message and keeps the
//   process healthy. This is the one deliberate exception to invariant 5's "return nullptr".
// free never throws.
#include "torch_entry.h"

#include <cuda.h>
#include <sys/types.h>

#include <exception>
#include <optional>
#include <string>

#include "allocator.h"
#include "errors.h"

namespace gpusleep {
namespace {
thread_local std::string t_last_torch_error;
thread_local std::optional<size_t> t_last_free_bytes;  // measured by the last OutOfMemory on this thread
}  // namespace

const std::string& last_torch_error() { return t_last_torch_error; }

void* torch_malloc_entry(ssize_t size, int device, void* stream) noexcept {
  t_last_free_bytes.reset();
  try {
    Allocator* allocator = torch_backend();
    if (allocator == nullptr) {
      t_last_torch_error = "no gpusleep.Allocator is installed as PyTorch's allocator (it was closed?)";
      return nullptr;
    }
    if (size < 0) {
      t_last_torch_error = "negative allocation size";
      return nullptr;
    }
    return reinterpret_cast<void*>(
        allocator->torch_malloc(static_cast<size_t>(size), device, static_cast<CUstream>(stream)));
  } catch (const OutOfMemory& error) {
    t_last_torch_error = error.what();
    t_last_free_bytes = error.bytes_free();
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

namespace gpusleep {
namespace {
bool malloc_failure_throws() {
  Allocator* allocator = torch_backend();
  return allocator != nullptr ? allocator->torch_mode() == TorchMode::kGlobal : global_mode_installed();
}
}  // namespace
}  // namespace gpusleep

extern "C" {
__attribute__((visibility("default"))) void* gpusleep_torch_malloc(ssize_t size, int device, void* stream) {
  void* ptr = gpusleep::torch_malloc_entry(size, device, stream);
  if (ptr == nullptr && gpusleep::malloc_failure_throws()) {
    throw gpusleep::OutOfMemory("gpusleep could not allocate " + gpusleep::format_bytes(static_cast<size_t>(size)) +
                                    " on device " + std::to_string(device) + ": " + gpusleep::last_torch_error(),
                                static_cast<size_t>(size), gpusleep::t_last_free_bytes, device);
  }
  return ptr;
}

__attribute__((visibility("default"))) void gpusleep_torch_free(void* ptr, ssize_t size, int device, void* stream) {
  gpusleep::torch_free_entry(ptr, size, device, stream);
}
}
