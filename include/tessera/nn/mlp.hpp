#pragma once
/// @file
/// MLP: GPT-2's feed-forward block `mlp` (c_fc, GELU, c_proj).

#include <concepts>
#include <cstdint>
#include <utility>

#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/gelu.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/linear.hpp"

namespace tessera::nn {

/// y = c_proj(GELU(c_fc(x))) with hidden width 4 d, as in GPT-2. Parameters
/// "<prefix>.c_fc.weight" [d, 4d], "<prefix>.c_fc.bias" [4d], "<prefix>.c_proj.weight" [4d, d],
/// "<prefix>.c_proj.bias" [d]; c_proj is a residual projection (init std / sqrt(2 n_layer)).
///
/// The sub-layers are reachable (`c_fc()`, `act()`, `c_proj()`), so tensor parallelism can run
/// c_fc column-parallel and c_proj row-parallel (Megatron-LM, Shoeybi et al. 2019, sec. 3).
///
/// x: (..., d) -> y: (..., d).
template <std::floating_point T>
class MLP {
 public:
  using Input = Tensor<T>;  ///< x: (..., d)
  /// What backward needs: the contexts of the three sub-layers.
  struct Context {
    typename Linear<T>::Context c_fc;  ///< c_fc's
    typename GELU<T>::Context act;     ///< GELU's
    typename Linear<T>::Context c_proj;  ///< c_proj's
  };

  /// A new layer of width `d_model` and hidden width 4 d_model. Throws tessera::Error unless
  /// d_model is positive.
  explicit MLP(std::int64_t d_model, const LayerInit& init = {})
      : c_fc_(d_model, 4 * d_model, init.child("c_fc")), c_proj_(4 * d_model, d_model, init.residual("c_proj")) {}

  /// y = c_proj(GELU(c_fc(x))). Throws tessera::Error naming both shapes when x's last dim is
  /// not d.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    auto [h, c1] = c_fc_.forward(x);    // (..., 4d)
    auto [a, c2] = act_.forward(h);     // (..., 4d)
    auto [y, c3] = c_proj_.forward(a);  // (..., d)
    return {std::move(y), Context{std::move(c1), std::move(c2), std::move(c3)}};
  }

  /// dx from dy: (..., d); accumulates the four parameter gradients.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    return c_fc_.backward(act_.backward(c_proj_.backward(dy, ctx.c_proj), ctx.act), ctx.c_fc);
  }

  /// c_fc.weight, c_fc.bias, c_proj.weight, c_proj.bias.
  ParameterList<T> parameters() {
    ParameterList<T> ps = c_fc_.parameters();
    ps.append(c_proj_.parameters());
    return ps;
  }

  /// The expansion [d, 4d].
  Linear<T>& c_fc() noexcept { return c_fc_; }
  /// The activation.
  GELU<T>& act() noexcept { return act_; }
  /// The projection back [4d, d].
  Linear<T>& c_proj() noexcept { return c_proj_; }

 private:
  Linear<T> c_fc_;
  GELU<T> act_;
  Linear<T> c_proj_;
};

}  // namespace tessera::nn
