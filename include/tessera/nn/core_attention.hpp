#pragma once
/// @file
/// CoreAttention: causal scaled dot-product attention over the heads of a fused q, k, v tensor
/// (Vaswani et al. 2017, with GPT-2's causal mask).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/gemm.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/recompute.hpp"

namespace tessera::nn {

/// Causal multi-head attention on a fused projection, without parameters (Megatron-LM's
/// "core attention"): for each batch row b and head h,
/// y[b, :, h] = softmax(mask(q k^T / sqrt(head_dim))) v, where position t attends to
/// positions 0..t only.
///
/// qkv: (B, T, 3C) holding q in columns [0, C), k in [C, 2C), v in [2C, 3C), head h at
/// columns [h * head_dim, (h + 1) * head_dim) of each, C = n_head * head_dim (the layout of
/// GPT-2's `c_attn` output) -> y: (B, T, C), head h at columns [h * head_dim, ...).
///
/// Under tensor parallelism each rank runs it on its own heads (n_head / tp of them), with the
/// q, k and v columns of those heads. The per-head products are GEMMs through CBLAS.
template <std::floating_point T>
class CoreAttention {
 public:
  using Input = Tensor<T>;  ///< qkv: (B, T, 3C)
  /// What backward needs: the input and the attention probabilities.
  struct Context {
    Tensor<T> qkv;    ///< (B, T, 3C), contiguous
    /// (B, n_head, T, T): softmax rows, 0 above the diagonal; empty when the forward ran inside
    /// a SelectiveRecompute scope (backward then recomputes each head's rows from qkv).
    Tensor<T> probs;
  };

  /// Attention over `n_head` heads. Throws tessera::Error unless n_head is positive.
  explicit CoreAttention(std::int64_t n_head) : n_head_(n_head) {
    TESSERA_EXPECTS(n_head > 0, "CoreAttention: n_head ", n_head, " must be positive");
  }

