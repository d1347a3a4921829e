#pragma once
/// @file
/// The squared L2 norm of a flat fp32 buffer on the device (the global gradient norm for
/// clipping), in two launches with a fixed grid, so the sum's order and result are the same on
/// every run. The result stays on the device (one float) for the clipping factor. A weighted
/// form over a chunk table (adamw_chunks' groups as weights) counts a tensor-parallel model's
/// replicated parameters once over the tp ranks. CUDA code.

#include <cuda_runtime.h>

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/adamw.cuh"
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
// Block b sums weight[group] x^2 over chunks b, b + gridDim.x, ... of an adamw_chunks table.
template <int = 0>
__global__ void weighted_sum_of_squares_partial(const float* x, const std::int32_t* table, std::int64_t chunks,
                                                float w0, float w1, float* partial) {
  __shared__ float scratch[32];
  float s = 0.f;
  for (std::int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const std::int32_t* row = table + c * 5;
    const std::int64_t begin = static_cast<std::int64_t>(row[0]) | (static_cast<std::int64_t>(row[1]) << 31);
    const std::int64_t end = static_cast<std::int64_t>(row[2]) | (static_cast<std::int64_t>(row[3]) << 31);
    const float w = row[4] == 0 ? w0 : w1;
    float cs = 0.f;
    for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) cs += x[i] * x[i];
    s += w * cs;
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
}  // namespace kernels

/// out[0] = sum over the chunks of `chunks` (adamw_chunks' table over `x`) of weight x[i]^2,
/// the weight `weight0` for group 0 and `weight1` for group 1 (e.g. 1 for a tp rank's own
/// shards and 1 / tp for the parameters every tp rank holds, so that the sum over the tp ranks
/// is the whole model's), through `workspace` (at least norm_blocks floats). Elements outside
/// every chunk are not counted. Throws tessera::Error when the workspace is short or out is not
/// one float.
inline void weighted_sum_of_squares(const Stream& s, DeviceView<const float> x, const AdamWChunks& chunks,
                                    float weight0, float weight1, DeviceView<float> out, DeviceView<float> workspace) {
  TESSERA_EXPECTS(out.numel() == 1 && workspace.numel() >= norm_blocks, "cuda weighted_sum_of_squares: out ",
                  out.shape, " must be one float, workspace ", workspace.shape, " at least ", norm_blocks);
  kernels::weighted_sum_of_squares_partial<><<<norm_blocks, 256, 0, s.get()>>>(x.data, chunks.table.data(),
                                                                               chunks.chunks, weight0, weight1,
                                                                               workspace.data);
  cuda::detail::check_launch("weighted_sum_of_squares_partial", "cuda weighted_sum_of_squares of ", x.numel(),
                             " floats in ", chunks.chunks, " chunks");
  kernels::sum_partials<><<<1, 256, 0, s.get()>>>(workspace.data, norm_blocks, out.data);
  cuda::detail::check_launch("sum_partials", "cuda weighted_sum_of_squares");
}

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
