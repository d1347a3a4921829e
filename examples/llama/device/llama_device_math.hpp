#pragma once
/// @file
/// The arithmetic and the index mapping of the Llama example's own device kernels
/// (llama_kernels.cuh: RMSNorm, rotary embedding with the grouped-query heads expanded for
/// tessera's multi-head attention, SwiGLU), callable from host and device (TESSERA_HD) so that
/// tests/llama checks each of them on the host against the CPU layers of llama_layers.hpp, and
/// the kernels only load, call these, and store.
///
/// The rotary-embedding step is fused with GQA's head expansion: tessera's device attention
/// (tessera/cuda/ops/attention.cuh) takes the multi-head layout (B, T, 3 H hd) = [q | k | v],
/// H heads each, while the Llama projection gives (B, T, (H + 2 G) hd) with G KV heads, each
/// read by the H / G query heads of its group. Forward: q and k rotated, k and v repeated per
/// group (rope_expand_source). Backward: dq rotated back; dk and dv of a KV head the sum over its
/// group's query heads, dk rotated back (rope_reduce_sources).

#include <cmath>
#include <cstdint>
#include <vector>

#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/host_device.hpp"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace llama::device_math {

/// x as fp32 (storage float).
TESSERA_HD inline float to_f32(float x) { return x; }
#if defined(__CUDACC__)
/// x as fp32 (storage bf16, widened exactly).
TESSERA_HD inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
#endif

/// sigmoid(a) = 1 / (1 + exp(-a)), fp32.
TESSERA_HD inline float sigmoid(float a) { return 1.f / (1.f + tessera::cuda::math::exp_f(-a)); }

/// SwiGLU of one element: silu(gate) up = gate sigmoid(gate) up (llama::SwiGLU::forward).
TESSERA_HD inline float swiglu(float gate, float up) { return gate * sigmoid(gate) * up; }

/// The gradients of one SwiGLU element.
struct SwiGLUGrad {
  float gate;  ///< dy up sigmoid(gate) (1 + gate (1 - sigmoid(gate)))
  float up;    ///< dy silu(gate)
};

/// d gate and d up of one element from dy (llama::SwiGLU::backward).
TESSERA_HD inline SwiGLUGrad swiglu_backward(float gate, float up, float dy) {
  const float s = sigmoid(gate);
  return {dy * up * s * (1.f + gate * (1.f - s)), dy * gate * s};
}

/// Columns of SwiGLU's input row for output column j of F: gate at j, up at F + j (x = [gate | up]).
struct SwiGLUColumns {
  std::int64_t gate;  ///< flat index of the gate element
  std::int64_t up;    ///< flat index of the up element
};
/// Where output element i (of rows x F) reads its gate and up in the (rows, 2F) input.
TESSERA_HD inline SwiGLUColumns swiglu_columns(std::int64_t i, std::int64_t F) {
  const std::int64_t row = i / F, j = i % F;
  return {row * 2 * F + j, row * 2 * F + F + j};
}

/// RMSNorm's reciprocal RMS of a row: 1 / sqrt(sum_sq / d + eps) (llama::RMSNorm::forward).
TESSERA_HD inline float rms_rstd(float sum_sq, std::int64_t d, float eps) {
  return 1.f / tessera::cuda::math::sqrt_f(sum_sq / static_cast<float>(d) + eps);
}

/// RMSNorm's output of one element: x rstd w (llama::RMSNorm::forward: xhat = x rstd, y = xhat w).
TESSERA_HD inline float rms_norm_y(float x, float rstd, float w) { return x * rstd * w; }

/// One row's term of RMSNorm's weight gradient for one element: dy xhat = dy x rstd.
TESSERA_HD inline float rms_norm_dw_term(float dy, float x, float rstd) { return dy * x * rstd; }

/// RMSNorm's input gradient of one element: rstd (g w - xhat mean(g w xhat)), xhat = x rstd
/// (llama::RMSNorm::backward).
TESSERA_HD inline float rms_norm_dx(float dy, float w, float xhat, float mean_gwh, float rstd) {
  return rstd * (dy * w - xhat * mean_gwh);
}

