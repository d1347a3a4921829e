#pragma once
/// @file
/// The Llama example's own device kernels, the few that tessera's device building blocks
/// (tessera/cuda/ops: GEMMs, attention, embedding, cross-entropy, AdamW) do not give it:
/// RMSNorm forward and backward, the rotary embedding fused with GQA's head expansion into
/// tessera's multi-head attention layout (and its backward), and SwiGLU forward and backward.
/// Their arithmetic and index mapping are llama_device_math.hpp's, checked on the host against
/// llama_layers.hpp (tests/llama); the kernels against the CPU layers on a GPU (tests/cuda).
/// Storage float or bf16, arithmetic fp32. Deterministic: RMSNorm's weight gradient sums fixed
/// row chunks, then the chunks in order; the GQA backward sums a group's heads in order. CUDA
/// code: compile with nvcc.

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <vector>

#include "llama/device/llama_device_math.hpp"
#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/gelu.cuh"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace llama::device {

namespace dm = llama::device_math;
namespace tc = tessera::cuda;
using tessera::cuda::DeviceView;

namespace kernels {
using tessera::cuda::ops::load_f32;
using tessera::cuda::ops::store_from_f32;
using tessera::cuda::ops::warp_size;
using tessera::cuda::ops::warp_sum;

// One warp per row: rstd = 1 / sqrt(mean(x^2) + eps), y = x rstd w.
template <class T>
__global__ void rms_norm_forward(const T* x, const T* w, T* y, float* rstd, std::int64_t rows, int C, float eps) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / warp_size) + threadIdx.x / warp_size;
  const int lane = static_cast<int>(threadIdx.x) % warp_size;
  if (row >= rows) return;
  const T* xr = x + row * C;
  float ss = 0.f;
  for (int j = lane; j < C; j += warp_size) {
    const float v = load_f32(xr[j]);
    ss += v * v;
  }
  const float rs = dm::rms_rstd(warp_sum(ss), C, eps);
  T* yr = y + row * C;
  for (int j = lane; j < C; j += warp_size) store_from_f32(yr + j, dm::rms_norm_y(load_f32(xr[j]), rs, load_f32(w[j])));
  if (lane == 0) rstd[row] = rs;
}

// One warp per row: dx = rstd (dy w - xhat mean(dy w xhat)), xhat = x rstd.
template <class T>
__global__ void rms_norm_backward_input(const T* dy, const T* x, const T* w, const float* rstd, T* dx,
                                        std::int64_t rows, int C, bool accumulate) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / warp_size) + threadIdx.x / warp_size;
  const int lane = static_cast<int>(threadIdx.x) % warp_size;
  if (row >= rows) return;
  const T* xr = x + row * C;
  const T* gr = dy + row * C;
  const float rs = rstd[row];
  float s = 0.f;
  for (int j = lane; j < C; j += warp_size) s += load_f32(gr[j]) * load_f32(w[j]) * load_f32(xr[j]) * rs;
  const float mean_gwh = warp_sum(s) / static_cast<float>(C);
  T* dxr = dx + row * C;
  for (int j = lane; j < C; j += warp_size) {
    const float v = dm::rms_norm_dx(load_f32(gr[j]), load_f32(w[j]), load_f32(xr[j]) * rs, mean_gwh, rs);
    store_from_f32(dxr + j, (accumulate ? load_f32(dxr[j]) : 0.f) + v);
  }
}

// Thread per column, block row y = one chunk of rows: partial sums of dy xhat.
template <class T>
__global__ void rms_norm_backward_partial(const T* dy, const T* x, const float* rstd, float* partial, std::int64_t rows,
                                          int C, std::int64_t rows_per_chunk) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= C) return;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float sw = 0.f;
  for (std::int64_t r = r0; r < r1; ++r) sw += dm::rms_norm_dw_term(load_f32(dy[r * C + j]), load_f32(x[r * C + j]), rstd[r]);
  partial[static_cast<std::int64_t>(blockIdx.y) * C + j] = sw;
}

// Thread per column: adds the chunks' partial sums, in chunk order, into dw. A template (of
// nothing) so that the header defines it in every translation unit (ODR).
template <int = 0>
__global__ void rms_norm_backward_finish(const float* partial, float* dw, int C, int chunks) {
  const int j = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (j >= C) return;
  float sw = 0.f;
  for (int c = 0; c < chunks; ++c) sw += partial[static_cast<std::int64_t>(c) * C + j];
  dw[j] += sw;
}

