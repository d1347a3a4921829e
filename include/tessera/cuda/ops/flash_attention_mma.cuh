#pragma once
/// @file
/// Fused causal attention on tensor cores: FlashAttention-2's algorithm (Dao, 2023) over bf16
/// q, k, v with every product (S = Q K^T, O += P V; backward dP = dY V^T, dV += P^T dY,
/// dK += dS^T Q, dQ += dS K) on warp-level mma (CUDA's nvcuda::wmma, 16 x 16 x 16 bf16 tiles,
/// fp32 accumulation; sm_80 or newer). A block of 4 warps takes 64 query rows (forward, dQ) or
/// 64 keys (dK and dV) of one head; each warp owns 16 of its rows. The softmax is fp32 in the
/// base-2 domain; the probabilities and dS are rounded to bf16 for the products that take them.
/// The output layout, the log-sum-exp (natural log, B H T) and D = dy . y are those of the
/// CUDA-core kernels in ops/flash_attention.cuh, so either backward takes either forward's lse.
/// Backward is two kernels as there: dK and dV per key tile over the query tiles at or after it,
/// dQ per query tile over the key tiles at or before it; each output summed by one warp in a
/// fixed order, no atomics: the same bits on every run. head_dim: a multiple of 8 up to 128,
/// padded with zeros to 32, 64 or 128 in shared memory. Used by ops::flash_attention_forward /
/// backward for bf16 (FlashPath::automatic); the arithmetic of the tiles is
/// cuda/flash_attention_math.hpp's flash_mma_* (emulated on the host in tests/cuda). CUDA code.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/flash_attention_math.hpp"
#include "tessera/cuda/ops/attention.cuh"
#include "tessera/cuda/ops/flash_row_dot.cuh"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
// Runs f.template operator()<HD>() for the smallest of 32, 64, 128 holding hd (the compile-time
// head_dim bound of both forms of the fused attention kernels).
template <class F>
void with_head_dim(std::int64_t hd, F&& f) {
  if (hd <= 32)
    f.template operator()<32>();
  else if (hd <= 64)
    f.template operator()<64>();
  else
    f.template operator()<128>();
}
}  // namespace kernels

namespace kernels::mma {
namespace wmma = nvcuda::wmma;

inline constexpr int kTile = math::flash_mma_tile;  // query rows and keys per tile
inline constexpr int kWarps = kTile / 16;           // a warp per 16 rows
inline constexpr int kThreads = kWarps * warp_size;
inline constexpr int kLdS = kTile + 4;  // row stride (floats) of a (kTile, kTile) fp32 tile
inline constexpr int kLdP = kTile + 8;  // row stride (bf16) of a (kTile, kTile) bf16 tile
template <int HD>
inline constexpr int kLdH = HD + 8;  // row stride (bf16) of a (kTile, HD) bf16 tile
template <int HD>
inline constexpr int kLdO = HD + 4;  // row stride (floats) of a (kTile, HD) fp32 tile

constexpr std::size_t align128(std::size_t n) { return (n + 127) / 128 * 128; }
template <int HD>
inline constexpr std::size_t kRowsBytes = align128(std::size_t{kTile} * kLdH<HD> * 2);
inline constexpr std::size_t kScoreBytes = align128(std::size_t{kTile} * kLdS * 4);
inline constexpr std::size_t kProbBytes = align128(std::size_t{kTile} * kLdP * 2);
template <int HD>
inline constexpr std::size_t kOutBytes = align128(std::size_t{kTile} * kLdO<HD> * 4);

// Shared memory of the forward: q, k, v tiles, S, P, the output accumulator O.
template <int HD>
inline constexpr std::size_t forward_smem = 3 * kRowsBytes<HD> + kScoreBytes + kProbBytes + kOutBytes<HD>;
// Of both backward kernels: k, v, q, dy tiles, S and dP (fp32; reused to stage the outputs), P
// and dS (bf16), each query row's lse and D.
template <int HD>
inline constexpr std::size_t backward_smem = 4 * kRowsBytes<HD> + 2 * kScoreBytes + 2 * kProbBytes + 2 * kTile * 4;
static_assert(2 * kScoreBytes >= kOutBytes<128>, "the backward stages its outputs in S and dP");

using A_row = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using A_col = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using B_row = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using B_col = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// The block stages kTile rows (row r at src + r * stride, the first `rows` of them; hd <= HD
// elements each, hd a multiple of 8, 16-byte aligned) into dst (kTile, kLdH<HD>) bf16, zeros
// past `rows` and past hd.
template <int HD>
__device__ __forceinline__ void stage_rows(const __nv_bfloat16* src, std::int64_t stride, int rows, int hd,
                                           __nv_bfloat16* dst) {
  constexpr int chunks = HD / 8;
  for (int i = static_cast<int>(threadIdx.x); i < kTile * chunks; i += kThreads) {
    const int r = i / chunks, c = i % chunks * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows && c < hd) v = *reinterpret_cast<const uint4*>(src + r * stride + c);
    *reinterpret_cast<uint4*>(dst + r * kLdH<HD> + c) = v;
  }
}

