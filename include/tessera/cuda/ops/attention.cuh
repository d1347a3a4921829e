#pragma once
/// @file
/// Causal multi-head attention on the device, as nn::CoreAttention (the reference, unfused
/// path): scores = q k^T / sqrt(hd) by cuBLASLt (batched over heads, one product per batch row,
/// reading q, k, v in place from the fused (B, T, 3C) projection), a causal softmax kernel that
/// keeps the probabilities (B, H, T, T) for backward, then y = p v written as (B, T, C). The
/// fused (flash) path is future work; this one is what it will be checked against. CUDA code.

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

/// Causal attention forward: y (B, T, C) and probs (B, H, T, T) (kept for backward) from qkv
/// (B, T, 3C). Throws tessera::Error naming the shapes.
template <class T>
void attention_forward(const Stream& s, BlasLt& blas, DeviceView<const T> qkv, std::int64_t heads, DeviceView<T> probs,
                       DeviceView<T> y) {
  const AttentionShape a = detail::attention_shape(qkv.shape, heads);
  const std::int64_t B = a.batch, Tn = a.seq, H = a.heads, C = a.dim, hd = a.head_dim();
  TESSERA_EXPECTS(probs.numel() == B * H * Tn * Tn && y.numel() == B * Tn * C, "cuda attention_forward: probs ",
                  probs.shape, " or y ", y.shape, " do not fit qkv ", qkv.shape, " with ", heads, " heads");
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  for (std::int64_t b = 0; b < B; ++b) {
    const T* q = qkv.data + b * Tn * 3 * C;
    GemmShape g{.trans_a = false, .trans_b = true, .m = Tn, .n = Tn, .k = hd, .lda = 3 * C, .ldb = 3 * C, .ldc = Tn,
                .batch = H, .stride_a = hd, .stride_b = hd, .stride_c = Tn * Tn};
    blas.gemm(s, g, q, q + C, probs.data + b * H * Tn * Tn, scale, 0.f);
  }
  const std::int64_t rows = B * H * Tn;
  kernels::causal_softmax_forward<T><<<static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, s.get()>>>(probs.data, rows,
                                                                                                     static_cast<int>(Tn));
  cuda::detail::check_launch("causal_softmax_forward", "cuda attention_forward of qkv ", qkv.shape);
  for (std::int64_t b = 0; b < B; ++b) {
    GemmShape g{.trans_a = false, .trans_b = false, .m = Tn, .n = hd, .k = Tn, .lda = Tn, .ldb = 3 * C, .ldc = C,
                .batch = H, .stride_a = Tn * Tn, .stride_b = hd, .stride_c = hd};
    blas.gemm(s, g, probs.data + b * H * Tn * Tn, qkv.data + b * Tn * 3 * C + 2 * C, y.data + b * Tn * C);
  }
}

/// Causal attention backward: dqkv (B, T, 3C) overwritten from dy (B, T, C), the forward's qkv
/// and probs; `dprobs` is scratch of probs' size. Throws tessera::Error naming the shapes.
template <class T>
void attention_backward(const Stream& s, BlasLt& blas, DeviceView<const T> dy, DeviceView<const T> qkv,
                        std::int64_t heads, DeviceView<const T> probs, DeviceView<T> dprobs, DeviceView<T> dqkv) {
  const AttentionShape a = detail::attention_shape(qkv.shape, heads);
  const std::int64_t B = a.batch, Tn = a.seq, H = a.heads, C = a.dim, hd = a.head_dim();
  TESSERA_EXPECTS(probs.numel() == B * H * Tn * Tn && dprobs.numel() == probs.numel() && dy.numel() == B * Tn * C &&
                      dqkv.numel() == qkv.numel(),
                  "cuda attention_backward: dy ", dy.shape, ", probs ", probs.shape, ", dprobs ", dprobs.shape,
                  ", dqkv ", dqkv.shape, " do not fit qkv ", qkv.shape);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  for (std::int64_t b = 0; b < B; ++b) {
    const T* dyb = dy.data + b * Tn * C;
    const T* qb = qkv.data + b * Tn * 3 * C;
    const T* pb = probs.data + b * H * Tn * Tn;
    T* dpb = dprobs.data + b * H * Tn * Tn;
    T* dqb = dqkv.data + b * Tn * 3 * C;
    // dP = dY V^T; dV = P^T dY.
    blas.gemm(s, GemmShape{.trans_a = false, .trans_b = true, .m = Tn, .n = Tn, .k = hd, .lda = C, .ldb = 3 * C,
                           .ldc = Tn, .batch = H, .stride_a = hd, .stride_b = hd, .stride_c = Tn * Tn},
              dyb, qb + 2 * C, dpb);
    blas.gemm(s, GemmShape{.trans_a = true, .trans_b = false, .m = Tn, .n = hd, .k = Tn, .lda = Tn, .ldb = C,
                           .ldc = 3 * C, .batch = H, .stride_a = Tn * Tn, .stride_b = hd, .stride_c = hd},
              pb, dyb, dqb + 2 * C);
  }
  const std::int64_t rows = B * H * Tn;
  kernels::causal_softmax_backward<T><<<static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, s.get()>>>(
      probs.data, dprobs.data, rows, static_cast<int>(Tn), scale);
  cuda::detail::check_launch("causal_softmax_backward", "cuda attention_backward of qkv ", qkv.shape);
  for (std::int64_t b = 0; b < B; ++b) {
    const T* qb = qkv.data + b * Tn * 3 * C;
    const T* dsb = dprobs.data + b * H * Tn * Tn;
    T* dqb = dqkv.data + b * Tn * 3 * C;
    // dQ = dS K; dK = dS^T Q (dS already holds the 1/sqrt(hd) scale).
    blas.gemm(s, GemmShape{.trans_a = false, .trans_b = false, .m = Tn, .n = hd, .k = Tn, .lda = Tn, .ldb = 3 * C,
                           .ldc = 3 * C, .batch = H, .stride_a = Tn * Tn, .stride_b = hd, .stride_c = hd},
              dsb, qb + C, dqb);
    blas.gemm(s, GemmShape{.trans_a = true, .trans_b = false, .m = Tn, .n = hd, .k = Tn, .lda = Tn, .ldb = 3 * C,
                           .ldc = 3 * C, .batch = H, .stride_a = Tn * Tn, .stride_b = hd, .stride_c = hd},
              dsb, qb, dqb + C);
  }
}

}  // namespace tessera::cuda::ops
