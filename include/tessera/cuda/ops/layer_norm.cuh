#pragma once
/// @file
/// LayerNorm on the device, forward and backward, as nn::LayerNorm: y = (x - mean) rstd w + b
/// over rows of C, rstd = 1 / sqrt(var + eps), biased variance. Storage float or bf16, arithmetic
/// and statistics fp32. Deterministic: the weight gradients are summed over fixed row chunks,
/// then over the chunks in order. CUDA code: compile with nvcc.

#include <cuda_runtime.h>

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
// One warp per row: two passes over the row (mean, then the centred variance), then y.
template <class T>
__global__ void layer_norm_forward(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd,
                                   std::int64_t rows, int C, float eps) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / warp_size) + threadIdx.x / warp_size;
  const int lane = static_cast<int>(threadIdx.x) % warp_size;
  if (row >= rows) return;
  const T* xr = x + row * C;
  float s = 0.f;
  for (int j = lane; j < C; j += warp_size) s += load_f32(xr[j]);
  const float m = warp_sum(s) / static_cast<float>(C);
  float v = 0.f;
  for (int j = lane; j < C; j += warp_size) {
    const float d = load_f32(xr[j]) - m;
    v += d * d;
  }
  const float rs = 1.f / sqrtf(warp_sum(v) / static_cast<float>(C) + eps);
  T* yr = y + row * C;
  for (int j = lane; j < C; j += warp_size)
    store_from_f32(yr + j, (load_f32(xr[j]) - m) * rs * load_f32(w[j]) + load_f32(b[j]));
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = rs;
  }
}

// One warp per row: dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w.
template <class T>
__global__ void layer_norm_backward_input(const T* dy, const T* x, const T* w, const float* mean, const float* rstd,
                                          T* dx, std::int64_t rows, int C, bool accumulate) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / warp_size) + threadIdx.x / warp_size;
  const int lane = static_cast<int>(threadIdx.x) % warp_size;
  if (row >= rows) return;
  const T* xr = x + row * C;
  const T* gr = dy + row * C;
  const float m = mean[row], rs = rstd[row];
  float sg = 0.f, sgh = 0.f;
  for (int j = lane; j < C; j += warp_size) {
    const float g = load_f32(gr[j]) * load_f32(w[j]);
    sg += g;
    sgh += g * (load_f32(xr[j]) - m) * rs;
  }
  const float mg = warp_sum(sg) / static_cast<float>(C), mgh = warp_sum(sgh) / static_cast<float>(C);
  T* dxr = dx + row * C;
  for (int j = lane; j < C; j += warp_size) {
    const float g = load_f32(gr[j]) * load_f32(w[j]);
    const float h = (load_f32(xr[j]) - m) * rs;
    store_from_f32(dxr + j, (accumulate ? load_f32(dxr[j]) : 0.f) + rs * (g - mg - h * mgh));
  }
}

// Thread per column, block row y = one chunk of rows: partial sums of dy xhat and dy.
template <class T>
__global__ void layer_norm_backward_partial(const T* dy, const T* x, const float* mean, const float* rstd,
                                            float* partial_w, float* partial_b, std::int64_t rows, int C,
                                            std::int64_t rows_per_chunk) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= C) return;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float sw = 0.f, sb = 0.f;
  for (std::int64_t r = r0; r < r1; ++r) {
    const float g = load_f32(dy[r * C + j]);
    sw += g * (load_f32(x[r * C + j]) - mean[r]) * rstd[r];
    sb += g;
  }
  partial_w[static_cast<std::int64_t>(blockIdx.y) * C + j] = sw;
  partial_b[static_cast<std::int64_t>(blockIdx.y) * C + j] = sb;
}

// Thread per column: adds the chunks' partial sums, in chunk order, into the gradients.
// A template (of nothing) so that the header defines it in every translation unit (ODR).
template <int = 0>
__global__ void layer_norm_backward_finish(const float* partial_w, const float* partial_b, float* dw, float* db,
                                           int C, int chunks) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= C) return;
  float sw = 0.f, sb = 0.f;
  for (int c = 0; c < chunks; ++c) {
    sw += partial_w[static_cast<std::int64_t>(c) * C + j];
    sb += partial_b[static_cast<std::int64_t>(c) * C + j];
  }
  dw[j] += sw;
  db[j] += sb;
}
}  // namespace kernels

