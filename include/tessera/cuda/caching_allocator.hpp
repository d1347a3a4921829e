#pragma once
/// @file
/// CachingAllocator: device memory for tensors without cudaMalloc in the step loop. Freed blocks
/// are kept, per stream and rounded size, and handed out again (PyTorch's CUDA caching allocator
/// does the same); live and peak bytes are counted for the memory report. Host code (no nvcc).

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device.hpp"

namespace tessera::cuda {

/// Where device memory comes from, for DeviceTensor: allocate `bytes` for work ordered on
/// `stream`, and take a block back once that stream's work with it is queued.
class MemoryResource {
 public:
  virtual ~MemoryResource() = default;
  /// A block of at least `bytes` bytes (256-byte aligned), for use on `stream`. Throws
  /// OutOfDeviceMemory naming the sizes when the device has no room.
  virtual void* allocate(std::size_t bytes, cudaStream_t stream) = 0;
  /// Returns a block from allocate(bytes, stream). Work queued on `stream` before this call may
  /// still use it: the block is only handed out again for work on the same stream.
  virtual void deallocate(void* p, std::size_t bytes, cudaStream_t stream) noexcept = 0;
};

/// cudaMalloc / cudaFree on the current device: the raw memory under CachingAllocator.
struct CudaRawMemory {
  /// cudaMalloc(bytes); nullptr when the device is out of memory; throws CudaError for any other
  /// failure (no device, a sticky error from an earlier kernel).
  void* allocate(std::size_t bytes) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      return nullptr;
    }
    detail::check(e, "cudaMalloc", "cuda::CudaRawMemory::allocate(", bytes, " bytes)");
    return p;
  }
  /// cudaFree(p) (which waits for the device's queued work).
  void deallocate(void* p) noexcept { (void)cudaFree(p); }
  /// "free F of T bytes on device D", for out-of-memory messages; never throws.
  std::string describe() const {
    std::size_t f = 0, t = 0;
    int d = -1;
    if (cudaGetDevice(&d) != cudaSuccess || cudaMemGetInfo(&f, &t) != cudaSuccess) {
      (void)cudaGetLastError();
      return "device memory unknown";
    }
    return tessera::detail::str("device ", d, " has ", f, " of ", t, " bytes free");
  }
};

/// What a CachingAllocator holds and has done, in bytes and counts.
struct AllocatorStats {
  std::size_t allocated_bytes = 0;       ///< in blocks handed out and not yet returned (rounded sizes)
  std::size_t reserved_bytes = 0;        ///< taken from the raw memory: allocated + cached
  std::size_t peak_allocated_bytes = 0;  ///< the most allocated_bytes since construction or reset_peak()
  std::size_t peak_reserved_bytes = 0;   ///< the most reserved_bytes since construction or reset_peak()
  std::int64_t requests = 0;             ///< allocate() calls
  std::int64_t raw_allocations = 0;      ///< calls to the raw memory's allocate (cudaMalloc)
  std::int64_t raw_frees = 0;            ///< calls to the raw memory's deallocate (cudaFree)
  std::int64_t cache_hits = 0;           ///< requests served from cached blocks
};

/// A caching allocator over `RawMemory` (CudaRawMemory: cudaMalloc / cudaFree; tests use host
/// memory). Sizes are rounded (to 512 bytes below 1 MiB, to 2 MiB above); a freed block goes to
/// its stream's cache and serves a later request on that stream of a rounded size between its
/// own half and its own. When the raw memory is exhausted the cache is released and the
/// request retried once; then OutOfDeviceMemory names the request, the allocator's bytes and
/// the device's. Thread-safe (ranks as threads share one device in tests).
template <class RawMemory = CudaRawMemory>
class CachingAllocator final : public MemoryResource {
 public:
  /// Smallest granule: every size is rounded up to a multiple of this (512 bytes).
  static constexpr std::size_t small_granule = 512;
  /// Requests of at least this many bytes (1 MiB) are rounded to large_granule.
  static constexpr std::size_t large_threshold = std::size_t{1} << 20;
  /// Granule of large requests (2 MiB).
  static constexpr std::size_t large_granule = std::size_t{2} << 20;

  /// An allocator drawing on `raw`.
  explicit CachingAllocator(RawMemory raw = RawMemory{}) : raw_(std::move(raw)) {}
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;
  /// Returns every cached block to the raw memory (blocks still handed out are leaked by design:
  /// a tensor outliving its allocator is a bug of the caller's).
  ~CachingAllocator() override { empty_cache(); }