// Thread per element of the expanded (rows, 3 H hd) layout.
template <class T>
__global__ void rope_expand(const T* qkv, const float* cos, const float* sin, T* out, std::int64_t n,
                            dm::RopeShape s) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_from_f32(out + i, dm::rope_expand_value(qkv, cos, sin, i, s));
}

// Thread per element of the (rows, (H + 2 G) hd) projection gradient: the group's heads in order.
template <class T>
__global__ void rope_reduce(const T* dexp, const float* cos, const float* sin, T* dqkv, std::int64_t n,
                            dm::RopeShape s) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_from_f32(dqkv + i, dm::rope_reduce_value(dexp, cos, sin, i, s));
}

// Thread per output element.
template <class T>
__global__ void swiglu_forward(const T* x, T* y, std::int64_t n, std::int64_t F) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const dm::SwiGLUColumns c = dm::swiglu_columns(i, F);
    store_from_f32(y + i, dm::swiglu(load_f32(x[c.gate]), load_f32(x[c.up])));
  }
}
template <class T>
__global__ void swiglu_backward(const T* x, const T* dy, T* dx, std::int64_t n, std::int64_t F) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const dm::SwiGLUColumns c = dm::swiglu_columns(i, F);
    const dm::SwiGLUGrad g = dm::swiglu_backward(load_f32(x[c.gate]), load_f32(x[c.up]), load_f32(dy[i]));
    store_from_f32(dx + c.gate, g.gate);
    store_from_f32(dx + c.up, g.up);
  }
}
}  // namespace kernels

/// The device's RoPE table for `seq` positions (dm::rope_table's values, uploaded): cos and sin,
/// each seq x head_dim/2 floats.
struct RopeTable {
  tc::DeviceTensor<float> cos;  ///< [t hd/2 + i]
  tc::DeviceTensor<float> sin;  ///< [t hd/2 + i]
};
/// Row chunks of RMSNorm's weight-gradient sums for `rows` rows: at most 128 rows of work each,
/// at most 1024 chunks (as ops::layer_norm_chunks; the grid's y extent stays far below its limit).
inline int rms_norm_chunks(std::int64_t rows) {
  const std::int64_t c = tc::ops::ceil_div(rows, 128);
  return static_cast<int>(c < 1 ? 1 : (c > 1024 ? 1024 : c));
}
/// Floats of scratch rms_norm_backward needs for `rows` rows of C: one partial sum per chunk and column.
inline std::int64_t rms_norm_partial_size(std::int64_t rows, std::int64_t C) { return rms_norm_chunks(rows) * C; }

namespace detail {
inline constexpr int warp_threads() { return tc::ops::warp_size; }
// The shapes of rope_expand / rope_reduce: `gqa` (B, T, (H + 2 G) hd), `mha` (B, T, 3 H hd), the table T hd/2.
template <class A, class B>
void check_rope(const A& gqa, const RopeTable& table, const dm::RopeShape& s, const B& mha, const char* what) {
  TESSERA_EXPECTS(s.seq > 0 && s.heads > 0 && s.kv_heads > 0 && s.heads % s.kv_heads == 0 && s.head_dim > 0 &&
                      s.head_dim % 2 == 0,
                  "llama ", what, ": heads ", s.heads, " must be a positive multiple of kv_heads ", s.kv_heads,
                  ", head_dim ", s.head_dim, " positive and even, seq ", s.seq, " positive");
  TESSERA_EXPECTS(gqa.shape.rank() == 3 && gqa.size(1) == s.seq && gqa.size(2) == s.gqa_cols() && mha.shape.rank() == 3 &&
                      mha.size(0) == gqa.size(0) && mha.size(1) == s.seq && mha.size(2) == s.mha_cols(),
                  "llama ", what, ": projection ", gqa.shape, " and attention layout ", mha.shape, " are not (B, ", s.seq,
                  ", ", s.gqa_cols(), ") and (B, ", s.seq, ", ", s.mha_cols(), ")");
  TESSERA_EXPECTS(table.cos.numel() >= s.seq * (s.head_dim / 2) && table.sin.numel() == table.cos.numel(),
                  "llama ", what, ": the RoPE table holds ", table.cos.numel(), " angles, ", s.seq, " positions of head_dim ",
                  s.head_dim, " need ", s.seq * (s.head_dim / 2));
}
}  // namespace detail

