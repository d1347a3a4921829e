#pragma once
/// @file
/// LocalGradientHook: no reduction at all; each replica keeps its own gradient, rescaled to its
/// own mean. For local SGD / DiLoCo (LocalSGD) inside a policy whose dp reduction is built in
/// (Hybrid's DataParallelStage): the replicas take their inner steps on local gradients and
/// meet only at LocalSGD's synchronizations.

#include <concepts>
#include <string>

#include "tessera/comm/communicator.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"

namespace tessera {

/// Leaves each rank's gradient local, multiplied by p = comm.size(): tessera's gradients come
/// divided by the global sample count (DataParallel::loss_scale), so with equal per-rank counts
/// the product is the mean over this rank's own samples. Local: no communication (it is still
/// called on every rank, in bucket order, like any hook). Replicas drift apart until something
/// else (LocalSGD) brings them together.
template <std::floating_point T>
class LocalGradientHook final : public CommHook<T> {
 public:
  /// Multiplies `bucket.grad` by comm.size(). Local.
  void reduce(GradBucketView<T>& bucket, Comm& comm) override {
    const T p = static_cast<T>(comm.size());
    for (T& x : bucket.grad) x *= p;
  }
  /// "local".
  std::string name() const override { return "local"; }
};

}  // namespace tessera
