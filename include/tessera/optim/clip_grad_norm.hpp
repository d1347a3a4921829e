#pragma once
/// @file
/// Clipping of gradients by their global L2 norm (Pascanu et al., "On the difficulty of
/// training recurrent neural networks", ICML 2013), as torch.nn.utils.clip_grad_norm_: the one
/// implementation for every model, serial or parallel. A parallel model exposes its gradients
/// as `Gradients`: the pieces this rank holds, which of them it counts, and the ranks to sum
/// over, so that a tp-replicated parameter, a tied weight's second copy or a dp replica's
/// equal copy is counted once.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::optim {

/// One gradient tensor (or a view of part of one) that this rank holds.
template <std::floating_point T>
struct GradientPiece {
  Tensor<T> grad;        ///< the gradient elements (a handle: clipping scales them in place)
  bool counted = true;   ///< whether this rank counts it in the norm (false: another rank, or another piece, holds the same values)
  /// For messages (NonfiniteCheck): the parameter whose gradient elements these are, when the
  /// piece is a run of one parameter's flattened gradient (a ZeRO shard); empty: unnamed.
  std::string name{};
  /// With `name`: the index, in that parameter's flattened gradient, of this piece's element 0.
  std::int64_t first_element = 0;
};

/// The gradients of a (possibly parallel) model as this rank holds them: clipping scales every
/// piece, and the norm sums the squares of the counted pieces over the ranks of `comm`. The
/// counted pieces of all ranks of `comm` together must hold every gradient element of the
/// model exactly once. An empty `comm` handle: this rank holds the whole model.
template <std::floating_point T>
struct Gradients {
  std::vector<GradientPiece<T>> pieces;  ///< what this rank holds
  Comm comm;                             ///< the ranks that together hold the model (empty: this rank alone)
};

/// Every parameter's gradient of `params`, each counted, on this rank alone.
template <std::floating_point T>
Gradients<T> gradients_of(const ParameterList<T>& params) {
  Gradients<T> g;
  for (const Parameter<T>& p : params) g.pieces.push_back({p.grad, true});
  return g;
}

/// The sum of squares of the counted pieces on this rank, accumulated in double in piece order.
template <std::floating_point T>
double local_grad_norm_squared(const Gradients<T>& grads) {
  double s = 0;
  for (const GradientPiece<T>& piece : grads.pieces)
    if (piece.counted)
      detail::for_each_element("grad_norm", [&s](const T& g) { s += static_cast<double>(g) * g; }, piece.grad);
  return s;
}

/// The global L2 norm of the model's gradients: the square root of the counted squares summed
/// over grads.comm. Collective over grads.comm (one all-reduce of a double), local without it.
template <std::floating_point T>
double grad_norm(const Gradients<T>& grads) {
  double s = local_grad_norm_squared(grads);
  if (grads.comm.valid() && grads.comm.size() > 1) {
    Comm comm = grads.comm;  // a handle; behind any reduction still queued on it
    comm.iall_reduce(std::span<double>(&s, 1), ReduceOp::sum).wait();
  }
  return std::sqrt(s);
}

/// The sum of squares of every gradient element of `params` (all on this rank), in double.
template <std::floating_point T>
double grad_norm_squared(const ParameterList<T>& params) {
  return local_grad_norm_squared(gradients_of(params));
}

/// Scales every piece of `grads` by min(1, max_norm / (norm + 1e-6)), given their global
/// norm, and returns `norm`. Local. Throws tessera::Error for a negative max_norm.
template <std::floating_point T>
double scale_by_norm(const Gradients<T>& grads, double max_norm, double norm) {
  TESSERA_EXPECTS(max_norm >= 0, "clip_grad_norm: max_norm ", max_norm,
                  std::isnan(max_norm) ? " is not a number" : " is negative");
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1)
    for (const GradientPiece<T>& piece : grads.pieces) piece.grad.scale_(static_cast<T>(coef));
  return norm;
}

/// Clips the model's gradients to global L2 norm at most `max_norm` (torch's clip_grad_norm_:
/// every gradient scaled by min(1, max_norm / (norm + 1e-6))) and returns the norm before
/// clipping, the same on every rank of grads.comm. Collective over grads.comm. Throws
/// tessera::Error for a negative or NaN max_norm (on every rank, before communicating).
template <std::floating_point T>
double clip_grad_norm(const Gradients<T>& grads, double max_norm) {
  TESSERA_EXPECTS(max_norm >= 0, "clip_grad_norm: max_norm ", max_norm,
                  std::isnan(max_norm) ? " is not a number" : " is negative");
  return scale_by_norm(grads, max_norm, grad_norm(grads));
}

/// Clips the gradients of `params` (all on this rank) to global L2 norm at most `max_norm`
/// and returns their norm before clipping. Throws tessera::Error for a negative max_norm.
template <std::floating_point T>
double clip_grad_norm(const ParameterList<T>& params, double max_norm) {
  return clip_grad_norm(gradients_of(params), max_norm);
}

}  // namespace tessera::optim
