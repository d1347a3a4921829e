#pragma once
/// @file
/// SelfAttention: GPT-2's causal multi-head self-attention block `attn` (c_attn, core
/// attention, c_proj).

#include <concepts>
#include <cstdint>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/core_attention.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/linear.hpp"

namespace tessera::nn {

/// Causal multi-head self-attention as in GPT-2: qkv = c_attn(x) with the fused weight
/// [d, 3d]; y = c_proj(CoreAttention(qkv)). Parameters "<prefix>.c_attn.weight" [d, 3d],
/// "<prefix>.c_attn.bias" [3d], "<prefix>.c_proj.weight" [d, d], "<prefix>.c_proj.bias" [d];
/// c_proj is a residual projection (init std / sqrt(2 n_layer)).
///
/// The three sub-layers are reachable (`c_attn()`, `core()`, `c_proj()`), so tensor
/// parallelism can run c_attn column-parallel (each rank with its heads' q, k, v columns), the
/// core attention on its heads, and c_proj row-parallel (Megatron-LM, Shoeybi et al. 2019,
/// sec. 3).
///
/// x: (B, T, d) -> y: (B, T, d).
template <std::floating_point T>
class SelfAttention {
 public:
  using Input = Tensor<T>;  ///< x: (B, T, d)
  /// What backward needs: the contexts of the three sub-layers.
  struct Context {
    typename Linear<T>::Context c_attn;      ///< c_attn's
    typename CoreAttention<T>::Context core;  ///< the core attention's
    typename Linear<T>::Context c_proj;      ///< c_proj's
  };

  /// A new layer of width `d_model` with `n_head` heads. Throws tessera::Error unless n_head
  /// divides d_model.
  SelfAttention(std::int64_t d_model, std::int64_t n_head, const LayerInit& init = {})
      : c_attn_(d_model, 3 * checked_d(d_model, n_head), init.child("c_attn")),
        core_(n_head),
        c_proj_(d_model, d_model, init.residual("c_proj")) {}

  /// y = c_proj(attention(c_attn(x))). Throws tessera::Error naming the shapes when x is not
  /// (B, T, d).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    TESSERA_EXPECTS(x.rank() == 3, "SelfAttention: input of shape ", x.shape(), " is not (B, T, d)");
    auto [qkv, c1] = c_attn_.forward(x);  // (B, T, 3d)
    auto [a, c2] = core_.forward(qkv);    // (B, T, d)
    auto [y, c3] = c_proj_.forward(a);    // (B, T, d)
    return {std::move(y), Context{std::move(c1), std::move(c2), std::move(c3)}};
  }

  /// dx from dy: (B, T, d); accumulates the four parameter gradients.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    return c_attn_.backward(core_.backward(c_proj_.backward(dy, ctx.c_proj), ctx.core), ctx.c_attn);
  }

  /// c_attn.weight, c_attn.bias, c_proj.weight, c_proj.bias.
  ParameterList<T> parameters() {
    ParameterList<T> ps = c_attn_.parameters();
    ps.append(c_proj_.parameters());
    return ps;
  }

  /// The fused q, k, v projection [d, 3d].
  Linear<T>& c_attn() noexcept { return c_attn_; }
  /// The core attention.
  CoreAttention<T>& core() noexcept { return core_; }
  /// The output projection [d, d].
  Linear<T>& c_proj() noexcept { return c_proj_; }

 private:
  static std::int64_t checked_d(std::int64_t d, std::int64_t n_head) {
    TESSERA_EXPECTS(d > 0 && n_head > 0 && d % n_head == 0, "SelfAttention: n_head ", n_head,
                    " does not divide d_model ", d);
    return d;
  }

  Linear<T> c_attn_;
  CoreAttention<T> core_;
  Linear<T> c_proj_;
};

}  // namespace tessera::nn
