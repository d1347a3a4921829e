#pragma once
/// @file
/// The bias gradient of a linear layer on the device: dbias[j] += sum over rows of dy[r, j], in
/// fixed row chunks then over the chunks in order (bitwise reproducible), fp32 sums of float or
/// bf16 dy. CUDA code.

#include <cuda_runtime.h>

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
template <class T>
__global__ void column_sum_partial(const T* dy, float* partial, std::int64_t rows, int C, std::int64_t rows_per_chunk) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= C) return;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float s = 0.f;
  for (std::int64_t r = r0; r < r1; ++r) s += load_f32(dy[r * C + j]);
  partial[static_cast<std::int64_t>(blockIdx.y) * C + j] = s;
}
// A template (of nothing) so that the header defines it in every translation unit (ODR).
template <int = 0>
__global__ void column_sum_finish(const float* partial, float* out, int C, int chunks) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= C) return;
  float s = 0.f;
  for (int c = 0; c < chunks; ++c) s += partial[static_cast<std::int64_t>(c) * C + j];
  out[j] += s;
}
}  // namespace kernels

/// Row chunks of bias_grad (at most 64 rows of work each, at most 1024 chunks).
inline int bias_grad_chunks(std::int64_t rows) {
  const std::int64_t c = ceil_div(rows, 64);
  return static_cast<int>(c < 1 ? 1 : (c > 1024 ? 1024 : c));
}

/// dbias (fp32, C) += the column sums of dy (rows x C). `workspace`: fp32 of at least
/// C * bias_grad_chunks(rows). Throws tessera::Error naming the shapes.
template <class T>
void bias_grad(const Stream& s, DeviceView<const T> dy, DeviceView<float> dbias, DeviceView<float> workspace) {
  const std::int64_t C = dbias.numel(), rows = dy.numel() / (C ? C : 1);
  const int chunks = bias_grad_chunks(rows);
  TESSERA_EXPECTS(dy.size(-1) == C && workspace.numel() >= C * chunks, "cuda bias_grad: dy ", dy.shape, ", dbias ",
                  dbias.shape, ", workspace ", workspace.shape, " (needs ", C * chunks, ")");
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(C, 128)), static_cast<unsigned>(chunks));
  kernels::column_sum_partial<T><<<grid, 128, 0, s.get()>>>(dy.data, workspace.data, rows, static_cast<int>(C),
                                                            ceil_div(rows, chunks));
  cuda::detail::check_launch("column_sum_partial", "cuda bias_grad of dy ", dy.shape);
  kernels::column_sum_finish<><<<static_cast<unsigned>(ceil_div(C, 128)), 128, 0, s.get()>>>(
      workspace.data, dbias.data, static_cast<int>(C), chunks);
  cuda::detail::check_launch("column_sum_finish", "cuda bias_grad of dy ", dy.shape);
}

}  // namespace tessera::cuda::ops