// The block stages the key tile at j0 of the head whose q starts at `head` in qkv (row stride
// `stride`; k at + C, v at + 2C) into ks and vs.
template <int HD>
__device__ __forceinline__ void stage_kv(const __nv_bfloat16* head, std::int64_t stride, int C, int j0, int Tn, int hd,
                                         __nv_bfloat16* ks, __nv_bfloat16* vs) {
  stage_rows<HD>(head + j0 * stride + C, stride, min(kTile, Tn - j0), hd, ks);
  stage_rows<HD>(head + j0 * stride + 2 * C, stride, min(kTile, Tn - j0), hd, vs);
}

// out (16 rows x kTile, fp32, row stride kLdS) = a (16 rows x HD, bf16 row-major, kLdH) times
// b^T, b (kTile rows x HD, kLdH): the scores of a warp's 16 rows against a tile's keys.
template <int HD>
__device__ __forceinline__ void rows_times_tile_t(const __nv_bfloat16* a, const __nv_bfloat16* b, float* out) {
#pragma unroll
  for (int n = 0; n < kTile / 16; ++n) {
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int k = 0; k < HD; k += 16) {
      A_row fa;
      B_col fb;
      wmma::load_matrix_sync(fa, a + k, kLdH<HD>);
      wmma::load_matrix_sync(fb, b + n * 16 * kLdH<HD> + k, kLdH<HD>);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, kLdS, wmma::mem_row_major);
  }
}

// A block's head and first row (the block is (tile, b * H + h)), and this thread's warp and lane.
struct BlockHead {
  int bh, row0, warp, lane;
  std::int64_t stride;  // 3C: the row stride of qkv
  std::int64_t qkv_at;  // the head's q element 0 of its batch row's position 0 in qkv (k: + C, v: + 2C)
  std::int64_t out_at;  // the same in a (B, T, C) tensor (y, dy)
  __device__ BlockHead(int H, int Tn, int C, int hd)
      : bh(static_cast<int>(blockIdx.y)),
        row0(static_cast<int>(blockIdx.x) * kTile),
        warp(static_cast<int>(threadIdx.x) / warp_size),
        lane(static_cast<int>(threadIdx.x) % warp_size),
        stride(3 * static_cast<std::int64_t>(C)),
        qkv_at(static_cast<std::int64_t>(bh / H) * Tn * stride + static_cast<std::int64_t>(bh % H) * hd),
        out_at(static_cast<std::int64_t>(bh / H) * Tn * C + static_cast<std::int64_t>(bh % H) * hd) {}
};

