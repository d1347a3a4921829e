#pragma once
/// @file
/// GELU, tanh approximation (Hendrycks and Gimpel 2016), as in GPT-2 ("gelu_new").

#include <cmath>
#include <concepts>
#include <utility>

#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::nn {

/// y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), element-wise; no parameters.
/// Computed as y = x sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3), the same function
/// (0.5 (1 + tanh u) = sigmoid(2u)) for one exp instead of a tanh.
/// x: any shape -> y: same shape.
template <std::floating_point T>
class GELU {
 public:
  using Input = Tensor<T>;  ///< x: any shape
  /// What backward needs: the input and the gate sigmoid(2u).
  struct Context {
    Tensor<T> x;     ///< the input, contiguous
    Tensor<T> gate;  ///< sigmoid(2u) = 0.5 (1 + tanh u), saved so backward need not redo it
  };

  /// Applies GELU element-wise.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    const Tensor<T> xc = x.contiguous();
    Tensor<T> y = Tensor<T>::empty(x.shape());
    Tensor<T> gate = Tensor<T>::empty(x.shape());
    const std::int64_t n = xc.numel();
    const T* xp = xc.data();
    T* yp = y.data();
    T* sp = gate.data();
    for (std::int64_t i = 0; i < n; ++i) {
      const T v = xp[i];
      sp[i] = T{1} / (T{1} + std::exp(T{-2} * k0 * (v + k1 * v * v * v)));
      yp[i] = v * sp[i];
    }
    return {std::move(y), Context{xc, std::move(gate)}};
  }

  /// dx = dy * (s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2)) with s = sigmoid(2u).
  /// Throws tessera::Error naming both shapes when dy does not have the input's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) const {
    expect_same_shape("GELU: output gradient and input", dy, ctx.x);
    const Tensor<T> g = dy.contiguous();
    Tensor<T> dx = Tensor<T>::empty(g.shape());
    const std::int64_t n = g.numel();
    const T* xp = ctx.x.data();
    const T* sp = ctx.gate.data();
    const T* gp = g.data();
    T* dp = dx.data();
    for (std::int64_t i = 0; i < n; ++i) {
      const T v = xp[i], s = sp[i];
      dp[i] = gp[i] * (s + T{2} * v * s * (T{1} - s) * k0 * (T{1} + T{3} * k1 * v * v));
    }
    return dx;
  }

  /// None: GELU has no parameters.
  ParameterList<T> parameters() noexcept { return {}; }

 private:
  static constexpr T k0 = static_cast<T>(0.7978845608028654);  // sqrt(2 / pi)
  static constexpr T k1 = static_cast<T>(0.044715);
};

}  // namespace tessera::nn
