#pragma once
/// @file
/// GELU (tanh form) on the device, forward and backward, element by element with the arithmetic
/// of cuda::math (checked on the host against nn::GELU). Where a GEMM precedes it, the cuBLASLt
/// GELU epilogue (Epilogue::gelu_bias) is the fused path; this is the standalone one. CUDA code.

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
template <class T>
__global__ void gelu_forward(const T* x, T* y, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_from_f32(y + i, math::gelu(load_f32(x[i])));
}
template <class T>
__global__ void gelu_backward(const T* x, const T* dy, T* dx, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_from_f32(dx + i, math::gelu_backward(load_f32(x[i]), load_f32(dy[i])));
}
inline unsigned elementwise_blocks(std::int64_t n) {
  const std::int64_t b = ceil_div(n, 256);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}
}  // namespace kernels

/// y = gelu(x), element-wise. Throws tessera::Error when the sizes differ.
template <class T>
void gelu_forward(const Stream& s, DeviceView<const T> x, DeviceView<T> y) {
  TESSERA_EXPECTS(x.numel() == y.numel(), "cuda gelu_forward: x ", x.shape, " and y ", y.shape, " differ");
  if (x.numel() == 0) return;
  kernels::gelu_forward<T><<<kernels::elementwise_blocks(x.numel()), 256, 0, s.get()>>>(x.data, y.data, x.numel());
  cuda::detail::check_launch("gelu_forward", "cuda gelu_forward of ", x.shape);
}

/// dx = dy gelu'(x), element-wise (x: the forward's input). Throws tessera::Error when sizes differ.
template <class T>
void gelu_backward(const Stream& s, DeviceView<const T> x, DeviceView<const T> dy, DeviceView<T> dx) {
  TESSERA_EXPECTS(x.numel() == dy.numel() && x.numel() == dx.numel(), "cuda gelu_backward: x ", x.shape, ", dy ",
                  dy.shape, ", dx ", dx.shape, " differ");
  if (x.numel() == 0) return;
  kernels::gelu_backward<T><<<kernels::elementwise_blocks(x.numel()), 256, 0, s.get()>>>(x.data, dy.data, dx.data,
                                                                                        x.numel());
  cuda::detail::check_launch("gelu_backward", "cuda gelu_backward of ", x.shape);
}

}  // namespace tessera::cuda::ops
