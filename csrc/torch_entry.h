// The pluggable-allocator entry points (see torch_entry.cpp), callable from C++ for the bindings' tests.
#pragma once

#include <sys/types.h>

#include <string>

namespace gpusleep {
void* torch_malloc_entry(ssize_t size, int device, void* stream) noexcept;
void torch_free_entry(void* ptr, ssize_t size, int device, void* stream) noexcept;
// Why the last torch_malloc_entry on this thread returned nullptr.
const std::string& last_torch_error();
}  // namespace gpusleep

extern "C" {
// Loaded by name by torch.cuda.memory.CUDAPluggableAllocator(gpusleep._C.library_path(), ...).
void* gpusleep_torch_malloc(ssize_t size, int device, void* stream);
void gpusleep_torch_free(void* ptr, ssize_t size, int device, void* stream);
}
