// SpillFile: move-only owner of the file that holds one host copy of the "file" tier (Note [Host tiers] in
// host_copy.h).
//
// The file is created in the configured directory as gpusleep-<pid>-<n>.seg, private to the user (0600, O_EXCL,
// O_NOFOLLOW), opened a second time with O_DIRECT where the file system allows it, then unlinked at once: it
// lives only as long as its descriptors, so a wake, a drop, close() or the process's death frees its blocks.
// Its whole size is allocated up front (fallocate), so a full disk fails the creation, before any copy, rather
// than a write half-way. Large aligned I/O (offset, length and buffer 4 KiB-aligned, from the staging ring) uses
// the O_DIRECT descriptor, bypassing the page cache that would otherwise hold a second copy of the weights in
// host memory; anything else uses the buffered one. remove_stale_spill_files() deletes the files a process
// killed between the create and the unlink left behind.
#pragma once

#include <cstddef>
#include <string>

namespace gpusleep {

class SpillFile {
 public:
  static constexpr size_t kAlignment = 4096;

  SpillFile() = default;
  // Creates the file in `directory` with room for `size_bytes` (rounded up to kAlignment). Throws HostOutOfMemory
  // (limited_by "disk") when the disk is full, HostIOError otherwise.
  SpillFile(const std::string& directory, size_t size_bytes);
  ~SpillFile();
  SpillFile(SpillFile&& other) noexcept;
  SpillFile& operator=(SpillFile&& other) noexcept;
  SpillFile(const SpillFile&) = delete;
  SpillFile& operator=(const SpillFile&) = delete;

  // Writes / reads `n` bytes at `offset`. `room` (>= n) is how many bytes `data` may hold: where the offset and the
  // buffer are aligned and the padded length fits both `room` and the file, the I/O is padded to kAlignment and goes
  // through O_DIRECT. Throws HostOutOfMemory (disk full) or HostIOError (an error, or a short read or write).
  void write_at(size_t offset, const char* data, size_t n, size_t room);
  void read_at(size_t offset, char* data, size_t n, size_t room) const;

  size_t size_bytes() const noexcept { return size_bytes_; }
  bool owns() const noexcept { return fd_ >= 0; }
  bool direct() const noexcept { return direct_fd_ >= 0; }

 private:
  // Which descriptor an I/O of n bytes at `offset` from/to `data` goes through, and how many bytes it moves: the
  // O_DIRECT one, padded to kAlignment, when the offset, the buffer and the padded length allow it.
  struct IoPlan {
    int fd;
    size_t total_bytes;
  };
  IoPlan plan_io(size_t offset, const char* data, size_t n, size_t room) const noexcept;
  void reset() noexcept;
  int fd_ = -1;         // buffered
  int direct_fd_ = -1;  // O_DIRECT, -1 where the file system refuses it
  size_t size_bytes_ = 0;
  size_t file_bytes_ = 0;  // size_bytes_ rounded up to kAlignment
};

// Deletes the spill files in `directory` left by processes that no longer run (created by this user). Returns how
// many it deleted. Never throws.
size_t remove_stale_spill_files(const std::string& directory) noexcept;

// Creates `directory` (0700) if it does not exist; InvalidArgument if it is not a writable directory.
void prepare_spill_directory(const std::string& directory);

}  // namespace gpusleep