// Forward: block (query tile, b * H + h).
template <int HD>
__global__ void __launch_bounds__(kThreads) forward(const __nv_bfloat16* qkv, __nv_bfloat16* y, float* lse, int H,
                                                     int Tn, int C, int hd, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  auto* qs = reinterpret_cast<__nv_bfloat16*>(smem);
  auto* ks = reinterpret_cast<__nv_bfloat16*>(smem + kRowsBytes<HD>);
  auto* vs = reinterpret_cast<__nv_bfloat16*>(smem + 2 * kRowsBytes<HD>);
  auto* ss = reinterpret_cast<float*>(smem + 3 * kRowsBytes<HD>);
  auto* ps = reinterpret_cast<__nv_bfloat16*>(smem + 3 * kRowsBytes<HD> + kScoreBytes);
  auto* os = reinterpret_cast<float*>(smem + 3 * kRowsBytes<HD> + kScoreBytes + kProbBytes);
  const BlockHead at(H, Tn, C, hd);
  const int i0 = at.row0, warp = at.warp, lane = at.lane;
  const std::int64_t stride = at.stride;
  const __nv_bfloat16* head = qkv + at.qkv_at;
  stage_rows<HD>(head + i0 * stride, stride, min(kTile, Tn - i0), hd, qs);
  float* ow = os + warp * 16 * kLdO<HD>;  // this warp's 16 rows of O
  for (int i = lane; i < 16 * HD; i += warp_size) ow[i / HD * kLdO<HD> + i % HD] = 0.f;
  // Each lane takes half a row of the score tile: row r of the warp's 16, keys half * 32 + [0, 32).
  const int r = lane / 2, half = lane % 2, t = i0 + warp * 16 + r;
  float m = -INFINITY, l = 0.f;
  for (int j0 = 0; j0 <= i0; j0 += kTile) {
    __syncthreads();  // every warp done with the previous k and v
    stage_kv<HD>(head, stride, C, j0, Tn, hd, ks, vs);
    __syncthreads();
    float* sw = ss + warp * 16 * kLdS;
    rows_times_tile_t<HD>(qs + warp * 16 * kLdH<HD>, ks, sw);
    __syncwarp();
    const float* srow = sw + r * kLdS + half * 32;
    float s2[32];
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      s2[c] = math::flash_mma_visible(t, j0 + half * 32 + c, Tn) ? srow[c] * scale_log2 : -INFINITY;
      mx = fmaxf(mx, s2[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);  // finite: key j0 <= i0 < Tn is seen by every row
    const float alpha = exp2f(m - m_new);  // 0 at the first tile
    __nv_bfloat16* prow = ps + (warp * 16 + r) * kLdP + half * 32;
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const float p = exp2f(s2[c] - m_new);
      sum += p;
      prow[c] = __float2bfloat16(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    float* orow = ow + r * kLdO<HD> + half * (HD / 2);
#pragma unroll
    for (int c = 0; c < HD / 2; ++c) orow[c] *= alpha;
    __syncwarp();
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) {  // O (16 x HD) += P (16 x kTile) V (kTile x HD)
      Acc acc;
      wmma::load_matrix_sync(acc, ow + n * 16, kLdO<HD>, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < kTile; k += 16) {
        A_row fa;
        B_row fb;
        wmma::load_matrix_sync(fa, ps + warp * 16 * kLdP + k, kLdP);
        wmma::load_matrix_sync(fb, vs + k * kLdH<HD> + n * 16, kLdH<HD>);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(ow + n * 16, acc, kLdO<HD>, wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (t >= Tn) return;
  const float inv = 1.f / l;
  const float* orow = ow + r * kLdO<HD>;
  __nv_bfloat16* yr = y + at.out_at + static_cast<std::int64_t>(t) * C;
  for (int c = half; c < hd; c += 2) yr[c] = __float2bfloat16(orow[c] * inv);
  if (half == 0) lse[static_cast<std::int64_t>(at.bh) * Tn + t] = math::flash_mma_lse(m, l);
#else
  __trap();  // built for an architecture without bf16 mma: the launcher does not launch this
#endif
}

// The backward's per-tile part shared by both kernels: S = Q K^T and dP = dY V^T for the warp's
// 16 query rows (of the tile at i0) against the key tile at j0, then P (into pw, if not null)
// and dS = P (dP - D) (into dsw), bf16, each lane half a row.
template <int HD>
__device__ __forceinline__ void scores_and_ds(const __nv_bfloat16* qs, const __nv_bfloat16* dys,
                                              const __nv_bfloat16* ks, const __nv_bfloat16* vs, const float* lse_s,
                                              const float* d_s, float* ss, float* dps, __nv_bfloat16* ps,
                                              __nv_bfloat16* dss, int warp, int lane, int i0, int j0, int Tn,
                                              float scale_log2) {
  float* sw = ss + warp * 16 * kLdS;
  float* dpw = dps + warp * 16 * kLdS;
  rows_times_tile_t<HD>(qs + warp * 16 * kLdH<HD>, ks, sw);
  rows_times_tile_t<HD>(dys + warp * 16 * kLdH<HD>, vs, dpw);
  __syncwarp();
  const int r = lane / 2, half = lane % 2, row = warp * 16 + r, i = i0 + row;
  const float lse2 = lse_s[row] * math::flash_log2e, d = d_s[row];
  const float* srow = sw + r * kLdS + half * 32;
  const float* dprow = dpw + r * kLdS + half * 32;
  __nv_bfloat16* dsrow = dss + row * kLdP + half * 32;
#pragma unroll
  for (int c = 0; c < 32; ++c) {
    const bool seen = i < Tn && math::flash_mma_visible(i, j0 + half * 32 + c, Tn);
    const float p = seen ? exp2f(srow[c] * scale_log2 - lse2) : 0.f;
    dsrow[c] = __float2bfloat16(p * (dprow[c] - d));
    if (ps != nullptr) ps[row * kLdP + half * 32 + c] = __float2bfloat16(p);
  }
}

// The block stages each of the tile's query rows' lse and D (0 past Tn).
__device__ __forceinline__ void stage_row_stats(const float* lse, const float* D, std::int64_t at, int rows,
                                                float* lse_s, float* d_s) {
  for (int r = static_cast<int>(threadIdx.x); r < kTile; r += kThreads) {
    lse_s[r] = r < rows ? lse[at + r] : 0.f;
    d_s[r] = r < rows ? D[at + r] : 0.f;
  }
}

// A warp writes its 16 rows of fragments (HD / 16 of them, times `factor`) to rows
// row0 + [0, 16) of the (T, ...) output at out (row stride `stride`, hd elements, rows < Tn),
// staged through its rows of `stage` (kLdO<HD> floats per row).
template <int HD>
__device__ __forceinline__ void write_rows(const Acc* frags, float factor, float* stage, int lane, int row0, int Tn,
                                           int hd, __nv_bfloat16* out, std::int64_t stride) {
#pragma unroll
  for (int n = 0; n < HD / 16; ++n) wmma::store_matrix_sync(stage + n * 16, frags[n], kLdO<HD>, wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 16 * hd; i += warp_size) {
    const int r = i / hd, c = i % hd;
    if (row0 + r < Tn) out[(row0 + r) * stride + c] = __float2bfloat16(stage[r * kLdO<HD> + c] * factor);
  }
  __syncwarp();
}

// The backward's shared-memory carve-up.
template <int HD>
struct BackwardTiles {
  __nv_bfloat16 *ks, *vs, *qs, *dys, *ps, *dss;
  float *ss, *dps, *lse_s, *d_s;
  __device__ explicit BackwardTiles(unsigned char* smem) {
    ks = reinterpret_cast<__nv_bfloat16*>(smem);
    vs = reinterpret_cast<__nv_bfloat16*>(smem + kRowsBytes<HD>);
    qs = reinterpret_cast<__nv_bfloat16*>(smem + 2 * kRowsBytes<HD>);
    dys = reinterpret_cast<__nv_bfloat16*>(smem + 3 * kRowsBytes<HD>);
    ss = reinterpret_cast<float*>(smem + 4 * kRowsBytes<HD>);
    dps = reinterpret_cast<float*>(smem + 4 * kRowsBytes<HD> + kScoreBytes);
    ps = reinterpret_cast<__nv_bfloat16*>(smem + 4 * kRowsBytes<HD> + 2 * kScoreBytes);
    dss = reinterpret_cast<__nv_bfloat16*>(smem + 4 * kRowsBytes<HD> + 2 * kScoreBytes + kProbBytes);
    lse_s = reinterpret_cast<float*>(smem + 4 * kRowsBytes<HD> + 2 * kScoreBytes + 2 * kProbBytes);
    d_s = lse_s + kTile;
  }
  // The block stages the query tile at i0: q, dy and each row's lse and D.
  __device__ void stage_queries(const __nv_bfloat16* qkv, const __nv_bfloat16* dy, const float* lse, const float* D,
                                const BlockHead& at, int i0, int Tn, int C, int hd) const {
    stage_rows<HD>(qkv + at.qkv_at + i0 * at.stride, at.stride, min(kTile, Tn - i0), hd, qs);
    stage_rows<HD>(dy + at.out_at + static_cast<std::int64_t>(i0) * C, C, min(kTile, Tn - i0), hd, dys);
    stage_row_stats(lse, D, static_cast<std::int64_t>(at.bh) * Tn + i0, min(kTile, Tn - i0), lse_s, d_s);
  }
};

// dK and dV: block (key tile, b * H + h), over the query tiles at or after it.
template <int HD>
__global__ void __launch_bounds__(kThreads) backward_kv(const __nv_bfloat16* qkv, const __nv_bfloat16* dy,
                                                         const float* lse, const float* D, __nv_bfloat16* dqkv, int H,
                                                         int Tn, int C, int hd, float scale, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const BackwardTiles<HD> s(smem);
  const BlockHead at(H, Tn, C, hd);
  const int j0 = at.row0, warp = at.warp, lane = at.lane;
  const std::int64_t stride = at.stride, head_at = at.qkv_at;
  const __nv_bfloat16* head = qkv + head_at;
  stage_kv<HD>(head, stride, C, j0, Tn, hd, s.ks, s.vs);
  Acc dk[HD / 16], dv[HD / 16];
#pragma unroll
  for (int n = 0; n < HD / 16; ++n) wmma::fill_fragment(dk[n], 0.f), wmma::fill_fragment(dv[n], 0.f);
  for (int i0 = j0; i0 < Tn; i0 += kTile) {
    __syncthreads();  // every warp done with the previous tile's q, dy, P and dS
    s.stage_queries(qkv, dy, lse, D, at, i0, Tn, C, hd);
    __syncthreads();
    scores_and_ds<HD>(s.qs, s.dys, s.ks, s.vs, s.lse_s, s.d_s, s.ss, s.dps, s.ps, s.dss, warp, lane, i0, j0, Tn,
                      scale_log2);
    __syncthreads();  // P and dS of every query row of the tile
    // The warp's 16 keys: dV += P^T dY, dK += dS^T Q (the sum over the tile's 64 queries).
#pragma unroll
    for (int n = 0; n < HD / 16; ++n)
#pragma unroll
      for (int k = 0; k < kTile; k += 16) {
        A_col fp, fds;
        B_row fdy, fq;
        wmma::load_matrix_sync(fp, s.ps + k * kLdP + warp * 16, kLdP);
        wmma::load_matrix_sync(fdy, s.dys + k * kLdH<HD> + n * 16, kLdH<HD>);
        wmma::mma_sync(dv[n], fp, fdy, dv[n]);
        wmma::load_matrix_sync(fds, s.dss + k * kLdP + warp * 16, kLdP);
        wmma::load_matrix_sync(fq, s.qs + k * kLdH<HD> + n * 16, kLdH<HD>);
        wmma::mma_sync(dk[n], fds, fq, dk[n]);
      }
  }
  // S and dP are no longer read (the last products read P, dS, q and dy): stage the outputs there.
  float* stage = s.ss + warp * 16 * kLdO<HD>;
  __nv_bfloat16* dkv = dqkv + head_at;
  write_rows<HD>(dv, 1.f, stage, lane, j0 + warp * 16, Tn, hd, dkv + 2 * C, stride);
  write_rows<HD>(dk, scale, stage, lane, j0 + warp * 16, Tn, hd, dkv + C, stride);
#else
  __trap();
#endif
}

// dQ: block (query tile, b * H + h), over the key tiles at or before it.
template <int HD>
__global__ void __launch_bounds__(kThreads) backward_q(const __nv_bfloat16* qkv, const __nv_bfloat16* dy,
                                                        const float* lse, const float* D, __nv_bfloat16* dqkv, int H,
                                                        int Tn, int C, int hd, float scale, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const BackwardTiles<HD> s(smem);
  const BlockHead at(H, Tn, C, hd);
  const int i0 = at.row0, warp = at.warp, lane = at.lane;
  const std::int64_t stride = at.stride, head_at = at.qkv_at;
  const __nv_bfloat16* head = qkv + head_at;
  s.stage_queries(qkv, dy, lse, D, at, i0, Tn, C, hd);
  Acc dq[HD / 16];
#pragma unroll
  for (int n = 0; n < HD / 16; ++n) wmma::fill_fragment(dq[n], 0.f);
  for (int j0 = 0; j0 <= i0; j0 += kTile) {
    __syncthreads();  // every warp done with the previous k and v (and q, dy, lse, D staged)
    stage_kv<HD>(head, stride, C, j0, Tn, hd, s.ks, s.vs);
    __syncthreads();
    scores_and_ds<HD>(s.qs, s.dys, s.ks, s.vs, s.lse_s, s.d_s, s.ss, s.dps, nullptr, s.dss, warp, lane, i0, j0, Tn,
                      scale_log2);
    __syncwarp();  // the warp's rows of dS
#pragma unroll
    for (int n = 0; n < HD / 16; ++n)  // dQ (16 x HD) += dS (16 x kTile) K (kTile x HD)
#pragma unroll
      for (int k = 0; k < kTile; k += 16) {
        A_row fds;
        B_row fk;
        wmma::load_matrix_sync(fds, s.dss + warp * 16 * kLdP + k, kLdP);
        wmma::load_matrix_sync(fk, s.ks + k * kLdH<HD> + n * 16, kLdH<HD>);
        wmma::mma_sync(dq[n], fds, fk, dq[n]);
      }
  }
  __syncthreads();  // the outputs are staged over S and dP, which other warps may still read
  write_rows<HD>(dq, scale, s.ss + warp * 16 * kLdO<HD>, lane, i0 + warp * 16, Tn, hd, dqkv + head_at, stride);
#else
  __trap();
#endif
}


// Whether the current device runs the tensor-core kernels: compute capability 8.0 or newer, the
// kernels built for such an architecture (the gpu_arch build option), and at least `smem` bytes
// of shared memory per block (sm_86, sm_89 and sm_120 allow 99 KB, too little for head_dim
// above 64). The device's figures are cached per device.
inline bool device_runs_mma(std::size_t smem) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  static std::atomic<long long> cached[64] = {};  // 0 unknown, -1 no mma, else the shared memory opt-in + 1
  long long have = dev >= 0 && dev < 64 ? cached[dev].load() : 0;
  if (have == 0) {
    int major = 0, optin = 0;
    cudaFuncAttributes attr{};
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    major >= 8 &&
                    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
                    cudaFuncGetAttributes(&attr, forward<64>) == cudaSuccess && attr.binaryVersion >= 80 &&
                    attr.ptxVersion >= 80;
    if (!ok) (void)cudaGetLastError();  // a failed query's error, not an earlier one of the caller's
    have = ok ? static_cast<long long>(optin) + 1 : -1;
    if (dev >= 0 && dev < 64) cached[dev].store(have);
  }
  return have > 0 && static_cast<std::size_t>(have - 1) >= smem;
}
}  // namespace kernels::mma

/// Shared memory (bytes) a block of the tensor-core forward / backward kernels takes at this
/// head_dim (padded to 32, 64 or 128): at 64, 71,680 forward and 90,624 backward; at 128,
/// 112,640 and 123,392.
inline std::size_t flash_mma_shared_bytes(std::int64_t head_dim, bool backward) {
  std::size_t bytes = 0;
  kernels::with_head_dim(head_dim, [&]<int HD>() {
    bytes = backward ? kernels::mma::backward_smem<HD> : kernels::mma::forward_smem<HD>;
  });
  return bytes;
}

/// Whether the tensor-core attention kernels take these arguments: head_dim a multiple of 8 up
/// to 128, the pointers they read by 16-byte loads (qkv, dy) 16-byte aligned, and a device of
/// compute capability 8.0 or newer that the kernels were built for, with the shared memory per
/// block they need at this head_dim (flash_mma_shared_bytes). Needs a device.
inline bool flash_mma_supported(std::int64_t head_dim, std::initializer_list<const void*> loaded) {
  if (head_dim % 8 != 0 || head_dim < 8 || head_dim > 128) return false;
  for (const void* p : loaded)
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return kernels::mma::device_runs_mma(
      std::max(flash_mma_shared_bytes(head_dim, false), flash_mma_shared_bytes(head_dim, true)));
}

namespace detail {
// Lets `Kernel` take `bytes` of dynamic shared memory per block on the current device (once
// per device; the attribute is the device's).
template <auto Kernel>
void set_smem(std::size_t bytes, const char* name) {
  int dev = 0;
  cuda::detail::check(cudaGetDevice(&dev), "cudaGetDevice", "cuda ", name);
  static std::atomic<bool> done[64] = {};
  if (dev >= 0 && dev < 64 && done[dev].load()) return;
  cuda::detail::check(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                      "cudaFuncSetAttribute", "cuda ", name, ": ", bytes, " bytes of shared memory per block");
  if (dev >= 0 && dev < 64) done[dev].store(true);
}
}  // namespace detail

/// Tensor-core fused causal attention forward (bf16): y (B, T, C) from qkv (B, T, 3C) with
/// `heads` heads, and each query row's log-sum-exp lse (B, H, T) fp32. Throws tessera::Error
/// naming the shapes when they disagree, and when flash_mma_supported is false for them.
inline void flash_mma_forward(const Stream& s, DeviceView<const bf16> qkv, std::int64_t heads, DeviceView<bf16> y,
                              DeviceView<float> lse) {
  const AttentionShape a = ops::detail::attention_shape(qkv.shape, heads);
  const std::int64_t B = a.batch, Tn = a.seq, H = a.heads, C = a.dim, hd = a.head_dim();
  TESSERA_EXPECTS(y.numel() == B * Tn * C && lse.numel() == B * H * Tn && B * H <= 65535 &&
                      Tn < (std::int64_t{1} << 30),
                  "cuda flash_mma_forward: y ", y.shape, " or lse ", lse.shape, " do not fit qkv ", qkv.shape, " with ",
                  heads, " heads (B H at most 65535)");
  TESSERA_EXPECTS(flash_mma_supported(hd, {qkv.data}),
                  "cuda flash_mma_forward: the tensor-core kernels do not take head_dim ", hd,
                  " (a multiple of 8 up to 128), unaligned views (16 bytes) or this device (compute capability 8.0, "
                  "a build for it and ", flash_mma_shared_bytes(hd, true), " bytes of shared memory per block)");
  if (B * Tn == 0) return;
  const float scale_log2 = math::flash_log2e * (1.f / std::sqrt(static_cast<float>(hd)));  // as the backward's
  const dim3 grid(static_cast<unsigned>(ceil_div(Tn, kernels::mma::kTile)), static_cast<unsigned>(B * H));
  kernels::with_head_dim(hd, [&]<int HD>() {
    constexpr std::size_t bytes = kernels::mma::forward_smem<HD>;
    detail::set_smem<kernels::mma::forward<HD>>(bytes, "flash_mma_forward");
    kernels::mma::forward<HD><<<grid, kernels::mma::kThreads, bytes, s.get()>>>(
        qkv.data, y.data, lse.data, static_cast<int>(H), static_cast<int>(Tn), static_cast<int>(C),
        static_cast<int>(hd), scale_log2);
  });
  cuda::detail::check_launch("flash_mma_forward", "cuda flash_mma_forward of qkv ", qkv.shape);
}

/// Tensor-core fused causal attention backward (bf16): dqkv (B, T, 3C) overwritten from dy
/// (B, T, C), the forward's qkv, y and lse; `D` (B, H, T) fp32 is scratch. Throws
/// tessera::Error as flash_mma_forward.
inline void flash_mma_backward(const Stream& s, DeviceView<const bf16> dy, DeviceView<const bf16> qkv,
                               DeviceView<const bf16> y, DeviceView<const float> lse, std::int64_t heads,
                               DeviceView<float> D, DeviceView<bf16> dqkv) {
  const AttentionShape a = ops::detail::attention_shape(qkv.shape, heads);
  const std::int64_t B = a.batch, Tn = a.seq, H = a.heads, C = a.dim, hd = a.head_dim();
  TESSERA_EXPECTS(dy.numel() == B * Tn * C && y.numel() == dy.numel() && lse.numel() == B * H * Tn &&
                      D.numel() == lse.numel() && dqkv.numel() == qkv.numel() && B * H <= 65535 &&
                      Tn < (std::int64_t{1} << 30),
                  "cuda flash_mma_backward: dy ", dy.shape, ", y ", y.shape, ", lse ", lse.shape, ", D ", D.shape,
                  " or dqkv ", dqkv.shape, " do not fit qkv ", qkv.shape, " with ", heads, " heads");
  TESSERA_EXPECTS(flash_mma_supported(hd, {qkv.data, dy.data}),
                  "cuda flash_mma_backward: the tensor-core kernels do not take head_dim ", hd,
                  " (a multiple of 8 up to 128), unaligned views (16 bytes) or this device (compute capability 8.0, "
                  "a build for it and ", flash_mma_shared_bytes(hd, true), " bytes of shared memory per block)");
  if (B * Tn == 0) return;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd)), scale_log2 = math::flash_log2e * scale;
  kernels::flash_attention_row_dot<bf16><<<kernels::permute_blocks(B * H * Tn), 256, 0, s.get()>>>(
      dy.data, y.data, D.data, static_cast<int>(B), static_cast<int>(H), static_cast<int>(Tn), static_cast<int>(C),
      static_cast<int>(hd));
  cuda::detail::check_launch("flash_attention_row_dot", "cuda flash_mma_backward of dy ", dy.shape);
  const dim3 grid(static_cast<unsigned>(ceil_div(Tn, kernels::mma::kTile)), static_cast<unsigned>(B * H));
  kernels::with_head_dim(hd, [&]<int HD>() {
    constexpr std::size_t bytes = kernels::mma::backward_smem<HD>;
    detail::set_smem<kernels::mma::backward_kv<HD>>(bytes, "flash_mma_backward");
    detail::set_smem<kernels::mma::backward_q<HD>>(bytes, "flash_mma_backward");
    kernels::mma::backward_kv<HD><<<grid, kernels::mma::kThreads, bytes, s.get()>>>(
        qkv.data, dy.data, lse.data, D.data, dqkv.data, static_cast<int>(H), static_cast<int>(Tn),
        static_cast<int>(C), static_cast<int>(hd), scale, scale_log2);
    kernels::mma::backward_q<HD><<<grid, kernels::mma::kThreads, bytes, s.get()>>>(
        qkv.data, dy.data, lse.data, D.data, dqkv.data, static_cast<int>(H), static_cast<int>(Tn),
        static_cast<int>(C), static_cast<int>(hd), scale, scale_log2);
  });
  cuda::detail::check_launch("flash_mma_backward", "cuda flash_mma_backward of dqkv ", dqkv.shape);
}

}  // namespace tessera::cuda::ops
