#pragma once
/// @file
/// Block: GPT-2's pre-LayerNorm residual transformer block `h.{i}`.

#include <concepts>
#include <cstdint>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/mlp.hpp"
#include "tessera/nn/self_attention.hpp"

namespace tessera::nn {

/// x1 = x + attn(ln_1(x)); y = x1 + mlp(ln_2(x1)) (GPT-2, Radford et al. 2019: LayerNorm at
/// the input of each sub-block). Parameters "<prefix>.ln_1.*", "<prefix>.attn.*",
/// "<prefix>.ln_2.*", "<prefix>.mlp.*" in that order (Hugging Face GPT2Block).
///
/// x: (B, T, d) -> y: (B, T, d).
template <std::floating_point T>
class Block {
 public:
  using Input = Tensor<T>;  ///< x: (B, T, d)
  /// What backward needs: the contexts of the four sub-layers.
  struct Context {
    typename LayerNorm<T>::Context ln_1;      ///< ln_1's
    typename SelfAttention<T>::Context attn;  ///< attn's
    typename LayerNorm<T>::Context ln_2;      ///< ln_2's
    typename MLP<T>::Context mlp;             ///< mlp's
  };

  /// A new block of width `d_model` with `n_head` heads. Throws tessera::Error unless n_head
  /// divides d_model.
  Block(std::int64_t d_model, std::int64_t n_head, const LayerInit& init = {})
      : ln_1_(d_model, init.child("ln_1")),
        attn_(d_model, n_head, init.child("attn")),
        ln_2_(d_model, init.child("ln_2")),
        mlp_(d_model, init.child("mlp")) {}

  /// The block's output. Throws tessera::Error naming the shapes when x is not (B, T, d).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    auto [h1, c1] = ln_1_.forward(x);
    auto [x1, c2] = attn_.forward(h1);
    x1.add_(x);  // x1 = x + attn(ln_1(x)); x1 is fresh, no context holds it
    auto [h2, c3] = ln_2_.forward(x1);
    auto [y, c4] = mlp_.forward(h2);
    y.add_(x1);  // y = x1 + mlp(ln_2(x1))
    return {std::move(y), Context{std::move(c1), std::move(c2), std::move(c3), std::move(c4)}};
  }

  /// dx from dy: (B, T, d); accumulates the parameter gradients of all sub-layers.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    Tensor<T> dx1 = ln_2_.backward(mlp_.backward(dy, ctx.mlp), ctx.ln_2);
    dx1.add_(dy);  // the residual path
    Tensor<T> dx = ln_1_.backward(attn_.backward(dx1, ctx.attn), ctx.ln_1);
    dx.add_(dx1);
    return dx;
  }

  /// ln_1, attn, ln_2, mlp parameters, in Hugging Face order.
  ParameterList<T> parameters() {
    ParameterList<T> ps = ln_1_.parameters();
    ps.append(attn_.parameters());
    ps.append(ln_2_.parameters());
    ps.append(mlp_.parameters());
    return ps;
  }

  /// LayerNorm before attention.
  LayerNorm<T>& ln_1() noexcept { return ln_1_; }
  /// The attention sub-block.
  SelfAttention<T>& attn() noexcept { return attn_; }
  /// LayerNorm before the MLP.
  LayerNorm<T>& ln_2() noexcept { return ln_2_; }
  /// The MLP sub-block.
  MLP<T>& mlp() noexcept { return mlp_; }

 private:
  LayerNorm<T> ln_1_;
  SelfAttention<T> attn_;
  LayerNorm<T> ln_2_;
  MLP<T> mlp_;
};

}  // namespace tessera::nn
