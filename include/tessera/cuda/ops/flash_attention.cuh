#pragma once
/// @file
/// Fused causal multi-head attention on the device (FlashAttention-2's algorithm, Dao 2023): the
/// forward never forms the (B, H, T, T) scores or probabilities. Each block takes 64 query rows
/// of one head, a thread per row, and walks the key tiles (flash_tile keys, staged in shared
/// memory) with an online softmax; it keeps for backward only each row's log-sum-exp, lse (B, H,
/// T) fp32. Backward recomputes the probabilities tile by tile: D = dy . y per row, then dK and dV
/// by a thread per key row over the query tiles, and dQ by a thread per query row over the key
/// tiles, each summed in a fixed order (no atomics: the same bits every run). It reads the fused
/// (B, T, 3C) projection and writes (B, T, C) and (B, T, 3C) directly (no head split or merge).
/// The arithmetic is cuda/flash_attention_math.hpp's (tested on the host against
/// nn::CoreAttention); fp32 throughout over float or bf16 storage; head_dim at most 128. These
/// kernels run on CUDA cores; for bf16 the launchers below take the tensor-core form
/// (ops/flash_attention_mma.cuh) where it applies (FlashPath). ops/attention.cuh's unfused path
/// stays as the check. CUDA code.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/flash_attention_math.hpp"
#include "tessera/cuda/ops/attention.cuh"
#include "tessera/cuda/ops/flash_attention_mma.cuh"
#include "tessera/cuda/ops/flash_row_dot.cuh"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

/// Query (or key) rows per block of the fused attention kernels (a thread each).
inline constexpr int flash_rows = math::flash_block_rows;
/// The largest head_dim the fused attention kernels take.
inline constexpr int flash_max_head_dim = 128;

/// Which kernels flash_attention_forward / backward run.
enum class FlashPath {
  automatic,    ///< tensor cores for bf16 where flash_mma_supported, else CUDA cores
  cuda_cores,   ///< the fp32-arithmetic kernels of this header (any storage, head_dim up to 128)
  tensor_cores  ///< ops/flash_attention_mma.cuh (bf16 only; throws where not flash_mma_supported)
};

namespace kernels {
// Element e of head h's q (part 0), k (1) or v (2) at row (b, t) of the fused (B, T, 3C) qkv.
__device__ __forceinline__ std::int64_t qkv_at(std::int64_t b, std::int64_t t, int part, std::int64_t h,
                                               std::int64_t Tn, std::int64_t C, std::int64_t hd) {
  return (b * Tn + t) * 3 * C + part * C + h * hd;
}

// The block's threads stage the key tile [j0, j0 + flash_tile) of head h (rows past T left out)
// into shared memory as fp32, k into ks and v into vs (hd floats per row).
template <class T>
__device__ __forceinline__ void stage_kv_tile(const T* qkv, float* ks, float* vs, int b, int h, int j0, int Tn, int C,
                                              int hd) {
  const int rows = min(math::flash_tile, Tn - j0);
  for (int i = static_cast<int>(threadIdx.x); i < rows * hd; i += flash_rows) {
    const int r = i / hd, e = i % hd;
    ks[r * hd + e] = load_f32(qkv[qkv_at(b, j0 + r, 1, h, Tn, C, hd) + e]);
    vs[r * hd + e] = load_f32(qkv[qkv_at(b, j0 + r, 2, h, Tn, C, hd) + e]);
  }
}

// Forward: block (query tile, b * H + h), a thread per query row.
template <class T, int HD>
__global__ void __launch_bounds__(flash_rows) flash_attention_forward(const T* qkv, T* y, float* lse, int H, int Tn,
                                                                      int C, int hd, float scale) {
  __shared__ float ks[math::flash_tile * HD];
  __shared__ float vs[math::flash_tile * HD];
  const int bh = static_cast<int>(blockIdx.y), b = bh / H, h = bh % H;
  const int row0 = static_cast<int>(blockIdx.x) * flash_rows, t = row0 + static_cast<int>(threadIdx.x);
  float q[HD], acc[HD];
  float m = -INFINITY, l = 0.f;
  if (t < Tn) {
    const T* qr = qkv + qkv_at(b, t, 0, h, Tn, C, hd);
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e) q[e] = e < hd ? load_f32(qr[e]) : 0.f, acc[e] = 0.f;
  }
  const int last = min(row0 + flash_rows, Tn) - 1;  // the block's last query row
  for (int j0 = 0; j0 <= last; j0 += math::flash_tile) {
    __syncthreads();
    stage_kv_tile(qkv, ks, vs, b, h, j0, Tn, C, hd);
    __syncthreads();
    if (t < Tn) math::flash_forward_tile<HD>(q, ks, vs, hd, math::flash_keys_seen(t, j0, Tn), hd, scale, m, l, acc);
  }
  if (t >= Tn) return;
  float out[HD];
  lse[static_cast<std::int64_t>(bh) * Tn + t] = math::flash_forward_finish<HD>(acc, m, l, hd, out);
  T* yr = y + (static_cast<std::int64_t>(b) * Tn + t) * C + static_cast<std::int64_t>(h) * hd;
  TESSERA_FLASH_UNROLL
  for (int e = 0; e < HD; ++e)
    if (e < hd) store_from_f32(yr + e, out[e]);
}