/// One rotated pair (lo, hi) = columns (i, i + hd/2) of a head.
struct Pair {
  float lo;  ///< column i
  float hi;  ///< column i + hd/2
};
/// (lo, hi) rotated by the angle whose cosine and sine are (c, s): (lo c - hi s, hi c + lo s);
/// s negated rotates back (the backward).
TESSERA_HD inline Pair rope_rotate(float lo, float hi, float c, float s) { return {lo * c - hi * s, hi * c + lo * s}; }

/// The cos and sin table of RoPE for positions 0..T-1 and head width hd, at [t hd/2 + i]: the
/// angle t theta^(-2i / hd), computed in double and rounded once, exactly as
/// llama::RotaryAttentionCore builds its own (so the device rotates by the same fp32 values).
/// Host only.
inline void rope_table(std::int64_t T, std::int64_t hd, double theta, std::vector<float>& cos, std::vector<float>& sin) {
  const std::int64_t half = hd / 2;
  cos.assign(static_cast<std::size_t>(T * half), 0.f);
  sin.assign(static_cast<std::size_t>(T * half), 0.f);
  for (std::int64_t i = 0; i < half; ++i) {
    const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(hd));
    for (std::int64_t t = 0; t < T; ++t) {
      const double angle = static_cast<double>(t) * inv_freq;
      cos[static_cast<std::size_t>(t * half + i)] = static_cast<float>(std::cos(angle));
      sin[static_cast<std::size_t>(t * half + i)] = static_cast<float>(std::sin(angle));
    }
  }
}

/// Head counts and sizes of the rotary GQA expansion.
struct RopeShape {
  std::int64_t seq = 0;      ///< T (rows are (b, t), t = row % T)
  std::int64_t heads = 0;    ///< H, query heads
  std::int64_t kv_heads = 0; ///< G, KV heads (H % G == 0)
  std::int64_t head_dim = 0; ///< hd (even)
  /// Columns of a projection row: (H + 2 G) hd.
  TESSERA_HD std::int64_t gqa_cols() const { return (heads + 2 * kv_heads) * head_dim; }
  /// Columns of an attention-layout row: 3 H hd.
  TESSERA_HD std::int64_t mha_cols() const { return 3 * heads * head_dim; }
};

/// Where output element `idx` of the expanded (rows, 3 H hd) layout reads: its pair (lo, hi)
/// in the (rows, (H + 2 G) hd) projection, the table entry of its angle, and which half of the
/// rotated pair it is. v is copied (rotate false: the value is `lo`).
struct ExpandSource {
  std::int64_t lo = 0;      ///< flat index of column i of the source head (the element itself for v)
  std::int64_t hi = 0;      ///< flat index of column i + hd/2
  std::int64_t angle = 0;   ///< t hd/2 + i, into rope_table's arrays
  bool rotate = false;      ///< q or k: rotated; v: copied
  bool upper = false;       ///< the element is the pair's hi (column >= hd/2)
};
/// The source of expanded element `idx` (class comment of the file).
TESSERA_HD inline ExpandSource rope_expand_source(std::int64_t idx, const RopeShape& s) {
  const std::int64_t hd = s.head_dim, half = hd / 2, C = s.heads * hd;
  const std::int64_t row = idx / s.mha_cols(), col = idx % s.mha_cols();
  const std::int64_t part = col / C, h = (col % C) / hd, j = col % hd;  // part 0 q, 1 k, 2 v
  const std::int64_t g = h / (s.heads / s.kv_heads);
  const std::int64_t base = part == 0 ? h * hd : part == 1 ? C + g * hd : C + s.kv_heads * hd + g * hd;
  const std::int64_t i = j % half, src_row = row * s.gqa_cols();
  ExpandSource out;
  out.rotate = part < 2;
  out.upper = j >= half;
  out.lo = src_row + base + (out.rotate ? i : j);
  out.hi = src_row + base + i + half;
  out.angle = (row % s.seq) * half + i;
  return out;
}

