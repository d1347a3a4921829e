#pragma once
/// @file
/// AllReduceHook: the uncompressed reduction ("none"), one in-place all-reduce (sum) of the
/// bucket, the same call GradBuckets makes without a hook, so the result is bitwise the same.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <span>
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
  /// Point-to-point form: the values themselves.
  bool point_to_point() const override { return true; }
  /// n.
  std::size_t encoded_size(std::size_t n) const override { return n; }
  /// Copies `values` into `out`. Throws tessera::Error when the sizes differ.
  void encode(std::span<const T> values, std::span<T> out) override {
    TESSERA_EXPECTS(out.size() == values.size(), "AllReduceHook::encode: ", values.size(), " values into ", out.size());
    std::copy(values.begin(), values.end(), out.begin());
  }
  /// Copies `in` into `values`. Throws tessera::Error when the sizes differ.
  void decode(std::span<const T> in, std::span<T> values) const override {
    TESSERA_EXPECTS(in.size() == values.size(), "AllReduceHook::decode: ", in.size(), " elements into ", values.size());
    std::copy(in.begin(), in.end(), values.begin());
  }
  /// "none".
  std::string name() const override { return "none"; }
};

}  // namespace tessera
