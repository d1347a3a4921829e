// An LD_PRELOAD interposer that makes the disk fail for tests/harden/train_gpt/disk_faults.sh:
// TESSERA_FAIL="pwrite:N:ENOSPC" (or "fsync:N:EIO") makes the N-th call (counted from 1) of that
// function on a file whose path contains TESSERA_FAIL_PATH, and every later one, fail with that
// errno. Everything else goes to the C library.
// Both pwrite and pwrite64 are defined here: without the 64-bit redirection of the headers.
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {
std::atomic<long> calls{0};

// Whether this call of `fn` on `fd` is to fail; sets errno.
bool fail_now(const char* fn, int fd) {
  const char* spec = std::getenv("TESSERA_FAIL");
  const char* path = std::getenv("TESSERA_FAIL_PATH");
  if (spec == nullptr || path == nullptr) return false;
  const std::size_t len = std::strlen(fn);
  if (std::strncmp(spec, fn, len) != 0 || spec[len] != ':') return false;
  char link[64], target[4096];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  const ssize_t n = ::readlink(link, target, sizeof target - 1);
  if (n <= 0) return false;
  target[n] = '\0';
  if (std::strstr(target, path) == nullptr) return false;
  const long nth = std::strtol(spec + len + 1, nullptr, 10);
  if (calls.fetch_add(1) + 1 < nth) return false;
  errno = std::strstr(spec, ":EIO") != nullptr ? EIO : ENOSPC;
  return true;
}
}  // namespace

extern "C" ssize_t pwrite(int fd, const void* buf, size_t count, off_t offset) {
  using Fn = ssize_t (*)(int, const void*, size_t, off_t);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pwrite"));
  if (fail_now("pwrite", fd)) return -1;
  return real(fd, buf, count, offset);
}

extern "C" ssize_t pwrite64(int fd, const void* buf, size_t count, off_t offset) {
  using Fn = ssize_t (*)(int, const void*, size_t, off_t);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pwrite64"));
  if (fail_now("pwrite", fd)) return -1;
  return real(fd, buf, count, offset);
}

extern "C" int fsync(int fd) {
  using Fn = int (*)(int);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "fsync"));
  if (fail_now("fsync", fd)) return -1;
  return real(fd);
}
