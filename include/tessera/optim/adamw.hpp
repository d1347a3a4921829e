#pragma once
/// @file
/// AdamW: Adam with bias correction and decoupled weight decay (Loshchilov and Hutter,
/// "Decoupled weight decay regularization", ICLR 2019), as PyTorch's torch.optim.AdamW.

#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::optim {

/// Options of AdamW (defaults as PyTorch).
struct AdamWOptions {
  double lr = 1e-3;            ///< learning rate
  double beta1 = 0.9;          ///< decay of the first moment
  double beta2 = 0.999;        ///< decay of the second moment
  double eps = 1e-8;           ///< added to sqrt of the corrected second moment
  double weight_decay = 0.01;  ///< decoupled: p *= 1 - lr * weight_decay before the Adam step
};

/// AdamW. At step t (from 1), for each element: p *= 1 - lr * wd; m = b1 m + (1 - b1) g;
/// v = b2 v + (1 - b2) g^2; p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
///
/// It updates whatever parameters it is given, in place, through their `value` and `grad`
/// tensors (which may be strided views), so a sharded (ZeRO-1) optimizer is this one built on
/// the local slices. Parameters that should not decay (biases, LayerNorm) go to a second
/// AdamW with weight_decay 0. The parameters must outlive it and stay in place.
template <std::floating_point T>
class AdamW {
 public:
  using Options = AdamWOptions;  ///< the options type (generic code builds optimizers from it)
  /// An optimizer of `params`; moments start at 0. Throws tessera::Error for a negative lr,
  /// eps or weight decay, or betas outside [0, 1).
  AdamW(ParameterList<T> params, const AdamWOptions& options = {})
      : params_(std::move(params)), options_(options) {
    TESSERA_EXPECTS(options.lr >= 0 && options.eps >= 0 && options.weight_decay >= 0, "AdamW: lr=", options.lr,
                    " eps=", options.eps, " weight_decay=", options.weight_decay, " must not be negative");
    TESSERA_EXPECTS(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1,
                    "AdamW: betas (", options.beta1, ", ", options.beta2, ") must lie in [0, 1)");
    for (const Parameter<T>& p : params_) {
      m_.emplace_back(p.value.shape());
      v_.emplace_back(p.value.shape());
    }
  }

  /// One update of every parameter from its current gradient.
  void step() {
    ++steps_;
    const double bc1 = 1 - std::pow(options_.beta1, static_cast<double>(steps_));
    const double bc2 = 1 - std::pow(options_.beta2, static_cast<double>(steps_));
    const T decay = static_cast<T>(1 - options_.lr * options_.weight_decay);
    const T step_size = static_cast<T>(options_.lr / bc1);
    const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
    const T b1 = static_cast<T>(options_.beta1), b2 = static_cast<T>(options_.beta2);
    const T eps = static_cast<T>(options_.eps);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Parameter<T>& p = params_[i];
      detail::for_each_element(
          "AdamW",
          [=](T& x, const T& g, T& m, T& v) {
            x *= decay;
            m = b1 * m + (T{1} - b1) * g;
            v = b2 * v + (T{1} - b2) * g * g;
            x -= step_size * m / (std::sqrt(v) / bc2_sqrt + eps);
          },
          p.value, p.grad, m_[i], v_[i]);
    }
  }
  /// Sets every gradient to zero.
  void zero_grad() { params_.zero_grad(); }
  /// The learning rate.
  double lr() const noexcept { return options_.lr; }
  /// Sets the learning rate (e.g. from a schedule) for the next steps.
  void set_lr(double lr) { options_.lr = lr; }
  /// Steps taken so far (t of the bias correction).
  std::int64_t steps() const noexcept { return steps_; }
  /// Sets the step count, e.g. to the one a checkpoint saved (the moments are restored through
  /// exp_avg / exp_avg_sq, whose tensors are handles). Throws tessera::Error when negative.
  void set_steps(std::int64_t steps) {
    TESSERA_EXPECTS(steps >= 0, "AdamW: step count ", steps, " is negative");
    steps_ = steps;
  }
  /// The parameters it updates.
  const ParameterList<T>& parameters() const noexcept { return params_; }
  /// First moment of parameter i (a handle: writing its elements sets the moment).
  const Tensor<T>& exp_avg(std::size_t i) const { return m_.at(i); }
  /// Second moment of parameter i (a handle, as exp_avg).
  const Tensor<T>& exp_avg_sq(std::size_t i) const { return v_.at(i); }
  /// Bytes of optimizer state held (both moments of every parameter), e.g. to check that a
  /// sharded (ZeRO-1) optimizer holds 1/dp of it.
  std::size_t state_bytes() const noexcept {
    std::size_t n = 0;
    for (std::size_t i = 0; i < m_.size(); ++i)
      n += static_cast<std::size_t>(m_[i].numel() + v_[i].numel()) * sizeof(T);
    return n;
  }

 private:
  ParameterList<T> params_;
  AdamWOptions options_;
  std::vector<Tensor<T>> m_, v_;
  std::int64_t steps_ = 0;
};

}  // namespace tessera::optim
