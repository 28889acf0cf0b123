#include "spill_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>

#include "errors.h"
#include "host_tier.h"
#include "host_tier_faults.h"
#include "size_math.h"

namespace gpusleep {
namespace {

std::atomic<uint64_t> g_next_file{0};

[[noreturn]] void throw_io(const std::string& what, int error_number, size_t bytes) {
  if (error_number == ENOSPC || error_number == EDQUOT) {
    throw HostOutOfMemory(what + ": " + std::strerror(error_number) +
                              ". The disk of the host tier 'file' is full: "
                              "nothing was changed. Free disk space, point file_dir at a larger disk, or raise the "
                              "pinned budget.",
                          bytes, std::nullopt, "disk");
  }
  throw HostIOError(what + ": " + (error_number == 0 ? std::string("short transfer") : std::strerror(error_number)) +
                        ". Nothing was changed.",
                    error_number);
}

}  // namespace

SpillFile::SpillFile(const std::string& directory, size_t size_bytes) {
  const std::string path =
      directory + "/gpusleep-" + std::to_string(getpid()) + "-" + std::to_string(g_next_file.fetch_add(1)) + ".seg";
  const int injected = host_tier_fault("file_create");
  if (injected >= 0) throw_io("creating the host copy file " + path, injected, size_bytes);
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw_io("creating the host copy file " + path, errno, size_bytes);
  fd_ = fd;
  direct_fd_ = open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_DIRECT);  // -1 on tmpfs and the like
  unlink(path.c_str());  // from now on the file lives only as long as its descriptors
  size_bytes_ = size_bytes;
  file_bytes_ = round_up(size_bytes, kAlignment);
  if (file_bytes_ == 0) return;
  int result = posix_fallocate(fd_, 0, static_cast<off_t>(file_bytes_));
  if (result == EOPNOTSUPP || result == EINVAL)
    result = ftruncate(fd_, static_cast<off_t>(file_bytes_)) == 0 ? 0 : errno;
  if (result != 0) {
    reset();
    throw_io("allocating " + format_bytes(file_bytes_) + " for the host copy file " + path, result, size_bytes);
  }
}

SpillFile::~SpillFile() { reset(); }

SpillFile::SpillFile(SpillFile&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      direct_fd_(std::exchange(other.direct_fd_, -1)),
      size_bytes_(std::exchange(other.size_bytes_, 0)),
      file_bytes_(std::exchange(other.file_bytes_, 0)) {}

SpillFile& SpillFile::operator=(SpillFile&& other) noexcept {
  if (this != &other) {
    reset();
    fd_ = std::exchange(other.fd_, -1);
    direct_fd_ = std::exchange(other.direct_fd_, -1);
    size_bytes_ = std::exchange(other.size_bytes_, 0);
    file_bytes_ = std::exchange(other.file_bytes_, 0);
  }
  return *this;
}

void SpillFile::reset() noexcept {
  if (direct_fd_ >= 0) close(direct_fd_);
  if (fd_ >= 0) close(fd_);
  fd_ = direct_fd_ = -1;
  size_bytes_ = file_bytes_ = 0;
}

SpillFile::IoPlan SpillFile::plan_io(size_t offset, const char* data, size_t n, size_t room) const noexcept {
  const size_t padded = round_up(n, kAlignment);
  const bool aligned = direct_fd_ >= 0 && offset % kAlignment == 0 &&
                       reinterpret_cast<uintptr_t>(data) % kAlignment == 0 && padded <= room &&
                       offset + padded <= file_bytes_;
  return aligned ? IoPlan{direct_fd_, padded} : IoPlan{fd_, n};
}

void SpillFile::write_at(size_t offset, const char* data, size_t n, size_t room) {
  if (n == 0) return;
  const auto [fd, total] = plan_io(offset, data, n, room);
  for (size_t done = 0; done < total;) {
    const int injected = host_tier_fault("file_write");
    const ssize_t wrote = injected >= 0 ? (errno = injected, injected == 0 ? 0 : -1)
                                        : pwrite(fd, data + done, total - done, static_cast<off_t>(offset + done));
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) throw_io("writing " + format_bytes(total) + " of a host copy file", wrote < 0 ? errno : 0, n);
    done += static_cast<size_t>(wrote);
  }
}

void SpillFile::read_at(size_t offset, char* data, size_t n, size_t room) const {
  if (n == 0) return;
  const auto [fd, total] = plan_io(offset, data, n, room);
  for (size_t done = 0; done < total;) {
    const int injected = host_tier_fault("file_read");
    const ssize_t got = injected >= 0 ? (errno = injected, injected == 0 ? 0 : -1)
                                      : pread(fd, data + done, total - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      const int error_number = got < 0 ? errno : 0;
      throw HostIOError("reading " + format_bytes(total) + " of a host copy file at offset " + std::to_string(offset) +
                            ": " + (error_number == 0 ? std::string("short read") : std::strerror(error_number)),
                        error_number);
    }
    done += static_cast<size_t>(got);
  }
}

size_t remove_stale_spill_files(const std::string& directory) noexcept {
  size_t removed = 0;
  DIR* dir = opendir(directory.c_str());
  if (dir == nullptr) return 0;
  const pid_t self = getpid();
  while (const dirent* entry = readdir(dir)) {
    long pid = 0;
    unsigned long long n = 0;
    int consumed = 0;
    if (std::sscanf(entry->d_name, "gpusleep-%ld-%llu.seg%n", &pid, &n, &consumed) != 2 ||
        entry->d_name[consumed] != '\0' || pid <= 0 || pid == self) {
      continue;
    }
    if (kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // still running (or not ours to judge)
    const std::string path = directory + "/" + entry->d_name;
    struct stat info{};
    if (lstat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode) || info.st_uid != getuid()) continue;
    if (unlink(path.c_str()) == 0) ++removed;
  }
  closedir(dir);
  return removed;
}

void prepare_spill_directory(const std::string& directory) {
  if (directory.empty()) throw InvalidArgument("file_dir must name a directory");
  if (mkdir(directory.c_str(), 0700) != 0 && errno != EEXIST) {
    throw InvalidArgument("file_dir '" + directory + "' cannot be created: " + std::strerror(errno));
  }
  struct stat info{};
  if (stat(directory.c_str(), &info) != 0 || !S_ISDIR(info.st_mode)) {
    throw InvalidArgument("file_dir '" + directory + "' is not a directory");
  }
  if (info.st_uid != getuid()) {  // another user could delete or swap what is written there
    throw InvalidArgument("file_dir '" + directory + "' belongs to another user: use a directory of your own");
  }
  if (access(directory.c_str(), W_OK | X_OK) != 0) {
    throw InvalidArgument("file_dir '" + directory + "' is not writable by this user");
  }
}

}  // namespace gpusleep
