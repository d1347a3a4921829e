#pragma once
/// @file
/// residual_add: out = x + partial + bias (bias broadcast over the rows), the end of a
/// row-parallel layer on a device: `partial` is the layer's product summed over the tp ranks
/// (fp32, the all-reduce's buffer), `x` the residual stream and `bias` the replicated bias,
/// added once after the sum (Megatron-LM's RowParallelLinear). Summed in fp32 and rounded to T
/// once, as the single-device GEMM's beta = 1 epilogue does. add_into: dst += src (fp32), e.g.
/// a sequence-parallel LayerNorm's weight gradient, summed over tp, into the model's. CUDA code.

#include <algorithm>
#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
template <class T>
__global__ void residual_add(const T* x, const float* partial, const T* bias, T* out, std::int64_t n, std::int64_t d) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_from_f32(out + i, load_f32(x[i]) + partial[i] + load_f32(bias[i % d]));
}
// A template (of nothing) so that the header defines it in every translation unit (ODR).
template <int = 0>
__global__ void add_into(float* dst, const float* src, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}
}  // namespace kernels

/// out (N, D) = x (N, D) + partial (N, D) + bias (D) per row, on `s`; out may be x. Throws
/// tessera::Error naming the shapes when they differ.
template <class T>
void residual_add(const Stream& s, DeviceView<const T> x, DeviceView<const float> partial, DeviceView<const T> bias,
                  DeviceView<T> out) {
  TESSERA_EXPECTS(x.shape.rank() == 2 && partial.numel() == x.numel() && out.numel() == x.numel() &&
                      bias.numel() == x.shape[1],
                  "cuda residual_add: x ", x.shape, ", partial ", partial.shape, ", bias ", bias.shape, ", out ",
                  out.shape, " are not (N, D), (N, D), (D), (N, D)");
  if (x.numel() == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((x.numel() + 255) / 256, 4096));
  kernels::residual_add<T><<<blocks, 256, 0, s.get()>>>(x.data, partial.data, bias.data, out.data, x.numel(),
                                                         x.shape[1]);
  cuda::detail::check_launch("residual_add", "cuda residual_add of ", x.shape);
}

/// dst[i] += src[i] for every element (fp32), on `s`. Throws tessera::Error naming the sizes
/// when they differ.
inline void add_into(const Stream& s, DeviceView<const float> src, DeviceView<float> dst) {
  TESSERA_EXPECTS(src.numel() == dst.numel(), "cuda add_into: ", src.numel(), " elements into ", dst.numel());
  if (src.numel() == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((src.numel() + 255) / 256, 4096));
  kernels::add_into<><<<blocks, 256, 0, s.get()>>>(dst.data, src.data, src.numel());
  cuda::detail::check_launch("add_into", "cuda add_into of ", src.numel(), " elements");
}

}  // namespace tessera::cuda::ops