// dK and dV: block (key tile, b * H + h), a thread per key row, over the query tiles at or after it.
template <class T, int HD>
__global__ void __launch_bounds__(flash_rows) flash_attention_backward_kv(const T* qkv, const T* dy, const float* lse,
                                                                          const float* D, T* dqkv, int H, int Tn, int C,
                                                                          int hd, float scale) {
  __shared__ float qs[math::flash_tile * HD];
  __shared__ float dys[math::flash_tile * HD];
  __shared__ float ls[math::flash_tile], ds[math::flash_tile];
  const int bh = static_cast<int>(blockIdx.y), b = bh / H, h = bh % H;
  const int row0 = static_cast<int>(blockIdx.x) * flash_rows, j = row0 + static_cast<int>(threadIdx.x);
  float k[HD], v[HD], dk[HD], dv[HD];
  if (j < Tn) {
    const T* kr = qkv + qkv_at(b, j, 1, h, Tn, C, hd);
    const T* vr = qkv + qkv_at(b, j, 2, h, Tn, C, hd);
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e) {
      k[e] = e < hd ? load_f32(kr[e]) : 0.f;
      v[e] = e < hd ? load_f32(vr[e]) : 0.f;
      dk[e] = dv[e] = 0.f;
    }
  }
  const std::int64_t base = static_cast<std::int64_t>(bh) * Tn;
  for (int i0 = row0 / math::flash_tile * math::flash_tile; i0 < Tn; i0 += math::flash_tile) {
    __syncthreads();
    const int rows = min(math::flash_tile, Tn - i0);
    for (int i = static_cast<int>(threadIdx.x); i < rows * hd; i += flash_rows) {
      const int r = i / hd, e = i % hd;
      qs[r * hd + e] = load_f32(qkv[qkv_at(b, i0 + r, 0, h, Tn, C, hd) + e]);
      dys[r * hd + e] = load_f32(dy[(static_cast<std::int64_t>(b) * Tn + i0 + r) * C + static_cast<std::int64_t>(h) * hd + e]);
    }
    for (int r = static_cast<int>(threadIdx.x); r < rows; r += flash_rows) ls[r] = lse[base + i0 + r], ds[r] = D[base + i0 + r];
    __syncthreads();
    if (j < Tn) {
      int first = 0, end = 0;
      math::flash_queries_seeing(j, i0, Tn, first, end);
      math::flash_dkv_tile<HD>(k, v, qs + first * hd, dys + first * hd, ls + first, ds + first, hd, end - first, hd, scale,
                           dk, dv);
    }
  }
  if (j >= Tn) return;
  T* dkr = dqkv + qkv_at(b, j, 1, h, Tn, C, hd);
  T* dvr = dqkv + qkv_at(b, j, 2, h, Tn, C, hd);
  TESSERA_FLASH_UNROLL
  for (int e = 0; e < HD; ++e)
    if (e < hd) store_from_f32(dkr + e, dk[e]), store_from_f32(dvr + e, dv[e]);
}

