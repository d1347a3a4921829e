#pragma once
/// @file
/// DeviceTensor<T>: a contiguous tensor in CUDA device memory, a distinct type from the host
/// Tensor<T>, and DeviceView<T>, the non-owning (pointer, shape) that device operations take.
/// Passing a host Tensor where device memory is expected does not compile, with one sentence
/// saying what to do. Copies between the two are explicit (to_device, to_host). Host code.

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/cuda/caching_allocator.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda {

/// bfloat16 (8 exponent, 7 mantissa bits), CUDA's __nv_bfloat16: the storage type of the mixed
/// precision path's weights and activations.
using bf16 = __nv_bfloat16;

/// An element type a DeviceTensor holds: float, bf16, or std::int32_t (token ids, targets).
template <class T>
concept DeviceScalar = std::same_as<std::remove_const_t<T>, float> ||
                       std::same_as<std::remove_const_t<T>, bf16> ||
                       std::same_as<std::remove_const_t<T>, std::int32_t>;

namespace detail {
template <class>
inline constexpr bool host_memory_passed = false;
}  // namespace detail

/// A non-owning view of `shape.numel()` contiguous elements of T in device memory, row-major.
/// Made from a DeviceTensor (implicitly) or from a raw device pointer (explicitly). Made from a
/// host Tensor it does not compile: device operations take device memory only.
template <DeviceScalar T>
struct DeviceView {
  T* data = nullptr;  ///< device pointer to the first element
  Shape shape;        ///< extents, row-major

  DeviceView() = default;
  /// A view of `shape` at the device pointer `p` (nothing checks that `p` is device memory).
  DeviceView(T* p, const Shape& s) : data(p), shape(s) {}
  /// A const view of a mutable one.
  template <class U>
    requires std::same_as<T, const U>
  DeviceView(const DeviceView<U>& o) : data(o.data), shape(o.shape) {}
  /// Refused at compile time: host memory given where device memory is expected.
  template <class U>
  DeviceView(const Tensor<U>&) {
    static_assert(detail::host_memory_passed<U>,
                  "tessera::cuda: this operation runs on the GPU and takes device memory (cuda::DeviceTensor); "
                  "copy a host Tensor there with cuda::to_device(tensor, stream) first.");
  }
  /// Number of elements.
  std::int64_t numel() const noexcept { return shape.numel(); }
  /// Extent of dim d (negative counts from the back).
  std::int64_t size(int d) const { return shape.size(d); }
};

/// An owning, contiguous, row-major tensor of T in device memory, from a MemoryResource (the
/// device's caching allocator by default). Copies share the memory (like Tensor); the block
/// returns to the allocator, into the cache of the stream it was made for, when the last copy
/// goes. Work using it on another stream must be ordered before that (an Event).
template <DeviceScalar T>
class DeviceTensor {
  static_assert(!std::is_const_v<T>, "DeviceTensor<T>: T must not be const (use DeviceView<const T>)");

 public:
  /// The element type.
  using Scalar = T;
  /// An empty tensor, shape (0), no memory.
  DeviceTensor() = default;

  /// A tensor of `shape` with unspecified contents, for work on `stream`, from `memory`.
  /// Throws OutOfDeviceMemory naming the sizes.
  static DeviceTensor empty(const Shape& shape, const Stream& stream, MemoryResource& memory) {
    return empty(shape, stream.get(), memory);
  }
  /// As empty(shape, stream, memory), from the current device's caching allocator.
  static DeviceTensor empty(const Shape& shape, const Stream& stream) {
    return empty(shape, stream.get(), default_allocator());
  }
  /// As empty(shape, stream, memory) for a raw stream handle.
  static DeviceTensor empty(const Shape& shape, cudaStream_t stream, MemoryResource& memory) {
    TESSERA_EXPECTS(shape.numel() >= 0, "DeviceTensor: negative element count for shape ", shape);
    DeviceTensor t;
    t.shape_ = shape;
    const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * sizeof(T);
    if (bytes > 0) {
      void* p = memory.allocate(bytes, stream);
      MemoryResource* m = &memory;
      t.block_ = std::shared_ptr<void>(p, [m, bytes, stream](void* q) { m->deallocate(q, bytes, stream); });
    }
    return t;
  }
  /// A zero-filled tensor of `shape` (cudaMemsetAsync on `stream`).
  static DeviceTensor zeros(const Shape& shape, const Stream& stream) {
    DeviceTensor t = empty(shape, stream);
    t.fill_zero(stream);
    return t;
  }
  /// Sets every element to zero (all bits 0) on `stream`.
  void fill_zero(const Stream& stream) {
    if (bytes() == 0) return;
    cuda::detail::check(cudaMemsetAsync(data(), 0, bytes(), stream.get()), "cudaMemsetAsync",
                        "DeviceTensor::fill_zero of shape ", shape_);
  }

  /// The extents.
  const Shape& shape() const noexcept { return shape_; }
  /// Number of elements.
  std::int64_t numel() const noexcept { return shape_.numel(); }
  /// Extent of dim d (negative counts from the back).
  std::int64_t size(int d) const { return shape_.size(d); }
  /// Size in bytes.
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(numel()) * sizeof(T); }
  /// Device pointer to the first element (null when empty).
  T* data() const noexcept { return static_cast<T*>(block_.get()); }
  /// The same memory seen as `shape` (same element count). Throws tessera::Error otherwise.
  DeviceTensor reshape(const Shape& shape) const {
    TESSERA_EXPECTS(shape.numel() == numel(), "DeviceTensor::reshape: shape ", shape, " has ", shape.numel(),
                    " elements, the tensor of shape ", shape_, " has ", numel());
    DeviceTensor t = *this;
    t.shape_ = shape;
    return t;
  }
  /// A mutable view.
  DeviceView<T> view() const noexcept { return {data(), shape_}; }
  /// Views convert implicitly, so operations taking DeviceView accept a DeviceTensor.
  operator DeviceView<T>() const noexcept { return view(); }
  /// As a const view.
  operator DeviceView<const T>() const noexcept { return {data(), shape_}; }

 private:
  Shape shape_{0};
  std::shared_ptr<void> block_;
};