/// RMSNorm forward over rows of x (rows x C): y (rows x C) and each row's rstd (fp32, for
/// backward). Throws tessera::Error naming the shapes when they disagree.
template <class T>
void rms_norm_forward(const tc::Stream& s, DeviceView<const T> x, DeviceView<const T> weight, DeviceView<T> y,
                      DeviceView<float> rstd, float eps = 1e-6f) {
  const std::int64_t C = x.size(-1), rows = x.numel() / (C ? C : 1);
  TESSERA_EXPECTS(weight.numel() == C && y.numel() == x.numel() && rstd.numel() == rows, "llama rms_norm_forward: x ",
                  x.shape, ", weight ", weight.shape, ", y ", y.shape, ", rstd ", rstd.shape, " do not agree");
  if (rows == 0) return;
  const int warps = 8;
  kernels::rms_norm_forward<T><<<static_cast<unsigned>(tc::ops::ceil_div(rows, warps)), warps * detail::warp_threads(), 0,
                                 s.get()>>>(x.data, weight.data, y.data, rstd.data, rows, static_cast<int>(C), eps);
  tc::detail::check_launch("rms_norm_forward", "llama rms_norm_forward of ", x.shape);
}

/// RMSNorm backward: dx (written, or added to with `accumulate`) and the weight gradient added
/// into dweight (fp32), from dy, the forward's x and rstd. `partial` is scratch of at least
/// rms_norm_partial_size(rows, C) floats. dx must not alias x (x is read after dx is written).
/// Throws tessera::Error naming the shapes when they
/// disagree.
template <class T>
void rms_norm_backward(const tc::Stream& s, DeviceView<const T> dy, DeviceView<const T> x, DeviceView<const T> weight,
                       DeviceView<const float> rstd, DeviceView<T> dx, DeviceView<float> dweight,
                       DeviceView<float> partial, bool accumulate = false) {
  const std::int64_t C = x.size(-1), rows = x.numel() / (C ? C : 1);
  TESSERA_EXPECTS(dy.numel() == x.numel() && dx.numel() == x.numel() && weight.numel() == C && dweight.numel() == C &&
                      rstd.numel() == rows && partial.numel() >= rms_norm_partial_size(rows, C),
                  "llama rms_norm_backward: dy ", dy.shape, ", x ", x.shape, ", weight ", weight.shape, ", rstd ",
                  rstd.shape, ", dx ", dx.shape, ", dweight ", dweight.shape, ", scratch ", partial.numel(),
                  " floats (needs ", rms_norm_partial_size(rows, C), ") do not agree");
  if (rows == 0) return;
  const int warps = 8;
  kernels::rms_norm_backward_input<T><<<static_cast<unsigned>(tc::ops::ceil_div(rows, warps)), warps * detail::warp_threads(),
                                        0, s.get()>>>(dy.data, x.data, weight.data, rstd.data, dx.data, rows,
                                                      static_cast<int>(C), accumulate);
  tc::detail::check_launch("rms_norm_backward_input", "llama rms_norm_backward of ", x.shape);
  const int chunks = rms_norm_chunks(rows);
  const std::int64_t per_chunk = tc::ops::ceil_div(rows, chunks);
  const dim3 grid(static_cast<unsigned>(tc::ops::ceil_div(C, 128)), static_cast<unsigned>(chunks));
  kernels::rms_norm_backward_partial<T><<<grid, 128, 0, s.get()>>>(dy.data, x.data, rstd.data, partial.data, rows,
                                                                    static_cast<int>(C), per_chunk);
  tc::detail::check_launch("rms_norm_backward_partial", "llama rms_norm_backward of ", x.shape);
  kernels::rms_norm_backward_finish<<<static_cast<unsigned>(tc::ops::ceil_div(C, 128)), 128, 0, s.get()>>>(
      partial.data, dweight.data, static_cast<int>(C), chunks);
  tc::detail::check_launch("rms_norm_backward_finish", "llama rms_norm_backward of ", x.shape);
}