// dQ: block (query tile, b * H + h), a thread per query row, over the key tiles at or before it.
template <class T, int HD>
__global__ void __launch_bounds__(flash_rows) flash_attention_backward_q(const T* qkv, const T* dy, const float* lse,
                                                                         const float* D, T* dqkv, int H, int Tn, int C,
                                                                         int hd, float scale) {
  __shared__ float ks[math::flash_tile * HD];
  __shared__ float vs[math::flash_tile * HD];
  const int bh = static_cast<int>(blockIdx.y), b = bh / H, h = bh % H;
  const int row0 = static_cast<int>(blockIdx.x) * flash_rows, t = row0 + static_cast<int>(threadIdx.x);
  float q[HD], g[HD], dq[HD];
  float row_lse = 0.f, row_d = 0.f;
  if (t < Tn) {
    const T* qr = qkv + qkv_at(b, t, 0, h, Tn, C, hd);
    const T* gr = dy + (static_cast<std::int64_t>(b) * Tn + t) * C + static_cast<std::int64_t>(h) * hd;
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e) {
      q[e] = e < hd ? load_f32(qr[e]) : 0.f;
      g[e] = e < hd ? load_f32(gr[e]) : 0.f;
      dq[e] = 0.f;
    }
    row_lse = lse[static_cast<std::int64_t>(bh) * Tn + t];
    row_d = D[static_cast<std::int64_t>(bh) * Tn + t];
  }
  const int last = min(row0 + flash_rows, Tn) - 1;
  for (int j0 = 0; j0 <= last; j0 += math::flash_tile) {
    __syncthreads();
    stage_kv_tile(qkv, ks, vs, b, h, j0, Tn, C, hd);
    __syncthreads();
    if (t < Tn) math::flash_dq_tile<HD>(q, g, row_lse, row_d, ks, vs, hd, math::flash_keys_seen(t, j0, Tn), hd, scale, dq);
  }
  if (t >= Tn) return;
  T* dqr = dqkv + qkv_at(b, t, 0, h, Tn, C, hd);
  TESSERA_FLASH_UNROLL
  for (int e = 0; e < HD; ++e)
    if (e < hd) store_from_f32(dqr + e, dq[e]);
}

}  // namespace kernels

/// Fused causal attention forward: y (B, T, C) from qkv (B, T, 3C) with `heads` heads, and each
/// query row's log-sum-exp lse (B, H, T) fp32 for backward. Throws tessera::Error naming the
/// shapes when they disagree or head_dim exceeds flash_max_head_dim.
/// `path` picks the kernels (FlashPath; tensor_cores with fp32 storage is refused).
template <class T>
void flash_attention_forward(const Stream& s, DeviceView<const T> qkv, std::int64_t heads, DeviceView<T> y,
                             DeviceView<float> lse, FlashPath path = FlashPath::automatic) {
  if constexpr (std::is_same_v<T, bf16>) {
    if (path == FlashPath::tensor_cores ||
        (path == FlashPath::automatic && qkv.shape.rank() == 3 && heads >= 1 && qkv.shape[2] % (3 * heads) == 0 &&
         flash_mma_supported(qkv.shape[2] / 3 / heads, {qkv.data})))
      return flash_mma_forward(s, qkv, heads, y, lse);
  } else {
    TESSERA_EXPECTS(path != FlashPath::tensor_cores,
                    "cuda flash_attention_forward: the tensor-core kernels take bf16 storage, not fp32");
  }
  const AttentionShape a = detail::attention_shape(qkv.shape, heads);
  const std::int64_t B = a.batch, Tn = a.seq, H = a.heads, C = a.dim, hd = a.head_dim();
  TESSERA_EXPECTS(y.numel() == B * Tn * C && lse.numel() == B * H * Tn && hd <= flash_max_head_dim &&
                      B * H <= 65535 && Tn < (std::int64_t{1} << 30),
                  "cuda flash_attention_forward: y ", y.shape, " or lse ", lse.shape, " do not fit qkv ", qkv.shape,
                  " with ", heads, " heads, or head_dim ", hd, " exceeds ", flash_max_head_dim, " (B H at most 65535)");
  if (B * Tn == 0) return;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const dim3 grid(static_cast<unsigned>(ceil_div(Tn, flash_rows)), static_cast<unsigned>(B * H));
  kernels::with_head_dim(hd, [&]<int HD>() {
    kernels::flash_attention_forward<T, HD><<<grid, flash_rows, 0, s.get()>>>(
        qkv.data, y.data, lse.data, static_cast<int>(H), static_cast<int>(Tn), static_cast<int>(C),
        static_cast<int>(hd), scale);
  });
  cuda::detail::check_launch("flash_attention_forward", "cuda flash_attention_forward of qkv ", qkv.shape);
}

