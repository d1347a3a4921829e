#pragma once
/// @file
/// LMHead: the language-model head of GPT-2, logits = x wte^T, tied to the token embedding.

#include <concepts>
#include <cstdint>
#include <string>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/gemm.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/weight_grad_queue.hpp"

namespace tessera::nn {

/// logits = x W^T with W: [vocab_size, d], no bias (GPT-2's `lm_head`, whose weight is the
/// token embedding `wte.weight`; Press and Wolf 2017, "Using the output embedding to improve
/// language models").
///
/// Built from the embedding's Parameter it shares that parameter's value and grad tensors, so
/// both uses accumulate into one gradient. A pipeline's last stage, which does not hold the
/// embedding, builds it from its own copy of the weight instead.
///
/// x: (..., d) -> logits: (..., vocab_size).
template <std::floating_point T>
class LMHead {
 public:
  using Input = Tensor<T>;  ///< x: (..., d)
  /// What backward needs: the input.
  struct Context {
    Tensor<T> x;  ///< (..., d), contiguous
  };

  /// A head tied to `embedding` (Parameter::tied): same name, value and grad tensors, same
  /// layout, same grad-ready hook.
  explicit LMHead(const Parameter<T>& embedding) : weight_(Parameter<T>::tied(embedding)) {
    check_weight();
  }

  /// logits = x W^T. Throws tessera::Error naming both shapes when x's last dim is not d.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    const std::int64_t v = vocab_size(), d = dim();
    TESSERA_EXPECTS(x.rank() >= 1 && x.size(-1) == d, "LMHead ", weight_.name, ": input of shape ", x.shape(),
                    " does not match weight of shape ", weight_.value.shape());
    const Tensor<T> xc = x.contiguous();
    const std::int64_t m = xc.shape().rows();
    Tensor<T> y = Tensor<T>::empty(x.shape().with(-1, v));
    gemm<T>(Transpose::no, Transpose::yes, m, v, d, T{1}, xc.data(), d, weight_.value.data(), d, T{0}, y.data(), v);
    return {std::move(y), Context{xc}};
  }

  /// dx = dy W; adds dy^T x into the weight's grad, then marks it ready
  /// (Parameter::mark_grad_ready). dy: (..., vocab_size). Inside a DeferWeightGrads scope only
  /// dx is computed here and the weight gradient is pushed to the scope's WeightGradQueue
  /// (zero-bubble's W pass). Throws tessera::Error naming both shapes when dy does not have the
  /// output's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    return deferrable_backward(*this, dy, ctx);
  }

  /// The input-gradient half of backward: dx = dy W. dy: (..., vocab_size) -> dx: (..., d).
  /// Throws as backward.
  Tensor<T> backward_input(const Tensor<T>& dy, const Context& ctx) const {
    check_grad(dy, ctx);
    const std::int64_t v = vocab_size(), d = dim();
    const Tensor<T> g = dy.contiguous();
    const std::int64_t m = g.shape().rows();
    Tensor<T> dx = Tensor<T>::empty(ctx.x.shape());
    gemm<T>(Transpose::no, Transpose::no, m, d, v, T{1}, g.data(), v, weight_.value.data(), d, T{0}, dx.data(), d);
    return dx;
  }

  /// The weight-gradient half of backward: adds dy^T x into the weight's grad, then marks it
  /// ready. Throws as backward.
  void backward_weight(const Tensor<T>& dy, const Context& ctx) {
    check_grad(dy, ctx);
    const std::int64_t v = vocab_size(), d = dim();
    const Tensor<T> g = dy.contiguous();
    const std::int64_t m = g.shape().rows();
    gemm<T>(Transpose::yes, Transpose::no, v, d, m, T{1}, g.data(), v, ctx.x.data(), d, T{1}, weight_.grad.data(), d);
    weight_.mark_grad_ready();
  }

  /// The (tied) weight.
  ParameterList<T> parameters() { return {&weight_}; }
  /// The weight [vocab_size, d].
  Parameter<T>& weight() noexcept { return weight_; }
  /// Output width.
  std::int64_t vocab_size() const noexcept { return weight_.value.shape()[0]; }
  /// Input width.
  std::int64_t dim() const noexcept { return weight_.value.shape()[1]; }

 private:
  void check_grad(const Tensor<T>& dy, const Context& ctx) const {
    const Shape out_shape = ctx.x.shape().with(-1, vocab_size());
    TESSERA_EXPECTS(dy.shape() == out_shape, "LMHead ", weight_.name, ": output gradient of shape ", dy.shape(),
                    " does not match the output shape ", out_shape);
  }
  void check_weight() const {
    TESSERA_EXPECTS(weight_.value.rank() == 2 && weight_.value.is_contiguous() && weight_.grad.is_contiguous(),
                    "LMHead: weight ", weight_.name, " of shape ", weight_.value.shape(),
                    " must be a contiguous [vocab_size, d] matrix");
  }

  Parameter<T> weight_;
};

}  // namespace tessera::nn
