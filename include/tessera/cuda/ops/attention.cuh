#pragma once
/// @file
/// Causal multi-head attention on the device, as nn::CoreAttention (the reference, unfused
/// path, as llm.c's): the heads of the fused (B, T, 3C) projection split out to (3, B, H, T, hd),
/// scores = q k^T / sqrt(hd) by one strided-batched cuBLASLt call over all B x H heads, a causal
/// softmax kernel that keeps the probabilities (B, H, T, T) for backward, y = p v, the heads
/// merged back to (B, T, C). The fused path is ops/flash_attention.cuh; this one is what it is
/// checked against. CUDA code.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
// One warp per row (b, h, t) of the scores: p[t, j] = softmax_j(s[t, j]) for j <= t, 0 above.
template <class T>
__global__ void causal_softmax_forward(T* scores, std::int64_t rows, int Tn) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / warp_size) + threadIdx.x / warp_size;
  const int lane = static_cast<int>(threadIdx.x) % warp_size;
  if (row >= rows) return;
  const int t = static_cast<int>(row % Tn);
  T* r = scores + row * Tn;
  float mx = -INFINITY;
  for (int j = lane; j <= t; j += warp_size) mx = fmaxf(mx, load_f32(r[j]));
  mx = warp_max(mx);
  float se = 0.f;
  for (int j = lane; j <= t; j += warp_size) se += expf(load_f32(r[j]) - mx);
  se = warp_sum(se);
  for (int j = lane; j < Tn; j += warp_size) store_from_f32(r + j, j <= t ? expf(load_f32(r[j]) - mx) / se : 0.f);
}
// One warp per row: ds[t, j] = scale p[t, j] (dp[t, j] - sum_k p[t, k] dp[t, k]), in place of dp.
template <class T>
__global__ void causal_softmax_backward(const T* probs, T* dp, std::int64_t rows, int Tn, float scale) {
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / warp_size) + threadIdx.x / warp_size;
  const int lane = static_cast<int>(threadIdx.x) % warp_size;
  if (row >= rows) return;
  const int t = static_cast<int>(row % Tn);
  const T* p = probs + row * Tn;
  T* d = dp + row * Tn;
  float dot = 0.f;
  for (int j = lane; j <= t; j += warp_size) dot += load_f32(p[j]) * load_f32(d[j]);
  dot = warp_sum(dot);
  for (int j = lane; j < Tn; j += warp_size)
    store_from_f32(d + j, j <= t ? scale * load_f32(p[j]) * (load_f32(d[j]) - dot) : 0.f);
}
}  // namespace kernels

/// Sizes of one attention call: qkv (B, T, 3C), C = heads * head_dim.
struct AttentionShape {
  std::int64_t batch = 0;  ///< B
  std::int64_t seq = 0;    ///< T
  std::int64_t heads = 0;  ///< H
  std::int64_t dim = 0;    ///< C
  /// C / H.
  std::int64_t head_dim() const { return dim / heads; }
};

namespace detail {
inline AttentionShape attention_shape(const Shape& qkv, std::int64_t heads) {
  TESSERA_EXPECTS(qkv.rank() == 3 && heads >= 1 && qkv[2] % (3 * heads) == 0, "cuda attention: qkv of shape ", qkv,
                  " is not (B, T, 3C) with C divisible by ", heads, " heads");
  return {qkv[0], qkv[1], heads, qkv[2] / 3};
}
}  // namespace detail

