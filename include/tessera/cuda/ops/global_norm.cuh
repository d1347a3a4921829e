#pragma once
/// @file
/// The squared L2 norm of a flat fp32 buffer on the device (the global gradient norm for
/// clipping), in two launches with a fixed grid, so the sum's order and result are the same on
/// every run. The result stays on the device (one float) for the clipping factor. CUDA code.

#include <cuda_runtime.h>

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

/// Blocks of the first pass (and floats of global_sum_of_squares' workspace).
inline constexpr int norm_blocks = 264;

namespace kernels {
// A template (of nothing) so that the header defines it in every translation unit (ODR).
template <int = 0>
__global__ void sum_of_squares_partial(const float* x, std::int64_t n, float* partial) {
  __shared__ float scratch[32];
  float s = 0.f;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    s += x[i] * x[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
// A template (of nothing) so that the header defines it in every translation unit (ODR).
template <int = 0>
__global__ void sum_partials(const float* partial, int count, float* out) {
  __shared__ float scratch[32];
  float s = 0.f;
  for (int i = static_cast<int>(threadIdx.x); i < count; i += static_cast<int>(blockDim.x)) s += partial[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}
}  // namespace kernels

/// out[0] = sum of x[i]^2 over the buffer (fp32), through `workspace` (at least norm_blocks
/// floats). Throws tessera::Error when the workspace is short or out is not one float.
inline void global_sum_of_squares(const Stream& s, DeviceView<const float> x, DeviceView<float> out,
                                  DeviceView<float> workspace) {
  TESSERA_EXPECTS(out.numel() == 1 && workspace.numel() >= norm_blocks, "cuda global_sum_of_squares: out ", out.shape,
                  " must be one float, workspace ", workspace.shape, " at least ", norm_blocks);
  kernels::sum_of_squares_partial<><<<norm_blocks, 256, 0, s.get()>>>(x.data, x.numel(), workspace.data);
  cuda::detail::check_launch("sum_of_squares_partial", "cuda global_sum_of_squares of ", x.numel(), " floats");
  kernels::sum_partials<><<<1, 256, 0, s.get()>>>(workspace.data, norm_blocks, out.data);
  cuda::detail::check_launch("sum_partials", "cuda global_sum_of_squares");
}

}  // namespace tessera::cuda::ops