  /// Causal attention of every head. Inside a SelectiveRecompute scope the probabilities are
  /// not kept (Korthikanti et al. 2022's selective activation recomputation: they are
  /// B n_head T^2 elements, the largest activation of a block at long T, and cost only two
  /// small GEMMs and a softmax to redo); backward recomputes them, bitwise the same. Throws
  /// tessera::Error naming the shape when qkv is not (B, T, 3 * n_head * head_dim).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& qkv) const {
    check_input(qkv);
    const Tensor<T> x = qkv.contiguous();
    const std::int64_t B = x.size(0), Tn = x.size(1), C3 = x.size(2), C = C3 / 3, H = n_head_, hd = C / H;
    const T scale = T{1} / std::sqrt(static_cast<T>(hd));
    Tensor<T> y = Tensor<T>::empty(Shape{B, Tn, C});
    const bool keep = !SelectiveRecompute::active();  // selective: one head's (T, T) scratch, dropped after
    Tensor<T> probs = keep ? Tensor<T>::empty(Shape{B, H, Tn, Tn}) : Tensor<T>::empty(Shape{Tn, Tn});
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h) {
        const T* q = x.data() + b * Tn * C3 + h * hd;
        const T* k = q + C;
        const T* v = q + 2 * C;
        T* p = keep ? probs.data() + (b * H + h) * Tn * Tn : probs.data();
        head_probs(q, k, Tn, hd, C3, scale, p);
        // (T, hd) head output = probs v, into columns [h hd, (h+1) hd) of y.
        gemm<T>(Transpose::no, Transpose::no, Tn, hd, Tn, T{1}, p, Tn, v, C3, T{0}, y.data() + b * Tn * C + h * hd, C);
      }
    if (!keep) return {std::move(y), Context{x, Tensor<T>()}};
    return {std::move(y), Context{x, std::move(probs)}};
  }

  /// dq, dk, dv of every head from dy: (B, T, C) -> dqkv: (B, T, 3C). Throws tessera::Error
  /// naming both shapes when dy does not have the output's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) const {
    const std::int64_t B = ctx.qkv.size(0), Tn = ctx.qkv.size(1), C3 = ctx.qkv.size(2), C = C3 / 3,
                       H = n_head_, hd = C / H;
    TESSERA_EXPECTS(dy.shape() == (Shape{B, Tn, C}), "CoreAttention: output gradient of shape ", dy.shape(),
                    " does not match the output shape ", Shape{B, Tn, C});
    const T scale = T{1} / std::sqrt(static_cast<T>(hd));
    const Tensor<T> g = dy.contiguous();
    Tensor<T> dqkv = Tensor<T>::empty(ctx.qkv.shape());
    Tensor<T> dp = Tensor<T>::empty(Shape{Tn, Tn});  // scratch, reused by every head
    const bool recompute = ctx.probs.numel() == 0;   // selective: probabilities not kept
    Tensor<T> redo = recompute ? Tensor<T>::empty(Shape{Tn, Tn}) : Tensor<T>();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h) {
        const T* q = ctx.qkv.data() + b * Tn * C3 + h * hd;
        const T* k = q + C;
        const T* v = q + 2 * C;
        const T* p = recompute ? redo.data() : ctx.probs.data() + (b * H + h) * Tn * Tn;
        if (recompute) head_probs(q, k, Tn, hd, C3, scale, redo.data());
        const T* go = g.data() + b * Tn * C + h * hd;
        T* dq = dqkv.data() + b * Tn * C3 + h * hd;
        T* dk = dq + C;
        T* dv = dq + 2 * C;
        T* ds = dp.data();
        // dprobs = dy v^T (T, T); dv = probs^T dy (T, hd).
        gemm<T>(Transpose::no, Transpose::yes, Tn, Tn, hd, T{1}, go, C, v, C3, T{0}, ds, Tn);
        gemm<T>(Transpose::yes, Transpose::no, Tn, hd, Tn, T{1}, p, Tn, go, C, T{0}, dv, C3);
        // Softmax backward, in place: dscores = probs * (dprobs - <dprobs, probs>) / sqrt(hd).
        for (std::int64_t i = 0; i < Tn; ++i) {
          const T* pr = p + i * Tn;
          T* dr = ds + i * Tn;
          T dot = 0;
          for (std::int64_t j = 0; j <= i; ++j) dot += dr[j] * pr[j];
          for (std::int64_t j = 0; j <= i; ++j) dr[j] = pr[j] * (dr[j] - dot) * scale;
          std::fill(dr + i + 1, dr + Tn, T{0});
        }
        // dq = dscores k; dk = dscores^T q (T, hd).
        gemm<T>(Transpose::no, Transpose::no, Tn, hd, Tn, T{1}, ds, Tn, k, C3, T{0}, dq, C3);
        gemm<T>(Transpose::yes, Transpose::no, Tn, hd, Tn, T{1}, ds, Tn, q, C3, T{0}, dk, C3);
      }
    return dqkv;
  }

  /// None: the projections around it hold the parameters.
  ParameterList<T> parameters() noexcept { return {}; }
  /// Number of heads this instance computes.
  std::int64_t n_head() const noexcept { return n_head_; }

 private:
  // One head's (T, T) probabilities into p: scores = q k^T * scale, then a causal softmax per
  // row (0 above the diagonal). q and k have row stride ld.
  static void head_probs(const T* q, const T* k, std::int64_t Tn, std::int64_t hd, std::int64_t ld, T scale, T* p) {
    gemm<T>(Transpose::no, Transpose::yes, Tn, Tn, hd, scale, q, ld, k, ld, T{0}, p, Tn);
    for (std::int64_t i = 0; i < Tn; ++i) {
      T* row = p + i * Tn;
      const T mx = *std::max_element(row, row + i + 1);
      T sum = 0;
      for (std::int64_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - mx));
      const T inv = T{1} / sum;
      for (std::int64_t j = 0; j <= i; ++j) row[j] *= inv;
      std::fill(row + i + 1, row + Tn, T{0});
    }
  }
  void check_input(const Tensor<T>& qkv) const {
    TESSERA_EXPECTS(qkv.rank() == 3 && qkv.size(2) % (3 * n_head_) == 0 && qkv.size(2) > 0,
                    "CoreAttention: input of shape ", qkv.shape(), " is not (B, T, 3 * n_head * head_dim) with n_head=",
                    n_head_);
  }

  std::int64_t n_head_;
};

}  // namespace tessera::nn
