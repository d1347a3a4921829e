#pragma once
/// @file
/// Clipping of gradients by their global L2 norm (Pascanu et al., "On the difficulty of
/// training recurrent neural networks", ICML 2013), as torch.nn.utils.clip_grad_norm_.

#include <cmath>
#include <concepts>

#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::optim {

/// The sum of squares of every gradient element, accumulated in double. With sharded
/// parameters each rank computes it on its shard, the ranks all-reduce (sum) it, counting a
/// replicated parameter once, and pass the square root to clip_grads_by_norm.
template <std::floating_point T>
double grad_norm_squared(const ParameterList<T>& params) {
  double s = 0;
  for (const Parameter<T>& p : params)
    detail::for_each_element("grad_norm_squared", [&s](const T& g) { s += static_cast<double>(g) * g; }, p.grad);
  return s;
}

/// Scales every gradient by min(1, max_norm / (total_norm + 1e-6)), given the global norm
/// `total_norm` of all gradients (of every rank, for sharded parameters). Throws
/// tessera::Error for a negative max_norm.
template <std::floating_point T>
void clip_grads_by_norm(const ParameterList<T>& params, double max_norm, double total_norm) {
  TESSERA_EXPECTS(max_norm >= 0, "clip_grad_norm: max_norm ", max_norm, " is negative");
  const double coef = max_norm / (total_norm + 1e-6);
  if (coef >= 1) return;
  for (const Parameter<T>& p : params) p.grad.scale_(static_cast<T>(coef));
}

/// Clips the gradients of `params` (all on this rank) to global L2 norm at most `max_norm`
/// and returns their norm before clipping. Throws tessera::Error for a negative max_norm.
template <std::floating_point T>
double clip_grad_norm(const ParameterList<T>& params, double max_norm) {
  const double norm = std::sqrt(grad_norm_squared(params));
  clip_grads_by_norm(params, max_norm, norm);
  return norm;
}

}  // namespace tessera::optim
