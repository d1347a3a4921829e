#pragma once
/// @file
/// Linear: y = x W + b with W of shape [in, out], the Conv1D convention of Hugging Face GPT-2.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/gemm.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/weight_grad_queue.hpp"

namespace tessera::nn {

/// A fully connected layer, y = x W + b, with weight W: [in, out] and bias b: [out] (Hugging
/// Face GPT-2 `Conv1D`, so its checkpoints load unchanged). Parameters "<prefix>.weight" and
/// "<prefix>.bias".
///
/// A tensor-parallel shard is a Linear built from a slice of the full weight: columns for
/// ColumnParallel (Megatron-LM, Shoeybi et al. 2019, sec. 3), rows for RowParallel.
///
/// x: (..., in) -> y: (..., out). GEMMs through CBLAS.
template <std::floating_point T>
class Linear {
 public:
  using Input = Tensor<T>;  ///< x: (..., in)
  /// What backward needs: the input, as a contiguous (..., in) tensor.
  struct Context {
    Tensor<T> x;  ///< (..., in)
  };

  /// A new layer: weight normal(0, init.std) from the stream named "<prefix>.weight", bias 0.
  /// Throws tessera::Error unless both sizes are positive.
  Linear(std::int64_t in_features, std::int64_t out_features, const LayerInit& init = {}, bool bias = true)
      : weight_(init.join("weight"), Tensor<T>::empty(checked_shape(in_features, out_features))) {
    fill_normal(weight_.value, init.seed, weight_.name, init.std);
    if (bias) bias_.emplace(init.join("bias"), Tensor<T>(Shape{out_features}));
  }
  /// A layer holding the given weight [in, out] and bias [out] (an empty `bias` means none),
  /// e.g. a shard sliced from a full layer; strided views are copied to contiguous storage.
  /// Throws tessera::Error naming the shapes when the weight is not 2-D or the bias does not
  /// have out elements.
  Linear(const std::string& prefix, Tensor<T> weight, Tensor<T> bias = {})
      : weight_(LayerInit{.prefix = prefix}.join("weight"), weight.contiguous()) {
    TESSERA_EXPECTS(weight.rank() == 2, "Linear ", prefix, ": weight of shape ", weight.shape(),
                    " is not 2-D [in, out]");
    if (bias.numel() > 0) {
      TESSERA_EXPECTS(bias.shape() == Shape{weight.size(1)}, "Linear ", prefix, ": bias of shape ",
                      bias.shape(), " does not match weight of shape ", weight.shape());
      bias_.emplace(LayerInit{.prefix = prefix}.join("bias"), bias.contiguous());
    }
  }

  /// y = x W + b. x: (..., in) -> (..., out). Throws tessera::Error naming both shapes when
  /// x's last dim is not `in`.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    TESSERA_EXPECTS(x.rank() >= 1 && x.size(-1) == in_features(), "Linear ", weight_.name,
                    ": input of shape ", x.shape(), " does not match weight of shape ",
                    weight_.value.shape(), " (last dim must be ", in_features(), ")");
    const Tensor<T> xc = x.contiguous();
    const std::int64_t m = xc.shape().rows();
    Tensor<T> y = Tensor<T>::empty(x.shape().with(-1, out_features()));
    T beta = 0;
    if (bias_) {
      // (M, out) rows start as the bias; the GEMM then adds x W.
      for (std::int64_t r = 0; r < m; ++r)
        std::copy_n(bias_->value.data(), out_features(), y.data() + r * out_features());
      beta = 1;
    }
    gemm<T>(Transpose::no, Transpose::no, m, out_features(), in_features(), T{1}, xc.data(), in_features(),
            weight_.value.data(), out_features(), beta, y.data(), out_features());
    return {std::move(y), Context{xc}};
  }

  /// dx = dy W^T; adds x^T dy into the weight's grad and the column sums of dy into the
  /// bias's, then marks both ready (Parameter::mark_grad_ready). dy: (..., out) -> dx: (..., in).
  /// Inside a DeferWeightGrads scope only dx is computed here and the weight and bias gradients
  /// are pushed to the scope's WeightGradQueue (zero-bubble's W pass), bitwise the same when
  /// they run. Throws tessera::Error naming both shapes when dy does not have the output's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    return deferrable_backward(*this, dy, ctx);
  }

  /// The input-gradient half of backward (zero-bubble's B pass): dx = dy W^T, no parameter
  /// gradient. dy: (..., out) -> dx: (..., in). Throws tessera::Error naming both shapes when dy
  /// does not have the output's shape.
  Tensor<T> backward_input(const Tensor<T>& dy, const Context& ctx) const {
    check_grad(dy, ctx);
    const Tensor<T> g = dy.contiguous();
    const std::int64_t m = g.shape().rows();
    const std::int64_t in = in_features(), out = out_features();
    Tensor<T> dx = Tensor<T>::empty(ctx.x.shape());
    gemm<T>(Transpose::no, Transpose::yes, m, in, out, T{1}, g.data(), out, weight_.value.data(), out, T{0},
            dx.data(), in);
    return dx;
  }

  /// The weight-gradient half of backward (zero-bubble's W pass): adds x^T dy into the weight's
  /// grad and the column sums of dy into the bias's, then marks both ready. backward_input
  /// followed by backward_weight computes exactly what backward computes. Throws
  /// tessera::Error naming both shapes when dy does not have the output's shape.
  void backward_weight(const Tensor<T>& dy, const Context& ctx) {
    check_grad(dy, ctx);
    const Tensor<T> g = dy.contiguous();
    const std::int64_t m = g.shape().rows();
    const std::int64_t in = in_features(), out = out_features();
    gemm<T>(Transpose::yes, Transpose::no, in, out, m, T{1}, ctx.x.data(), in, g.data(), out, T{1},
            weight_.grad.data(), out);
    if (bias_) {
      T* db = bias_->grad.data();
      for (std::int64_t r = 0; r < m; ++r) {
        const T* row = g.data() + r * out;
        for (std::int64_t j = 0; j < out; ++j) db[j] += row[j];
      }
    }
    weight_.mark_grad_ready();
    if (bias_) bias_->mark_grad_ready();
  }

  /// The weight, then the bias if any.
  ParameterList<T> parameters() {
    ParameterList<T> ps{&weight_};
    if (bias_) ps.push_back(*bias_);
    return ps;
  }

  /// The weight [in, out].
  Parameter<T>& weight() noexcept { return weight_; }
  /// The bias [out], or null when the layer has none.
  Parameter<T>* bias() noexcept { return bias_ ? &*bias_ : nullptr; }
  /// Input features (weight rows).
  std::int64_t in_features() const noexcept { return weight_.value.shape()[0]; }
  /// Output features (weight columns).
  std::int64_t out_features() const noexcept { return weight_.value.shape()[1]; }

 private:
  void check_grad(const Tensor<T>& dy, const Context& ctx) const {
    const Shape out_shape = ctx.x.shape().with(-1, out_features());
    TESSERA_EXPECTS(dy.shape() == out_shape, "Linear ", weight_.name, ": output gradient of shape ",
                    dy.shape(), " does not match the output shape ", out_shape);
  }
  static Shape checked_shape(std::int64_t in, std::int64_t out) {
    TESSERA_EXPECTS(in > 0 && out > 0, "Linear: sizes in=", in, " out=", out, " must be positive");
    return Shape{in, out};
  }

  Parameter<T> weight_;
  std::optional<Parameter<T>> bias_;
};

}  // namespace tessera::nn