namespace kernels {
// x (B, T, parts, H, hd) -> xp (parts, B, H, T, hd), one thread per element: the heads of the
// fused q, k, v (parts 3) or of an output gradient (parts 1) split out for batched products.
template <class T>
__global__ void split_heads(const T* x, T* xp, std::int64_t parts, std::int64_t B, std::int64_t Tn, std::int64_t H,
                            std::int64_t hd) {
  const std::int64_t n = parts * B * Tn * H * hd;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t e = i % hd, h = (i / hd) % H, p = (i / (hd * H)) % parts, t = (i / (hd * H * parts)) % Tn,
                       b = i / (hd * H * parts * Tn);
    xp[(((p * B + b) * H + h) * Tn + t) * hd + e] = x[i];
  }
}
// (B, H, T, hd) -> (B, T, H, hd), `parts` stacked tensors at once (parts x B x H x T x hd into
// a row of parts x C per (b, t), part p at columns [p C, (p + 1) C)).
template <class T>
__global__ void merge_heads(const T* xp, T* x, std::int64_t parts, std::int64_t B, std::int64_t Tn, std::int64_t H,
                            std::int64_t hd) {
  const std::int64_t n = parts * B * Tn * H * hd;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    // i indexes x: (b, t, part, h, e)
    const std::int64_t e = i % hd, h = (i / hd) % H, p = (i / (hd * H)) % parts, t = (i / (hd * H * parts)) % Tn,
                       b = i / (hd * H * parts * Tn);
    x[i] = xp[(((p * B + b) * H + h) * Tn + t) * hd + e];
  }
}
inline unsigned permute_blocks(std::int64_t n) {
  const std::int64_t b = ceil_div(n, 256);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}
}  // namespace kernels

/// Causal attention forward: y (B, T, C) from qkv (B, T, 3C). Keeps for backward the heads
/// split out, qkvp (3, B, H, T, hd), and the probabilities, probs (B, H, T, T); `yh` (B, H, T, hd)
/// is scratch. Every product is one strided-batched cuBLASLt call over all B x H heads. Throws
/// tessera::Error naming the shapes.
template <class T>
void attention_forward(const Stream& s, BlasLt& blas, DeviceView<const T> qkv, std::int64_t heads, DeviceView<T> qkvp,
                       DeviceView<T> probs, DeviceView<T> yh, DeviceView<T> y) {
  const AttentionShape a = detail::attention_shape(qkv.shape, heads);
  const std::int64_t B = a.batch, Tn = a.seq, H = a.heads, C = a.dim, hd = a.head_dim(), BH = B * H;
  TESSERA_EXPECTS(qkvp.numel() == qkv.numel() && probs.numel() == BH * Tn * Tn && yh.numel() == B * Tn * C &&
                      y.numel() == B * Tn * C,
                  "cuda attention_forward: qkvp ", qkvp.shape, ", probs ", probs.shape, ", yh ", yh.shape, " or y ",
                  y.shape, " do not fit qkv ", qkv.shape, " with ", heads, " heads");
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  kernels::split_heads<T><<<kernels::permute_blocks(qkv.numel()), 256, 0, s.get()>>>(qkv.data, qkvp.data, 3, B, Tn,
                                                                                     H, hd);
  cuda::detail::check_launch("split_heads", "cuda attention_forward of qkv ", qkv.shape);
  const T* q = qkvp.data;
  const T* k = q + BH * Tn * hd;
  const T* v = k + BH * Tn * hd;
  // scores = q k^T / sqrt(hd), every head in one call.
  blas.gemm(s, GemmShape{.trans_a = false, .trans_b = true, .m = Tn, .n = Tn, .k = hd, .batch = BH,
                         .stride_a = Tn * hd, .stride_b = Tn * hd, .stride_c = Tn * Tn},
            q, k, probs.data, scale, 0.f);
  const std::int64_t rows = BH * Tn;
  kernels::causal_softmax_forward<T><<<static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, s.get()>>>(probs.data, rows,
                                                                                                     static_cast<int>(Tn));
  cuda::detail::check_launch("causal_softmax_forward", "cuda attention_forward of qkv ", qkv.shape);
  blas.gemm(s, GemmShape{.m = Tn, .n = hd, .k = Tn, .batch = BH, .stride_a = Tn * Tn, .stride_b = Tn * hd,
                         .stride_c = Tn * hd},
            static_cast<const T*>(probs.data), v, yh.data);
  kernels::merge_heads<T><<<kernels::permute_blocks(y.numel()), 256, 0, s.get()>>>(yh.data, y.data, 1, B, Tn, H, hd);
  cuda::detail::check_launch("merge_heads", "cuda attention_forward of qkv ", qkv.shape);
}

