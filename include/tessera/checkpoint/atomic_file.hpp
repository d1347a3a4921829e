#pragma once
/// @file
/// AtomicFile: a file that appears under its final name complete or not at all (write to a
/// temporary file, fsync it, rename it over the final name, fsync the directory), so a process
/// killed while saving leaves the previous file in place.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include "tessera/core/error.hpp"

namespace tessera::checkpoint {

namespace detail {
/// "strerror(errno) (errno N)" for error messages.
inline std::string errno_text(int err) { return tessera::detail::str(std::strerror(err), " (errno ", err, ")"); }

/// A name unique in this process: `<pid>-<counter>`.
inline std::string unique_suffix() {
  static std::atomic<std::uint64_t> counter{0};
  return tessera::detail::str(::getpid(), "-", counter.fetch_add(1));
}
}  // namespace detail

/// Flushes a directory's entries (new, renamed or removed files) to stable storage (POSIX:
/// a rename is durable only once its directory is fsynced). Throws tessera::Error naming the
/// directory when it cannot be opened or synced.
inline void fsync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  TESSERA_EXPECTS(fd >= 0, "fsync_directory: cannot open ", dir, ": ", detail::errno_text(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  TESSERA_EXPECTS(rc == 0, "fsync_directory: fsync of ", dir, " failed: ", detail::errno_text(err));
}

/// A file written under a temporary name `<final>.tmp-<pid>-<n>` in the final file's
/// directory, which `commit()` makes durable and renames to the final name (replacing any file
/// there atomically). Destroyed without commit, it removes the temporary file. Move-only.
///
/// Every method throws tessera::Error naming the file and the system error on failure.
class AtomicFile {
 public:
  /// Creates the temporary file next to `final_path` (whose directory must exist).
  explicit AtomicFile(std::filesystem::path final_path)
      : final_(std::move(final_path)), tmp_(final_.string() + ".tmp-" + detail::unique_suffix()) {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    TESSERA_EXPECTS(fd_ >= 0, "AtomicFile: cannot create ", tmp_, ": ", detail::errno_text(errno));
  }
  AtomicFile(const AtomicFile&) = delete;             ///< owns a file descriptor
  AtomicFile& operator=(const AtomicFile&) = delete;  ///< owns a file descriptor
  /// Takes over the temporary file.
  AtomicFile(AtomicFile&& o) noexcept
      : final_(std::move(o.final_)), tmp_(std::move(o.tmp_)), fd_(std::exchange(o.fd_, -1)),
        size_(o.size_), committed_(o.committed_) {
    o.committed_ = true;
  }
  AtomicFile& operator=(AtomicFile&&) = delete;  ///< not needed
  /// Removes the temporary file unless committed.
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }

  /// Appends `bytes` at the end of what was written so far.
  void write(std::span<const std::byte> bytes) {
    write_at(bytes, size_);
    size_ += bytes.size();
  }
  /// Writes `bytes` at byte `offset` (e.g. to fill in a header reserved earlier); the file
  /// grows if needed but the append position is unchanged.
  void write_at(std::span<const std::byte> bytes, std::uint64_t offset) {
    TESSERA_EXPECTS(fd_ >= 0, "AtomicFile: ", final_, " is already committed");
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ::ssize_t n = ::pwrite(fd_, bytes.data() + done, bytes.size() - done,
                                   static_cast<::off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      TESSERA_EXPECTS(n > 0, "AtomicFile: writing ", bytes.size() - done, " bytes at offset ", offset + done,
                      " of ", tmp_, " failed: ", detail::errno_text(errno));
      done += static_cast<std::size_t>(n);
    }
  }
  /// Bytes appended so far.
  std::uint64_t size() const noexcept { return size_; }
  /// The name the file gets on commit.
  const std::filesystem::path& final_path() const noexcept { return final_; }

  /// fsync the file, close it, rename it to the final name and fsync the directory.
  void commit() {
    TESSERA_EXPECTS(fd_ >= 0, "AtomicFile: ", final_, " is already committed");
    TESSERA_EXPECTS(::fsync(fd_) == 0, "AtomicFile: fsync of ", tmp_, " failed: ", detail::errno_text(errno));
    const int rc = ::close(std::exchange(fd_, -1));
    TESSERA_EXPECTS(rc == 0, "AtomicFile: close of ", tmp_, " failed: ", detail::errno_text(errno));
    TESSERA_EXPECTS(::rename(tmp_.c_str(), final_.c_str()) == 0, "AtomicFile: rename of ", tmp_, " to ", final_,
                    " failed: ", detail::errno_text(errno));
    committed_ = true;
    fsync_directory(final_.has_parent_path() ? final_.parent_path() : std::filesystem::path("."));
  }

 private:
  std::filesystem::path final_, tmp_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  bool committed_ = false;
};

}  // namespace tessera::checkpoint
