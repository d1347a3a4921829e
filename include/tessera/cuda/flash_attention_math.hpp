#pragma once
/// @file
/// The arithmetic of tessera's fused causal attention (ops/flash_attention.cuh), host and device
/// (TESSERA_HD), so that CI checks it on the host against nn::CoreAttention: FlashAttention-2's
/// blocking (Dao, 2023) over tiles of `flash_tile` keys or queries, fp32 throughout.
///
/// Forward, per query row: an online softmax over the key tiles (the running maximum m, the
/// running sum l of exp(s - m), the output accumulator rescaled by exp(m_old - m_new) once per
/// tile), then y = acc / l and the row's log-sum-exp lse = m + log(l), which backward keeps
/// instead of the (T, T) probabilities. Backward recomputes p = exp(s - lse) tile by tile, with
/// D = dy . y per query row (= sum_j p_j dp_j): dV_j = sum_i p_ij dy_i, dS_ij = p_ij (dy_i . v_j -
/// D_i), dK_j = scale sum_i dS_ij q_i, dQ_i = scale sum_j dS_ij k_j. Each output row is summed by
/// one thread in a fixed order (dK, dV over query tiles, dQ over key tiles): no atomics, the
/// same bits on every run.

#include <cmath>

#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/host_device.hpp"

namespace tessera::cuda::math {


/// Keys (forward, dQ) or queries (dK and dV) per tile.
inline constexpr int flash_tile = 32;
/// Query (or key) rows per block of the fused attention kernels, a thread each.
inline constexpr int flash_block_rows = 64;

// Loops over a row's elements run to the compile-time bound HD (at least the runtime head_dim
// hd, guarded by e < hd) so that the device keeps a row's values in registers; unrolled there.
#if defined(__CUDA_ARCH__)
#define TESSERA_FLASH_UNROLL _Pragma("unroll")
#else
#define TESSERA_FLASH_UNROLL
#endif

/// One query row's forward over one tile of keys: for the tile's first `count` keys (k_j at
/// k + j ld, v_j at v + j ld, hd elements each; count <= flash_tile), s_j = scale q . k_j,
/// folded into the running maximum `m` (-inf before the first tile), sum `l` and accumulator
/// `acc` (hd) of the online softmax. HD: a compile-time bound of hd (HD >= hd).
template <int HD>
TESSERA_HD inline void flash_forward_tile(const float* q, const float* k, const float* v, int ld, int count, int hd,
                                          float scale, float& m, float& l, float* acc) {
  if (count <= 0) return;
  float s[flash_tile];
  float mt = m;
  for (int j = 0; j < count; ++j) {
    float dot = 0.f;
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e)
      if (e < hd) dot += q[e] * k[j * ld + e];
    s[j] = scale * dot;
    mt = s[j] > mt ? s[j] : mt;
  }
  const float corr = exp_f(m - mt);  // 0 for the first tile (m = -inf)
  l *= corr;
  TESSERA_FLASH_UNROLL
  for (int e = 0; e < HD; ++e)
    if (e < hd) acc[e] *= corr;
  for (int j = 0; j < count; ++j) {
    const float p = exp_f(s[j] - mt);
    l += p;
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e)
      if (e < hd) acc[e] += p * v[j * ld + e];
  }
  m = mt;
}

/// The end of a row's forward: y = acc / l (hd), and the row's log-sum-exp m + log(l).
template <int HD>
TESSERA_HD inline float flash_forward_finish(const float* acc, float m, float l, int hd, float* y) {
  const float inv = 1.f / l;
  TESSERA_FLASH_UNROLL
  for (int e = 0; e < HD; ++e)
    if (e < hd) y[e] = acc[e] * inv;
  return m + log_f(l);
}

/// D = dy . y of one query row (hd elements).
TESSERA_HD inline float flash_row_dot(const float* dy, const float* y, int hd) {
  float d = 0.f;
  for (int e = 0; e < hd; ++e) d += dy[e] * y[e];
  return d;
}