/// Where gradient element `idx` of the (rows, (H + 2 G) hd) projection gathers from the
/// expanded (rows, 3 H hd) gradient: `count` heads (1 for q, the group's H / G for k and v)
/// starting at flat index `lo` (column i of the first, the element's own column for v) and
/// `hi` (column i + hd/2), `stride` apart; rotated back by `angle` for q and k, which half
/// the element is, summed over the heads in order.
struct ReduceSources {
  std::int64_t lo = 0;      ///< first head's column i (v: the element's column)
  std::int64_t hi = 0;      ///< first head's column i + hd/2
  std::int64_t stride = 0;  ///< hd: from one head of the group to the next
  std::int64_t count = 1;   ///< heads summed
  std::int64_t angle = 0;   ///< t hd/2 + i
  bool rotate = false;      ///< q or k
  bool upper = false;       ///< the element is the pair's hi
};
/// The sources of projection-gradient element `idx` (class comment of the file).
TESSERA_HD inline ReduceSources rope_reduce_sources(std::int64_t idx, const RopeShape& s) {
  const std::int64_t hd = s.head_dim, half = hd / 2, C = s.heads * hd, Ckv = s.kv_heads * hd;
  const std::int64_t row = idx / s.gqa_cols(), col = idx % s.gqa_cols();
  const std::int64_t group = s.heads / s.kv_heads;
  std::int64_t part = 0, head = 0;  // the source head: q head, or the KV head
  if (col < C) {
    part = 0, head = col / hd;
  } else if (col < C + Ckv) {
    part = 1, head = (col - C) / hd;
  } else {
    part = 2, head = (col - C - Ckv) / hd;
  }
  const std::int64_t j = col % hd, i = j % half;
  const std::int64_t first = part == 0 ? head : head * group;  // first expanded head it gathers
  const std::int64_t base = row * s.mha_cols() + part * C + first * hd;
  ReduceSources out;
  out.rotate = part < 2;
  out.upper = j >= half;
  out.count = part == 0 ? 1 : group;
  out.stride = hd;
  out.lo = base + (out.rotate ? i : j);
  out.hi = base + i + half;
  out.angle = (row % s.seq) * half + i;
  return out;
}

/// Element `idx` of the expanded layout from the projection `qkv` and the RoPE table: the
/// whole step of one rope_expand thread (the kernel stores it), so the host test runs the
/// kernel's own arithmetic.
template <class T>
TESSERA_HD float rope_expand_value(const T* qkv, const float* cos, const float* sin, std::int64_t idx,
                                   const RopeShape& s) {
  const ExpandSource src = rope_expand_source(idx, s);
  if (!src.rotate) return to_f32(qkv[src.lo]);
  const Pair p = rope_rotate(to_f32(qkv[src.lo]), to_f32(qkv[src.hi]), cos[src.angle], sin[src.angle]);
  return src.upper ? p.hi : p.lo;
}

/// Element `idx` of the projection's gradient from the expanded gradient `dexp`: the whole step
/// of one rope_reduce thread (the group's heads summed in order, q and k rotated back).
template <class T>
TESSERA_HD float rope_reduce_value(const T* dexp, const float* cos, const float* sin, std::int64_t idx,
                                   const RopeShape& s) {
  const ReduceSources src = rope_reduce_sources(idx, s);
  float acc = 0.f;
  for (std::int64_t h = 0; h < src.count; ++h) {
    const std::int64_t off = h * src.stride;
    if (!src.rotate) {
      acc += to_f32(dexp[src.lo + off]);
      continue;
    }
    const Pair p = rope_rotate(to_f32(dexp[src.lo + off]), to_f32(dexp[src.hi + off]), cos[src.angle], -sin[src.angle]);
    acc += src.upper ? p.hi : p.lo;
  }
  return acc;
}

}  // namespace llama::device_math
