#pragma once
/// @file
/// DeviceBuffer<T>: an owning array in CUDA device memory, for tests and examples of the NCCL
/// backend. Part of the NCCL backend: include it only where CUDA and NCCL are installed.

#include <cuda_runtime.h>

#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "tessera/comm/nccl/nccl_error.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

namespace tessera::nccl {

/// An owning, move-only array of `size()` elements of T in device memory (cudaMalloc on the
/// calling thread's current device; cudaFree in the destructor).
///
/// span() hands the device pointer to a communicator: `comm.all_reduce(buf.span())`. The span
/// points to device memory, so host code must not read through it; copy with to_host() or
/// copy_to(). The copies are synchronous: they return when the data has arrived, and they run
/// on the default stream, which the NCCL communicator's stream is ordered with. A buffer must
/// not be copied while a non-blocking call that uses it is in flight (wait() first).
///
/// Throws CommError (code() = the cudaError_t) when an allocation or copy fails, e.g. where
/// this process sees no CUDA device.
template <CommScalar T>
class DeviceBuffer {
 public:
  /// An empty buffer (no allocation).
  DeviceBuffer() = default;

  /// `count` uninitialized elements on the current device.
  explicit DeviceBuffer(std::size_t count) : size_(count) {
    if (count == 0) return;
    void* p = nullptr;
    detail::check_cuda(cudaMalloc(&p, count * sizeof(T)), "cudaMalloc", "DeviceBuffer of ",
                       count, " x ", name_of(dtype_of<T>), " (", count * sizeof(T), " bytes)");
    data_ = static_cast<T*>(p);
  }

  /// A device copy of `host` (host.size() elements).
  explicit DeviceBuffer(std::span<const T> host) : DeviceBuffer(host.size()) { copy_from(host); }

  /// A device copy of `host`; deduces T: `DeviceBuffer buf(host_vector)`.
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(std::span<const T>(host)) {}

  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  /// Takes over `other`'s memory; `other` becomes empty.
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  /// Frees this buffer's memory and takes over `other`'s; `other` becomes empty.
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release_();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  /// Frees the memory (cudaFree; errors are ignored, a destructor must not throw).
  ~DeviceBuffer() { release_(); }

  /// Device pointer to the first element (nullptr when empty).
  T* data() noexcept { return data_; }
  /// Device pointer to the first element (nullptr when empty).
  const T* data() const noexcept { return data_; }
  /// Number of elements.
  std::size_t size() const noexcept { return size_; }
  /// True when size() is 0.
  bool empty() const noexcept { return size_ == 0; }
  /// The elements as a span of device memory, to pass to a communicator.
  std::span<T> span() noexcept { return {data_, size_}; }
  /// The elements as a span of device memory, to pass to a communicator.
  std::span<const T> span() const noexcept { return {data_, size_}; }

  /// Copies `host` into the buffer. Throws Error if host.size() != size().
  void copy_from(std::span<const T> host) {
    TESSERA_EXPECTS(host.size() == size_, "DeviceBuffer::copy_from: host has ", host.size(),
                    " elements, the buffer ", size_);
    if (size_ == 0) return;
    detail::check_cuda(cudaMemcpy(data_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice),
                       "cudaMemcpy (host to device)", "DeviceBuffer::copy_from");
    // A copy from pageable memory may return before the DMA has landed: wait for it.
    detail::check_cuda(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize",
                       "DeviceBuffer::copy_from");
  }

  /// Copies the buffer into `host`. Throws Error if host.size() != size().
  void copy_to(std::span<T> host) const {
    TESSERA_EXPECTS(host.size() == size_, "DeviceBuffer::copy_to: host has ", host.size(),
                    " elements, the buffer ", size_);
    if (size_ == 0) return;
    detail::check_cuda(cudaMemcpy(host.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost),
                       "cudaMemcpy (device to host)", "DeviceBuffer::copy_to");
  }

  /// The elements, copied to a new host vector.
  std::vector<T> to_host() const {
    std::vector<T> out(size_);
    copy_to(out);
    return out;
  }

 private:
  void release_() noexcept {
    if (data_ != nullptr) static_cast<void>(cudaFree(data_));
    data_ = nullptr;
    size_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace tessera::nccl
