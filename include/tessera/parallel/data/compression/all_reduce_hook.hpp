#pragma once
/// @file
/// AllReduceHook: the uncompressed reduction ("none"), one in-place all-reduce (sum) of the
/// bucket, the same call GradBuckets makes without a hook, so the result is bitwise the same.

#include <concepts>
#include <string>

#include "tessera/comm/communicator.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"

namespace tessera {

/// No compression: one all-reduce (sum) of the bucket in its element type (DDP's default
/// `allreduce_hook`). Collective over the dp communicator, one all-reduce per bucket.
template <std::floating_point T>
class AllReduceHook final : public CommHook<T> {
 public:
  /// All-reduces `bucket.grad` in place. Collective.
  void reduce(GradBucketView<T>& bucket, Comm& comm) override {
    comm.all_reduce(bucket.grad, ReduceOp::sum);
    this->count_all_reduce(bucket.grad.size(), sizeof(T), comm.size());
  }
  /// "none".
  std::string name() const override { return "none"; }
};

}  // namespace tessera
