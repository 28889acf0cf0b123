#include "pageable_host_buffer.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "errors.h"
#include "host_memory_budget.h"
#include "host_tier_faults.h"

namespace gpusleep {

PageableHostBuffer::PageableHostBuffer(size_t size_bytes) {
  if (size_bytes == 0) return;
  const int injected = host_tier_fault("pageable_alloc");
  void* data = injected >= 0 ? MAP_FAILED
                             : mmap(nullptr, size_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (data == MAP_FAILED) {
    const int error_number = injected >= 0 ? injected : errno;
    throw HostOutOfMemory("mmap of " + format_bytes(size_bytes) +
                              " of pageable host memory for a host copy failed: " + std::strerror(error_number) +
                              ". Nothing was changed. Free host memory, or give the "
                              "tag the 'file' tier (set_policy(..., host_tier='file')).",
                          size_bytes, read_host_memory_budget().available_bytes(), "mmap");
  }
  madvise(data, size_bytes, MADV_DONTFORK);  // best effort: a child never needs the copy
  madvise(data, size_bytes, MADV_DONTDUMP);
  data_ = static_cast<char*>(data);
  size_bytes_ = size_bytes;
}

PageableHostBuffer::~PageableHostBuffer() { reset(); }

PageableHostBuffer::PageableHostBuffer(PageableHostBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_bytes_(std::exchange(other.size_bytes_, 0)) {}

PageableHostBuffer& PageableHostBuffer::operator=(PageableHostBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    size_bytes_ = std::exchange(other.size_bytes_, 0);
  }
  return *this;
}

void PageableHostBuffer::reset() noexcept {
  if (data_ != nullptr) munmap(data_, size_bytes_);
  data_ = nullptr;
  size_bytes_ = 0;
}

}  // namespace gpusleep