/// One key row's dK and dV (hd each, added to) over a tile's `count` queries that attend to it
/// (q_i, dy_i at q + i ld, dy + i ld; lse_i, D_i at lse[i], D[i]). HD >= hd.
template <int HD>
TESSERA_HD inline void flash_dkv_tile(const float* k, const float* v, const float* q, const float* dy,
                                      const float* lse, const float* D, int ld, int count, int hd, float scale,
                                      float* dk, float* dv) {
  for (int i = 0; i < count; ++i) {
    float s = 0.f, dp = 0.f;
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e)
      if (e < hd) {
        s += q[i * ld + e] * k[e];
        dp += dy[i * ld + e] * v[e];
      }
    const float p = exp_f(scale * s - lse[i]);
    const float ds = p * (dp - D[i]);
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e)
      if (e < hd) {
        dv[e] += p * dy[i * ld + e];
        dk[e] += scale * ds * q[i * ld + e];
      }
  }
}

/// One query row's dQ (hd, added to) over a tile's first `count` keys (k_j, v_j at k + j ld,
/// v + j ld), from its q, dy, lse and D. HD >= hd.
template <int HD>
TESSERA_HD inline void flash_dq_tile(const float* q, const float* dy, float lse, float D, const float* k,
                                     const float* v, int ld, int count, int hd, float scale, float* dq) {
  for (int j = 0; j < count; ++j) {
    float s = 0.f, dp = 0.f;
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e)
      if (e < hd) {
        s += q[e] * k[j * ld + e];
        dp += dy[e] * v[j * ld + e];
      }
    const float p = exp_f(scale * s - lse);
    const float ds = p * (dp - D);
    TESSERA_FLASH_UNROLL
    for (int e = 0; e < HD; ++e)
      if (e < hd) dq[e] += scale * ds * k[j * ld + e];
  }
}

/// Keys of the tile starting at key `j0` that query row `t` attends to (causal: j <= t), at
/// most flash_tile and at most T - j0.
TESSERA_HD inline int flash_keys_seen(int t, int j0, int T) {
  if (t < j0) return 0;
  const int n = t - j0 + 1, left = T - j0;
  const int m = n < left ? n : left;
  return m < flash_tile ? m : flash_tile;
}

/// The queries of the tile starting at query `i0` that attend to key row `j` (i >= j, i < T):
/// [first, end) of the tile's rows.
TESSERA_HD inline void flash_queries_seeing(int j, int i0, int T, int& first, int& end) {
  first = j > i0 ? j - i0 : 0;
  const int left = T - i0;
  end = left < flash_tile ? left : flash_tile;
  if (first > end) first = end;
}

// The tensor-core kernels (ops/flash_attention_mma.cuh): bf16 q, k, v, dy in shared memory,
// every product on mma with fp32 accumulation, the softmax in fp32 in the base-2 domain
// (exponents exp2(s log2(e) - m2)), the probabilities and dS rounded to bf16 for the products
// that take them (as FlashAttention-2 does). Their tiles are square: flash_mma_tile query rows
// against flash_mma_tile keys, so a block of queries starting at i0 walks the key tiles
// j0 = 0, flash_mma_tile, ..., i0 (the last one is the diagonal tile, the only masked one).

/// Query rows and keys per tile of the tensor-core kernels.
inline constexpr int flash_mma_tile = 64;
/// log2(e): the tensor-core kernels' scores are taken as s log2(e) and exponentiated with exp2.
inline constexpr float flash_log2e = 1.4426950408889634f;
/// ln(2).
inline constexpr float flash_ln2 = 0.6931471805599453f;

/// Whether query row `t` attends to key `j` of a sequence of `T` (causal: j <= t, and j < T).
TESSERA_HD inline bool flash_mma_visible(int t, int j, int T) { return j <= t && j < T; }

/// A row's log-sum-exp (natural log, as flash_forward_finish's) from the tensor-core kernels'
/// running maximum `m2` (of s log2(e)) and sum `l` (of exp2(s log2(e) - m2)): m2 ln(2) + ln(l).
TESSERA_HD inline float flash_mma_lse(float m2, float l) { return m2 * flash_ln2 + log_f(l); }

/// The key tiles a block of query rows starting at `i0` walks (causal): i0 / flash_mma_tile + 1.
TESSERA_HD inline int flash_mma_key_tiles(int i0) { return i0 / flash_mma_tile + 1; }

}  // namespace tessera::cuda::math
