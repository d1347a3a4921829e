#pragma once
/// @file
/// LayerNorm over the last dim (Ba, Kiros, Hinton, "Layer Normalization", 2016).

#include <cmath>
#include <concepts>
#include <cstdint>
#include <string>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/layer_init.hpp"

namespace tessera::nn {

/// y = (x - mean) / sqrt(var + eps) * weight + bias, with mean and (biased) variance over the
/// last dim. Parameters "<prefix>.weight" (init 1) and "<prefix>.bias" (init 0), each [dim].
///
/// x: (..., dim) -> y: (..., dim).
template <std::floating_point T>
class LayerNorm {
 public:
  using Input = Tensor<T>;  ///< x: (..., dim)
  /// What backward needs: the normalized input and the reciprocal standard deviations.
  struct Context {
    Tensor<T> xhat;  ///< (..., dim): (x - mean) * rstd
    Tensor<T> rstd;  ///< (rows): 1 / sqrt(var + eps) per row
  };

  /// A new layer over rows of `dim` elements; eps as in GPT-2 (1e-5). Throws tessera::Error
  /// unless dim is positive.
  explicit LayerNorm(std::int64_t dim, const LayerInit& init = {}, T eps = T(1e-5))
      : weight_(init.join("weight"), Tensor<T>::full(checked_shape(dim), T{1})),
        bias_(init.join("bias"), Tensor<T>(Shape{dim})),
        eps_(eps) {}

  /// Normalizes each row. Throws tessera::Error naming both shapes when x's last dim is not
  /// `dim`.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    const std::int64_t d = dim();
    TESSERA_EXPECTS(x.rank() >= 1 && x.size(-1) == d, "LayerNorm ", weight_.name, ": input of shape ",
                    x.shape(), " does not match weight of shape ", weight_.value.shape());
    const Tensor<T> xc = x.contiguous();
    const std::int64_t m = xc.shape().rows();
    Tensor<T> y = Tensor<T>::empty(x.shape());
    Tensor<T> xhat = Tensor<T>::empty(x.shape());
    Tensor<T> rstd = Tensor<T>::empty(Shape{m});
    const T* w = weight_.value.data();
    const T* b = bias_.value.data();
    for (std::int64_t r = 0; r < m; ++r) {
      const T* xr = xc.data() + r * d;
      T mean = 0;
      for (std::int64_t j = 0; j < d; ++j) mean += xr[j];
      mean /= static_cast<T>(d);
      T var = 0;
      for (std::int64_t j = 0; j < d; ++j) var += (xr[j] - mean) * (xr[j] - mean);
      var /= static_cast<T>(d);
      const T rs = T{1} / std::sqrt(var + eps_);
      rstd.data()[r] = rs;
      T* hr = xhat.data() + r * d;
      T* yr = y.data() + r * d;
      for (std::int64_t j = 0; j < d; ++j) {
        hr[j] = (xr[j] - mean) * rs;
        yr[j] = hr[j] * w[j] + b[j];
      }
    }
    return {std::move(y), Context{std::move(xhat), std::move(rstd)}};
  }

  /// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight; adds
  /// sum(dy * xhat) into the weight's grad and sum(dy) into the bias's, then marks both ready
  /// (Parameter::mark_grad_ready). Throws tessera::Error
  /// naming both shapes when dy does not have the output's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    TESSERA_EXPECTS(dy.shape() == ctx.xhat.shape(), "LayerNorm ", weight_.name, ": output gradient of shape ",
                    dy.shape(), " does not match the output shape ", ctx.xhat.shape());
    const Tensor<T> g = dy.contiguous();
    const std::int64_t d = dim(), m = g.shape().rows();
    Tensor<T> dx = Tensor<T>::empty(g.shape());
    const T* w = weight_.value.data();
    T* dw = weight_.grad.data();
    T* db = bias_.grad.data();
    for (std::int64_t r = 0; r < m; ++r) {
      const T* gr = g.data() + r * d;
      const T* hr = ctx.xhat.data() + r * d;
      T mean_g = 0, mean_gh = 0;
      for (std::int64_t j = 0; j < d; ++j) {
        const T gw = gr[j] * w[j];
        mean_g += gw;
        mean_gh += gw * hr[j];
        dw[j] += gr[j] * hr[j];
        db[j] += gr[j];
      }
      mean_g /= static_cast<T>(d);
      mean_gh /= static_cast<T>(d);
      const T rs = ctx.rstd.data()[r];
      T* dxr = dx.data() + r * d;
      for (std::int64_t j = 0; j < d; ++j) dxr[j] = rs * (gr[j] * w[j] - mean_g - hr[j] * mean_gh);
    }
    weight_.mark_grad_ready();
    bias_.mark_grad_ready();
    return dx;
  }

  /// The weight, then the bias.
  ParameterList<T> parameters() { return {&weight_, &bias_}; }
  /// The weight [dim] (gamma).
  Parameter<T>& weight() noexcept { return weight_; }
  /// The bias [dim] (beta).
  Parameter<T>& bias() noexcept { return bias_; }
  /// The normalized width.
  std::int64_t dim() const noexcept { return weight_.value.shape()[0]; }
  /// The epsilon added to the variance.
  T eps() const noexcept { return eps_; }

 private:
  static Shape checked_shape(std::int64_t d) {
    TESSERA_EXPECTS(d > 0, "LayerNorm: dim ", d, " must be positive");
    return Shape{d};
  }

  Parameter<T> weight_;
  Parameter<T> bias_;
  T eps_;
};

}  // namespace tessera::nn