  /// The size a request of `bytes` is rounded to.
  static constexpr std::size_t round_size(std::size_t bytes) noexcept {
    if (bytes == 0) bytes = 1;
    const std::size_t g = bytes < large_threshold ? small_granule : large_granule;
    return (bytes + g - 1) / g * g;
  }

  /// A block of at least `bytes` for work on `stream`; see the class comment. Throws
  /// OutOfDeviceMemory, or CudaError for another raw-memory failure.
  void* allocate(std::size_t bytes, cudaStream_t stream) override {
    const std::size_t size = round_size(bytes);
    std::lock_guard lock(mu_);
    ++stats_.requests;
    auto it = cache_.lower_bound(Key{stream, size});
    if (it != cache_.end() && it->first.stream == stream && it->first.size <= 2 * size) {
      void* p = it->second;
      const std::size_t got = it->first.size;
      cache_.erase(it);
      live_.emplace(p, got);
      ++stats_.cache_hits;
      add_allocated(got);
      return p;
    }
    void* p = raw_.allocate(size);
    if (p == nullptr) {
      release_cache_locked();
      p = raw_.allocate(size);
    }
    if (p == nullptr)
      throw OutOfDeviceMemory(tessera::detail::str(
          "cuda: out of device memory allocating ", bytes, " bytes (rounded to ", size, "); the allocator has ",
          stats_.allocated_bytes, " bytes in live tensors (peak ", stats_.peak_allocated_bytes, ") and ",
          stats_.reserved_bytes - stats_.allocated_bytes, " cached, released and retried; ", describe_raw()));
    ++stats_.raw_allocations;
    stats_.reserved_bytes += size;
    stats_.peak_reserved_bytes = std::max(stats_.peak_reserved_bytes, stats_.reserved_bytes);
    live_.emplace(p, size);
    add_allocated(size);
    return p;
  }

  /// Takes back a block of this allocator into `stream`'s cache. A pointer it did not hand out
  /// is ignored (and counted nowhere).
  void deallocate(void* p, std::size_t /*bytes*/, cudaStream_t stream) noexcept override {
    if (p == nullptr) return;
    std::lock_guard lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return;
    const std::size_t size = it->second;
    live_.erase(it);
    stats_.allocated_bytes -= size;
    cache_.emplace(Key{stream, size}, p);
  }

  /// Returns every cached (not live) block to the raw memory, as torch.cuda.empty_cache().
  void empty_cache() noexcept {
    std::lock_guard lock(mu_);
    release_cache_locked();
  }

  /// The counters.
  AllocatorStats stats() const {
    std::lock_guard lock(mu_);
    return stats_;
  }

  /// Sets the peaks to the current values, to measure the peak of one step.
  void reset_peak() noexcept {
    std::lock_guard lock(mu_);
    stats_.peak_allocated_bytes = stats_.allocated_bytes;
    stats_.peak_reserved_bytes = stats_.reserved_bytes;
  }

  /// The raw memory (for tests).
  const RawMemory& raw() const noexcept { return raw_; }

 private:
  struct Key {
    cudaStream_t stream;
    std::size_t size;
    bool operator<(const Key& o) const noexcept {
      if (stream != o.stream) return std::less<cudaStream_t>{}(stream, o.stream);
      return size < o.size;
    }
  };
  void add_allocated(std::size_t size) noexcept {
    stats_.allocated_bytes += size;
    stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
  }
  void release_cache_locked() noexcept {
    for (auto& [key, p] : cache_) {
      raw_.deallocate(p);
      stats_.reserved_bytes -= key.size;
      ++stats_.raw_frees;
    }
    cache_.clear();
  }
  std::string describe_raw() const {
    if constexpr (requires(const RawMemory& r) { r.describe(); })
      return raw_.describe();
    else
      return "device memory unknown";
  }

  RawMemory raw_;
  mutable std::mutex mu_;
  std::multimap<Key, void*> cache_;
  std::unordered_map<void*, std::size_t> live_;
  AllocatorStats stats_;
};

/// The process's caching allocator for CUDA device `device` (one per device, made on first
/// use, never destroyed: tensors may outlive main's locals). Throws tessera::Error for a
/// negative device.
inline CachingAllocator<>& default_allocator(int device) {
  TESSERA_EXPECTS(device >= 0 && device < 64, "cuda::default_allocator: device ", device, " is not in [0, 64)");
  static std::mutex mu;
  static CachingAllocator<>* allocators[64] = {};
  std::lock_guard lock(mu);
  if (allocators[device] == nullptr) allocators[device] = new CachingAllocator<>();
  return *allocators[device];
}

/// The caching allocator of the calling thread's current device. Throws CudaError without one.
inline CachingAllocator<>& default_allocator() { return default_allocator(current_device()); }

}  // namespace tessera::cuda
