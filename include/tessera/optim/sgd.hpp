#pragma once
/// @file
/// SGD with momentum and (coupled) weight decay, as PyTorch's torch.optim.SGD.

#include <concepts>
#include <cstddef>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/optim/param_group.hpp"

namespace tessera::optim {

/// Options of SGD.
struct SGDOptions {
  double lr = 0.01;            ///< learning rate
  double momentum = 0.0;       ///< momentum factor; 0 for plain SGD
  double weight_decay = 0.0;   ///< L2 penalty added to the gradient (coupled, not AdamW's)
};

/// Stochastic gradient descent with momentum (Polyak's heavy ball in PyTorch's form, dampening
/// 0): d = g + weight_decay * p; b = d on the first step, else b = momentum * b + d;
/// p -= lr * b (b = d when momentum is 0).
///
/// It updates whatever parameters it is given, in place, through their `value` and `grad`
/// tensors (which may be strided views), so a sharded (ZeRO-1) optimizer is this one built on
/// the local slices. The parameters must outlive it and stay in place.
template <std::floating_point T>
class SGD {
 public:
  using Options = SGDOptions;  ///< the options type (generic code builds optimizers from it)
  /// An optimizer of `params`, all with `options`. Throws tessera::Error for a negative lr,
  /// momentum or weight decay.
  SGD(ParameterList<T> params, const SGDOptions& options = {}) : SGD(single_group(std::move(params), options)) {}

  /// An optimizer of the groups' parameters (in group order), each group with its options.
  /// Throws tessera::Error as above, naming the group.
  explicit SGD(const std::vector<ParamGroup<T, SGDOptions>>& groups) {
    TESSERA_EXPECTS(!groups.empty(), "SGD: no parameter group");
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const SGDOptions& o = groups[g].options;
      TESSERA_EXPECTS(o.lr >= 0 && o.momentum >= 0 && o.weight_decay >= 0, "SGD: group ", g, ": lr=", o.lr,
                      " momentum=", o.momentum, " weight_decay=", o.weight_decay, " must not be negative");
      options_.push_back(o);
      for (Parameter<T>& p : groups[g].params) {
        params_.push_back(p);
        group_.push_back(g);
      }
    }
    buffers_.resize(params_.size());
  }

  /// One update of every parameter from its current gradient.
  void step() {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const SGDOptions& o = options_[group_[i]];
      const T lr = static_cast<T>(o.lr), mu = static_cast<T>(o.momentum), wd = static_cast<T>(o.weight_decay);
      Parameter<T>& p = params_[i];
      if (o.momentum == 0) {
        detail::for_each_element("SGD", [=](T& v, const T& g) { v -= lr * (g + wd * v); }, p.value, p.grad);
        continue;
      }
      Tensor<T>& buf = buffers_[i];
      if (buf.numel() != p.value.numel()) {
        buf = Tensor<T>::empty(p.value.shape());
        detail::for_each_element("SGD", [=](T& v, const T& g, T& b) { b = g + wd * v; v -= lr * b; }, p.value, p.grad, buf);
      } else {
        detail::for_each_element("SGD", [=](T& v, const T& g, T& b) { b = mu * b + (g + wd * v); v -= lr * b; }, p.value,
                                 p.grad, buf);
      }
    }
  }
  /// Sets every gradient to zero.
  void zero_grad() { params_.zero_grad(); }
  /// The learning rate (of group 0; set_lr sets every group's).
  double lr() const noexcept { return options_.front().lr; }
  /// Sets every group's learning rate (e.g. from a schedule) for the next steps. Throws
  /// tessera::Error naming it when it is negative or not a number.
  void set_lr(double lr) {
    TESSERA_EXPECTS(lr >= 0, "SGD::set_lr: learning rate ", lr, " must be a number >= 0");
    for (SGDOptions& o : options_) o.lr = lr;
  }
  /// The parameters it updates.
  const ParameterList<T>& parameters() const noexcept { return params_; }
  /// The momentum buffer of parameter i (empty before the first step or without momentum).
  const Tensor<T>& momentum_buffer(std::size_t i) const { return buffers_.at(i); }
  /// Bytes of optimizer state held (the momentum buffers; 0 without momentum or before the
  /// first step), e.g. to check that a sharded (ZeRO-1) optimizer holds 1/dp of it.
  std::size_t state_bytes() const noexcept {
    std::size_t n = 0;
    for (const Tensor<T>& b : buffers_) n += static_cast<std::size_t>(b.numel()) * sizeof(T);
    return n;
  }

 private:
  ParameterList<T> params_;
  std::vector<SGDOptions> options_;  // per group
  std::vector<std::size_t> group_;   // per parameter
  std::vector<Tensor<T>> buffers_;
};

}  // namespace tessera::optim