namespace detail {
template <class T>
T from_float(float x) {
  if constexpr (std::same_as<T, bf16>)
    return __float2bfloat16(x);
  else
    return static_cast<T>(x);
}
template <class T>
float to_float(T x) {
  if constexpr (std::same_as<T, bf16>)
    return __bfloat162float(x);
  else
    return static_cast<float>(x);
}
}  // namespace detail

/// Copies a host tensor to a new device tensor of element type `D` (float: exact; bf16:
/// round-to-nearest-even), on `stream`; blocks until the copy is done, so `host` may change
/// afterwards. Throws CudaError naming the shape.
template <DeviceScalar D = float, class H>
DeviceTensor<D> to_device(const Tensor<H>& host, const Stream& stream) {
  static_assert(std::same_as<H, D> || (std::same_as<D, bf16> && std::same_as<H, float>),
                "cuda::to_device: converts float to float or bf16, and int32 to int32");
  DeviceTensor<D> d = DeviceTensor<D>::empty(host.shape(), stream);
  if (d.numel() == 0) return d;
  const Tensor<H> c = host.contiguous();
  if constexpr (std::same_as<H, D>) {
    cuda::detail::check(cudaMemcpyAsync(d.data(), c.data(), d.bytes(), cudaMemcpyHostToDevice, stream.get()),
                        "cudaMemcpyAsync", "cuda::to_device of shape ", host.shape());
    stream.synchronize();
  } else {
    std::vector<D> staged(static_cast<std::size_t>(c.numel()));
    for (std::size_t i = 0; i < staged.size(); ++i) staged[i] = detail::from_float<D>(c.data()[i]);
    cuda::detail::check(cudaMemcpyAsync(d.data(), staged.data(), d.bytes(), cudaMemcpyHostToDevice, stream.get()),
                        "cudaMemcpyAsync", "cuda::to_device of shape ", host.shape());
    stream.synchronize();
  }
  return d;
}

/// Copies a device tensor (float, bf16 widened exactly to float, or int32) to a new host
/// tensor, after `stream`'s earlier work; blocks until done. Throws CudaError naming the shape,
/// including an asynchronous error of earlier kernels on the stream.
template <DeviceScalar D>
auto to_host(DeviceView<const D> dev, const Stream& stream) {
  using H = std::conditional_t<std::same_as<std::remove_const_t<D>, std::int32_t>, std::int32_t, float>;
  Tensor<H> h = Tensor<H>::empty(dev.shape);
  if (h.numel() == 0) return h;
  const std::size_t bytes = static_cast<std::size_t>(dev.numel()) * sizeof(D);
  if constexpr (std::same_as<std::remove_const_t<D>, bf16>) {
    std::vector<bf16> staged(static_cast<std::size_t>(dev.numel()));
    cuda::detail::check(cudaMemcpyAsync(staged.data(), dev.data, bytes, cudaMemcpyDeviceToHost, stream.get()),
                        "cudaMemcpyAsync", "cuda::to_host of shape ", dev.shape);
    stream.synchronize();
    for (std::size_t i = 0; i < staged.size(); ++i) h.data()[i] = detail::to_float(staged[i]);
  } else {
    cuda::detail::check(cudaMemcpyAsync(h.data(), dev.data, bytes, cudaMemcpyDeviceToHost, stream.get()),
                        "cudaMemcpyAsync", "cuda::to_host of shape ", dev.shape);
    stream.synchronize();
  }
  return h;
}

/// As to_host(view, stream) for a DeviceTensor.
template <DeviceScalar D>
auto to_host(const DeviceTensor<D>& dev, const Stream& stream) {
  return to_host(DeviceView<const D>(dev), stream);
}

}  // namespace tessera::cuda
