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
#include "tessera/optim/param_group.hpp"

namespace tessera::optim {

/// Options of AdamW (defaults as PyTorch).
struct AdamWOptions {
  double lr = 1e-3;            ///< learning rate
  double beta1 = 0.9;          ///< decay of the first moment
  double beta2 = 0.999;        ///< decay of the second moment
  double eps = 1e-8;           ///< added to sqrt of the corrected second moment
  double weight_decay = 0.01;  ///< decoupled: p *= 1 - lr * weight_decay before the Adam step
  /// Freezes the second moment after this many steps (0: never; AdamW::step): 1-bit Adam's
  /// preconditioner (Tang et al., "1-bit Adam: communication efficient large-scale training
  /// with Adam's convergence speed", ICML 2021) for gradients compressed with error feedback.
  std::int64_t freeze_variance_after = 0;
};

/// AdamW. At step t (from 1), for each element: p *= 1 - lr * wd; m = b1 m + (1 - b1) g;
/// v = b2 v + (1 - b2) g^2; p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
///
/// Frozen variance (AdamWOptions::freeze_variance_after = F > 0; Tang et al., "1-bit Adam",
/// ICML 2021: a dense warm-up, then v frozen): steps 1..F are the steps above; from step
/// F + 1 on, v is not updated and its bias correction stays at step F's, so each step is
/// p *= 1 - lr * wd; m = b1 m + (1 - b1) g; p -= (lr / (1 - b1^t)) * m / (sqrt(v_F) /
/// sqrt(1 - b2^F) + eps): momentum SGD with a fixed per-element preconditioner, linear in g.
/// That is what error feedback needs: a compressor's residual returns later, and the sum of
/// what it delivers is the sum of the gradients, so a linear optimizer applies the same total
/// step; Adam's v, taken from compressed values (a top-k entry, a low-rank estimate), is not
/// linear and breaks this. The first moment keeps its bias correction 1 - b1^t (chosen so
/// that F = 0 and t <= F are plain AdamW; it differs from 1 by 0.9^t, below 1e-4 after 90
/// steps at b1 = 0.9). 1-bit Adam compresses m; this option only freezes v, whatever the
/// caller compresses. Per group; the step count is the optimizer's, so a checkpoint that
/// restores steps() and the moments resumes it exactly.
///
/// It updates whatever parameters it is given, in place, through their `value` and `grad`
/// tensors (which may be strided views), so a sharded (ZeRO-1) optimizer is this one built on
/// the local slices. Parameter groups give subsets their own options (weight_decay_groups: no
/// decay on biases and norms); set_lr sets every group's learning rate. The parameters must
/// outlive it and stay in place.
template <std::floating_point T>
class AdamW {
 public:
  using Options = AdamWOptions;  ///< the options type (generic code builds optimizers from it)
  /// An optimizer of `params`, all with `options`; moments start at 0. Throws tessera::Error
  /// for a negative lr, eps or weight decay, or betas outside [0, 1).
  AdamW(ParameterList<T> params, const AdamWOptions& options = {})
      : AdamW(single_group(std::move(params), options)) {}

  /// An optimizer of the groups' parameters (in group order: parameter i of parameters() is
  /// the i-th of the groups' lists put end to end), each group with its options. Throws
  /// tessera::Error as above, naming the group.
  explicit AdamW(const std::vector<ParamGroup<T, AdamWOptions>>& groups) {
    TESSERA_EXPECTS(!groups.empty(), "AdamW: no parameter group");
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const AdamWOptions& o = groups[g].options;
      TESSERA_EXPECTS(o.lr >= 0 && o.eps >= 0 && o.weight_decay >= 0, "AdamW: group ", g, ": lr=", o.lr, " eps=", o.eps,
                      " weight_decay=", o.weight_decay, " must not be negative");
      TESSERA_EXPECTS(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "AdamW: group ", g, ": betas (",
                      o.beta1, ", ", o.beta2, ") must lie in [0, 1)");
      TESSERA_EXPECTS(o.freeze_variance_after >= 0, "AdamW: group ", g, ": freeze_variance_after ",
                      o.freeze_variance_after, " must be >= 0 (0: never)");
      options_.push_back(o);
      for (Parameter<T>& p : groups[g].params) {
        params_.push_back(p);
        group_.push_back(g);
        m_.emplace_back(p.value.shape());
        v_.emplace_back(p.value.shape());
      }
    }
  }

  /// One update of every parameter from its current gradient.
  void step() {
    ++steps_;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const AdamWOptions& o = options_[group_[i]];
      // Frozen variance: v keeps step F's value and bias correction (class comment).
      const bool frozen = o.freeze_variance_after > 0 && steps_ > o.freeze_variance_after;
      const double bc1 = 1 - std::pow(o.beta1, static_cast<double>(steps_));
      const double bc2 = 1 - std::pow(o.beta2, static_cast<double>(frozen ? o.freeze_variance_after : steps_));
      const T decay = static_cast<T>(1 - o.lr * o.weight_decay);
      const T step_size = static_cast<T>(o.lr / bc1);
      const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
      const T b1 = static_cast<T>(o.beta1), b2 = static_cast<T>(o.beta2);
      const T eps = static_cast<T>(o.eps);
      Parameter<T>& p = params_[i];
      if (frozen)
        detail::for_each_element(
            "AdamW",
            [=](T& x, const T& g, T& m, const T& v) {
              x *= decay;
              m = b1 * m + (T{1} - b1) * g;
              x -= step_size * m / (std::sqrt(v) / bc2_sqrt + eps);
            },
            p.value, p.grad, m_[i], v_[i]);
      else
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
  /// The learning rate (of group 0; set_lr sets every group's).
  double lr() const noexcept { return options_.front().lr; }
  /// Sets every group's learning rate (e.g. from a schedule) for the next steps. Throws
  /// tessera::Error naming it when it is negative or not a number.
  void set_lr(double lr) {
    TESSERA_EXPECTS(lr >= 0, "AdamW::set_lr: learning rate ", lr, " must be a number >= 0");
    for (AdamWOptions& o : options_) o.lr = lr;
  }
  /// The options of parameter group `g`. Throws std::out_of_range for a group that does not exist.
  const AdamWOptions& group_options(std::size_t g) const { return options_.at(g); }
  /// The group of parameter i.
  std::size_t group_of(std::size_t i) const { return group_.at(i); }
  /// Whether group `g`'s second moment is frozen for the next step (steps() >=
  /// freeze_variance_after > 0).
  bool variance_frozen(std::size_t g = 0) const {
    const AdamWOptions& o = options_.at(g);
    return o.freeze_variance_after > 0 && steps_ >= o.freeze_variance_after;
  }
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
  std::vector<AdamWOptions> options_;  // per group
  std::vector<std::size_t> group_;     // per parameter
  std::vector<Tensor<T>> m_, v_;
  std::int64_t steps_ = 0;
};

}  // namespace tessera::optim