/// LayerNorm forward over rows of x (rows x C): y (rows x C), and per-row mean and rstd (fp32,
/// for backward). Throws tessera::Error naming the shapes when they disagree.
template <class T>
void layer_norm_forward(const Stream& s, DeviceView<const T> x, DeviceView<const T> weight, DeviceView<const T> bias,
                        DeviceView<T> y, DeviceView<float> mean, DeviceView<float> rstd, float eps = 1e-5f) {
  const std::int64_t C = x.size(-1), rows = x.numel() / (C ? C : 1);
  TESSERA_EXPECTS(weight.numel() == C && bias.numel() == C && y.numel() == x.numel() && mean.numel() == rows &&
                      rstd.numel() == rows,
                  "cuda layer_norm_forward: x ", x.shape, ", weight ", weight.shape, ", bias ", bias.shape, ", y ",
                  y.shape, ", mean ", mean.shape, ", rstd ", rstd.shape, " do not agree");
  if (rows == 0) return;
  const int warps = 8;
  kernels::layer_norm_forward<T><<<static_cast<unsigned>(ceil_div(rows, warps)), warps * warp_size, 0, s.get()>>>(
      x.data, weight.data, bias.data, y.data, mean.data, rstd.data, rows, static_cast<int>(C), eps);
  cuda::detail::check_launch("layer_norm_forward", "cuda layer_norm_forward of x ", x.shape);
}

/// Row chunks of layer_norm_backward's weight-gradient sums (at most 128 rows of work each,
/// at most 1024 chunks).
inline int layer_norm_chunks(std::int64_t rows) {
  const std::int64_t c = ceil_div(rows, 128);
  return static_cast<int>(c < 1 ? 1 : (c > 1024 ? 1024 : c));
}

/// LayerNorm backward: dx (rows x C) overwritten (or added to, with `accumulate_dx`: the
/// residual stream's gradient); dweight and dbias (fp32, C) accumulated (+=), as nn::LayerNorm
/// adds into its gradients. `workspace` is fp32 of at least 2 * C * layer_norm_chunks(rows)
/// elements. Throws tessera::Error naming the shapes.
template <class T>
void layer_norm_backward(const Stream& s, DeviceView<const T> dy, DeviceView<const T> x, DeviceView<const T> weight,
                         DeviceView<const float> mean, DeviceView<const float> rstd, DeviceView<T> dx,
                         DeviceView<float> dweight, DeviceView<float> dbias, DeviceView<float> workspace,
                         bool accumulate_dx = false) {
  const std::int64_t C = x.size(-1), rows = x.numel() / (C ? C : 1);
  const int chunks = layer_norm_chunks(rows);
  TESSERA_EXPECTS(dy.numel() == x.numel() && dx.numel() == x.numel() && weight.numel() == C &&
                      dweight.numel() == C && dbias.numel() == C && mean.numel() == rows && rstd.numel() == rows,
                  "cuda layer_norm_backward: dy ", dy.shape, ", x ", x.shape, ", weight ", weight.shape, ", dx ",
                  dx.shape, ", dweight ", dweight.shape, ", dbias ", dbias.shape, " do not agree");
  TESSERA_EXPECTS(workspace.numel() >= 2 * C * chunks, "cuda layer_norm_backward: workspace of ", workspace.numel(),
                  " floats, needs ", 2 * C * chunks);
  if (rows == 0) return;
  const int warps = 8;
  kernels::layer_norm_backward_input<T><<<static_cast<unsigned>(ceil_div(rows, warps)), warps * warp_size, 0, s.get()>>>(
      dy.data, x.data, weight.data, mean.data, rstd.data, dx.data, rows, static_cast<int>(C), accumulate_dx);
  cuda::detail::check_launch("layer_norm_backward_input", "cuda layer_norm_backward of x ", x.shape);
  const std::int64_t per_chunk = ceil_div(rows, chunks);
  const dim3 grid(static_cast<unsigned>(ceil_div(C, 128)), static_cast<unsigned>(chunks));
  kernels::layer_norm_backward_partial<T><<<grid, 128, 0, s.get()>>>(dy.data, x.data, mean.data, rstd.data,
                                                                    workspace.data, workspace.data + C * chunks, rows,
                                                                    static_cast<int>(C), per_chunk);
  cuda::detail::check_launch("layer_norm_backward_partial", "cuda layer_norm_backward of x ", x.shape);
  kernels::layer_norm_backward_finish<><<<static_cast<unsigned>(ceil_div(C, 128)), 128, 0, s.get()>>>(
      workspace.data, workspace.data + C * chunks, dweight.data, dbias.data, static_cast<int>(C), chunks);
  cuda::detail::check_launch("layer_norm_backward_finish", "cuda layer_norm_backward of x ", x.shape);
}

}  // namespace tessera::cuda::ops
