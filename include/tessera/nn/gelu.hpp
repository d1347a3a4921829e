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
/// x: any shape -> y: same shape.
template <std::floating_point T>
class GELU {
 public:
  using Input = Tensor<T>;  ///< x: any shape
  /// What backward needs: the input and tanh of the inner term.
  struct Context {
    Tensor<T> x;     ///< the input, contiguous
    Tensor<T> tanh;  ///< tanh(sqrt(2/pi) (x + 0.044715 x^3)), saved so backward need not redo it
  };

  /// Applies GELU element-wise.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    const Tensor<T> xc = x.contiguous();
    Tensor<T> y = Tensor<T>::empty(x.shape());
    Tensor<T> t = Tensor<T>::empty(x.shape());
    const std::int64_t n = xc.numel();
    const T* xp = xc.data();
    T* yp = y.data();
    T* tp = t.data();
    for (std::int64_t i = 0; i < n; ++i) {
      const T v = xp[i];
      tp[i] = std::tanh(k0 * (v + k1 * v * v * v));
      yp[i] = T(0.5) * v * (T{1} + tp[i]);
    }
    return {std::move(y), Context{xc, std::move(t)}};
  }

  /// dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)). Throws
  /// tessera::Error naming both shapes when dy does not have the input's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) const {
    expect_same_shape("GELU: output gradient and input", dy, ctx.x);
    const Tensor<T> g = dy.contiguous();
    Tensor<T> dx = Tensor<T>::empty(g.shape());
    const std::int64_t n = g.numel();
    const T* xp = ctx.x.data();
    const T* tp = ctx.tanh.data();
    const T* gp = g.data();
    T* dp = dx.data();
    for (std::int64_t i = 0; i < n; ++i) {
      const T v = xp[i], t = tp[i];
      dp[i] = gp[i] * (T(0.5) * (T{1} + t) + T(0.5) * v * (T{1} - t * t) * k0 * (T{1} + T{3} * k1 * v * v));
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