/// Causal attention backward: dqkv (B, T, 3C) overwritten from dy (B, T, C) and the forward's
/// qkvp and probs. Scratch: dyh (B, H, T, hd), dprobs (probs' size), dqkvp (qkvp's size).
/// Throws tessera::Error naming the shapes.
template <class T>
void attention_backward(const Stream& s, BlasLt& blas, DeviceView<const T> dy, DeviceView<const T> qkvp,
                        std::int64_t heads, DeviceView<const T> probs, DeviceView<T> dyh, DeviceView<T> dprobs,
                        DeviceView<T> dqkvp, DeviceView<T> dqkv) {
  const AttentionShape a = detail::attention_shape(dqkv.shape, heads);
  const std::int64_t B = a.batch, Tn = a.seq, H = a.heads, C = a.dim, hd = a.head_dim(), BH = B * H;
  TESSERA_EXPECTS(qkvp.numel() == dqkv.numel() && dqkvp.numel() == dqkv.numel() && probs.numel() == BH * Tn * Tn &&
                      dprobs.numel() == probs.numel() && dy.numel() == B * Tn * C && dyh.numel() == dy.numel(),
                  "cuda attention_backward: dy ", dy.shape, ", qkvp ", qkvp.shape, ", probs ", probs.shape, ", dyh ",
                  dyh.shape, ", dprobs ", dprobs.shape, ", dqkvp ", dqkvp.shape, " do not fit dqkv ", dqkv.shape);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  // dy (B, T, H, hd) -> dyh (B, H, T, hd): split_heads's map with one part.
  kernels::split_heads<T><<<kernels::permute_blocks(dy.numel()), 256, 0, s.get()>>>(dy.data, dyh.data, 1, B, Tn, H, hd);
  cuda::detail::check_launch("split_heads", "cuda attention_backward of dy ", dy.shape);
  const T* q = qkvp.data;
  const T* k = q + BH * Tn * hd;
  const T* v = k + BH * Tn * hd;
  T* dq = dqkvp.data;
  T* dk = dq + BH * Tn * hd;
  T* dv = dk + BH * Tn * hd;
  // dP = dY V^T; dV = P^T dY.
  blas.gemm(s, GemmShape{.trans_b = true, .m = Tn, .n = Tn, .k = hd, .batch = BH, .stride_a = Tn * hd,
                         .stride_b = Tn * hd, .stride_c = Tn * Tn},
            static_cast<const T*>(dyh.data), v, dprobs.data);
  blas.gemm(s, GemmShape{.trans_a = true, .m = Tn, .n = hd, .k = Tn, .batch = BH, .stride_a = Tn * Tn,
                         .stride_b = Tn * hd, .stride_c = Tn * hd},
            probs.data, static_cast<const T*>(dyh.data), dv);
  const std::int64_t rows = BH * Tn;
  kernels::causal_softmax_backward<T><<<static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, s.get()>>>(
      probs.data, dprobs.data, rows, static_cast<int>(Tn), scale);
  cuda::detail::check_launch("causal_softmax_backward", "cuda attention_backward of dqkv ", dqkv.shape);
  // dQ = dS K; dK = dS^T Q (dS holds the 1/sqrt(hd) scale).
  blas.gemm(s, GemmShape{.m = Tn, .n = hd, .k = Tn, .batch = BH, .stride_a = Tn * Tn, .stride_b = Tn * hd,
                         .stride_c = Tn * hd},
            static_cast<const T*>(dprobs.data), k, dq);
  blas.gemm(s, GemmShape{.trans_a = true, .m = Tn, .n = hd, .k = Tn, .batch = BH, .stride_a = Tn * Tn,
                         .stride_b = Tn * hd, .stride_c = Tn * hd},
            static_cast<const T*>(dprobs.data), q, dk);
  kernels::merge_heads<T><<<kernels::permute_blocks(dqkv.numel()), 256, 0, s.get()>>>(dqkvp.data, dqkv.data, 3, B, Tn,
                                                                                      H, hd);
  cuda::detail::check_launch("merge_heads", "cuda attention_backward of dqkv ", dqkv.shape);
}

}  // namespace tessera::cuda::ops
