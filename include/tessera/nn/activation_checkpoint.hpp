#pragma once
/// @file
/// ActivationCheckpoint: a layer wrapper that keeps only the input in forward and recomputes
/// the inner layer's context in backward (Chen et al. 2016, "Training deep nets with sublinear
/// memory cost"; PyTorch `torch.utils.checkpoint`).

#include <utility>

#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"

namespace tessera::nn {

/// Wraps a Layer `L`: forward runs L and keeps only its input in the context; backward runs L's
/// forward again on that input and then L's backward. Gradients equal those of L itself
/// bitwise (L's forward is deterministic). Trades one extra forward for the activation memory
/// of L between forward and backward.
///
/// `L` must satisfy tessera::Layer; otherwise compilation stops with one sentence naming the
/// missing part (see check_layer).
template <class L>
class ActivationCheckpoint {
  static_assert(check_layer<L>());
  using Traits = LayerTraits<L>;

 public:
  using Input = typename Traits::Input;  ///< L's input
  /// What backward needs: only the input.
  struct Context {
    Input x;  ///< L's input, kept to rerun its forward
  };

  /// Wraps `layer`.
  explicit ActivationCheckpoint(L layer) : layer_(std::move(layer)) {}

  /// L's output; L's own context is dropped.
  ForwardResult<typename Traits::Output, Context> forward(const Input& x) {
    auto result = layer_.forward(x);
    return {std::move(result.output), Context{x}};
  }

  /// Recomputes L's context from the saved input, then runs L's backward.
  typename Traits::InputGrad backward(const typename Traits::Output& dy, const Context& ctx) {
    auto result = layer_.forward(ctx.x);
    return layer_.backward(dy, result.ctx);
  }

  /// L's parameters.
  ParameterList<typename Traits::Scalar> parameters() { return layer_.parameters(); }
  /// The wrapped layer.
  L& layer() noexcept { return layer_; }

 private:
  L layer_;
};

}  // namespace tessera::nn