/// dm::rope_table uploaded on `s`. Throws tessera::Error unless seq > 0 and head_dim is even and positive.
inline RopeTable make_rope_table(const tc::Stream& s, std::int64_t seq, std::int64_t head_dim, double theta) {
  TESSERA_EXPECTS(seq > 0 && head_dim > 0 && head_dim % 2 == 0 && theta > 0, "llama make_rope_table: seq ", seq,
                  ", head_dim ", head_dim, " (even), theta ", theta, " must be positive");
  std::vector<float> c, sn;
  dm::rope_table(seq, head_dim, theta, c, sn);
  const tessera::Shape shape{seq * (head_dim / 2)};
  return {tc::to_device<float>(tessera::Tensor<float>::from(shape, std::span<const float>(c)), s),
          tc::to_device<float>(tessera::Tensor<float>::from(shape, std::span<const float>(sn)), s)};
}

/// Rotary embedding and GQA expansion: qkv (B, T, (H + 2 G) hd) -> out (B, T, 3 H hd), tessera's
/// attention layout, q and k rotated, each KV head repeated for the H / G query heads of its
/// group. Throws tessera::Error naming the numbers when the shapes or the table disagree.
template <class T>
void rope_expand(const tc::Stream& s, DeviceView<const T> qkv, const RopeTable& table, const dm::RopeShape& shape,
                 DeviceView<T> out) {
  detail::check_rope(qkv, table, shape, out, "rope_expand");
  const std::int64_t n = out.numel();
  if (n == 0) return;
  kernels::rope_expand<T><<<tc::ops::kernels::elementwise_blocks(n), 256, 0, s.get()>>>(
      qkv.data, table.cos.data(), table.sin.data(), out.data, n, shape);
  tc::detail::check_launch("rope_expand", "llama rope_expand of ", qkv.shape);
}

/// The backward of rope_expand: dout (B, T, 3 H hd) -> dqkv (B, T, (H + 2 G) hd), dq rotated
/// back, dk and dv of each KV head summed over its group in head order (dk rotated back).
/// Throws tessera::Error naming the numbers when the shapes or the table disagree.
template <class T>
void rope_reduce(const tc::Stream& s, DeviceView<const T> dout, const RopeTable& table, const dm::RopeShape& shape,
                 DeviceView<T> dqkv) {
  detail::check_rope(dqkv, table, shape, dout, "rope_reduce");
  const std::int64_t n = dqkv.numel();
  if (n == 0) return;
  kernels::rope_reduce<T><<<tc::ops::kernels::elementwise_blocks(n), 256, 0, s.get()>>>(
      dout.data, table.cos.data(), table.sin.data(), dqkv.data, n, shape);
  tc::detail::check_launch("rope_reduce", "llama rope_reduce of ", dout.shape);
}

/// y = silu(gate) up for x = [gate | up]: x (rows, 2F) -> y (rows, F). Throws tessera::Error
/// naming the shapes when they disagree.
template <class T>
void swiglu_forward(const tc::Stream& s, DeviceView<const T> x, DeviceView<T> y) {
  const std::int64_t F = y.size(-1);
  TESSERA_EXPECTS(F > 0 && x.size(-1) == 2 * F && x.numel() == 2 * y.numel(), "llama swiglu_forward: x ", x.shape,
                  " is not y ", y.shape, " with its last dim doubled ([gate | up])");
  const std::int64_t n = y.numel();
  if (n == 0) return;
  kernels::swiglu_forward<T><<<tc::ops::kernels::elementwise_blocks(n), 256, 0, s.get()>>>(x.data, y.data, n, F);
  tc::detail::check_launch("swiglu_forward", "llama swiglu_forward of ", x.shape);
}

/// dx (rows, 2F) = [d gate | d up] from x and dy (rows, F). Throws tessera::Error naming the
/// shapes when they disagree.
template <class T>
void swiglu_backward(const tc::Stream& s, DeviceView<const T> x, DeviceView<const T> dy, DeviceView<T> dx) {
  const std::int64_t F = dy.size(-1);
  TESSERA_EXPECTS(F > 0 && x.size(-1) == 2 * F && x.numel() == 2 * dy.numel() && dx.numel() == x.numel(),
                  "llama swiglu_backward: x ", x.shape, ", dy ", dy.shape, ", dx ", dx.shape, " do not agree");
  const std::int64_t n = dy.numel();
  if (n == 0) return;
  kernels::swiglu_backward<T><<<tc::ops::kernels::elementwise_blocks(n), 256, 0, s.get()>>>(x.data, dy.data, dx.data,
                                                                                           n, F);
  tc::detail::check_launch("swiglu_backward", "llama swiglu_backward of ", x.shape);
}

}  // namespace llama::device