/// Fused causal attention backward: dqkv (B, T, 3C) overwritten from dy (B, T, C), the forward's
/// qkv, y and lse; `D` (B, H, T) fp32 is scratch. Throws tessera::Error naming the shapes.
/// `path` as flash_attention_forward's (either backward takes either forward's lse).
template <class T>
void flash_attention_backward(const Stream& s, DeviceView<const T> dy, DeviceView<const T> qkv,
                              DeviceView<const T> y, DeviceView<const float> lse, std::int64_t heads,
                              DeviceView<float> D, DeviceView<T> dqkv, FlashPath path = FlashPath::automatic) {
  if constexpr (std::is_same_v<T, bf16>) {
    if (path == FlashPath::tensor_cores ||
        (path == FlashPath::automatic && qkv.shape.rank() == 3 && heads >= 1 && qkv.shape[2] % (3 * heads) == 0 &&
         flash_mma_supported(qkv.shape[2] / 3 / heads, {qkv.data, dy.data})))
      return flash_mma_backward(s, dy, qkv, y, lse, heads, D, dqkv);
  } else {
    TESSERA_EXPECTS(path != FlashPath::tensor_cores,
                    "cuda flash_attention_backward: the tensor-core kernels take bf16 storage, not fp32");
  }
  const AttentionShape a = detail::attention_shape(qkv.shape, heads);
  const std::int64_t B = a.batch, Tn = a.seq, H = a.heads, C = a.dim, hd = a.head_dim();
  TESSERA_EXPECTS(dy.numel() == B * Tn * C && y.numel() == dy.numel() && lse.numel() == B * H * Tn &&
                      D.numel() == lse.numel() && dqkv.numel() == qkv.numel() && hd <= flash_max_head_dim &&
                      B * H <= 65535 && Tn < (std::int64_t{1} << 30),
                  "cuda flash_attention_backward: dy ", dy.shape, ", y ", y.shape, ", lse ", lse.shape, ", D ",
                  D.shape, " or dqkv ", dqkv.shape, " do not fit qkv ", qkv.shape, " with ", heads,
                  " heads, or head_dim ", hd, " exceeds ", flash_max_head_dim);
  if (B * Tn == 0) return;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  kernels::flash_attention_row_dot<T><<<kernels::permute_blocks(B * H * Tn), 256, 0, s.get()>>>(
      dy.data, y.data, D.data, static_cast<int>(B), static_cast<int>(H), static_cast<int>(Tn), static_cast<int>(C),
      static_cast<int>(hd));
  cuda::detail::check_launch("flash_attention_row_dot", "cuda flash_attention_backward of dy ", dy.shape);
  const dim3 grid(static_cast<unsigned>(ceil_div(Tn, flash_rows)), static_cast<unsigned>(B * H));
  kernels::with_head_dim(hd, [&]<int HD>() {
    kernels::flash_attention_backward_kv<T, HD><<<grid, flash_rows, 0, s.get()>>>(
        qkv.data, dy.data, lse.data, D.data, dqkv.data, static_cast<int>(H), static_cast<int>(Tn),
        static_cast<int>(C), static_cast<int>(hd), scale);
    kernels::flash_attention_backward_q<T, HD><<<grid, flash_rows, 0, s.get()>>>(
        qkv.data, dy.data, lse.data, D.data, dqkv.data, static_cast<int>(H), static_cast<int>(Tn),
        static_cast<int>(C), static_cast<int>(hd), scale);
  });
  cuda::detail::check_launch("flash_attention_backward", "cuda flash_attention_backward of dqkv ", dqkv.shape);
}

}  // namespace tessera::cuda::ops
