#pragma once
/// @file
/// The optimizer state of a ZeroOptimizer (ZeRO-1 over a DataParallel's gradient buckets) as
/// named flat pieces, so that it is saved and resharded to any other dp size, with or without
/// ZeRO. Not included by checkpoint.hpp (it pulls in the data-parallel policy).

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <vector>

#include "tessera/checkpoint/flat_layout.hpp"
#include "tessera/checkpoint/optimizer_state.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/data/grad_buckets.hpp"
#include "tessera/parallel/data/zero_optimizer.hpp"

namespace tessera::checkpoint {

/// One bucket of ZeRO-1: its flat vector (the bucket's parameters at their offsets, padded to
/// a multiple of dp) and this dp rank's range [begin, end) of it.
struct ZeroBucketShard {
  FlatLayout layout;        ///< the bucket's parameters and padded length
  std::int64_t begin = 0;   ///< first flat element this rank owns
  std::int64_t end = 0;     ///< one past the last
};

/// The ZeRO-1 (and ZeRO-2: the same blocks) layout of `buckets` as this dp rank (buckets.comm().rank()) holds it: bucket b of
/// the result is the flat vector whose block `rank` ZeroOptimizer's inner optimizer sees as its
/// parameter b. Local. For optimizers other than AdamW: `layout.shards(begin, state_b, suffix)`
/// names their per-bucket state.
template <std::floating_point T>
std::vector<ZeroBucketShard> zero_bucket_shards(GradBuckets<T>& buckets) {
  const int rank = buckets.comm().rank();
  std::vector<ZeroBucketShard> out;
  for (std::size_t bi = 0; bi < buckets.buckets().size(); ++bi) {
    const auto& bucket = buckets.buckets()[bi];
    ZeroBucketShard z;
    for (std::size_t i : bucket.slots) {
      const auto& s = buckets.slots()[i];
      z.layout.params.push_back({s.param->name, s.param->value.shape(), s.param->layout, s.offset});
    }
    std::sort(z.layout.params.begin(), z.layout.params.end(),
              [](const FlatParam& a, const FlatParam& b) { return a.offset < b.offset; });
    const std::int64_t n = buckets.shard_size(bi);  // also while ZeRO-2 has released the buffer
    z.layout.padded_numel = n * buckets.comm().size();
    z.begin = rank * n;
    z.end = (rank + 1) * n;
    out.push_back(std::move(z));
  }
  return out;
}

/// The ZeRO-1 layout of several bucket sets of one dp communicator (a Hybrid's stages), their
/// buckets in order: what a ZeroOptimizer over `sets` shards. Local.
template <std::floating_point T>
std::vector<ZeroBucketShard> zero_bucket_shards(const std::vector<GradBuckets<T>*>& sets) {
  std::vector<ZeroBucketShard> out;
  for (GradBuckets<T>* b : sets)
    for (ZeroBucketShard& z : zero_bucket_shards(*b)) out.push_back(std::move(z));
  return out;
}

/// The state of `zero` (a ZeroOptimizer of AdamW over the bucket sets `sets`, those it was built
/// on, with or without parameter groups) as named pieces: for every parameter part
/// in this dp rank's blocks, "<name>.exp_avg" and "<name>.exp_avg_sq" with their flat ranges
/// (views into the inner AdamW's moments, so loading writes them in place), and step =
/// zero.inner().steps(). After loading, call `zero.inner().set_steps(state.step)`. Local.
/// Throws tessera::Error when the inner optimizer has not one parameter per shard piece.
template <std::floating_point T>
OptimizerState<T> zero_adamw_state(ZeroOptimizer<optim::AdamW<T>>& zero, const std::vector<GradBuckets<T>*>& sets) {
  optim::AdamW<T>& inner = zero.inner();
  const std::vector<ZeroBucketShard> shards = zero_bucket_shards(sets);
  const std::vector<ZeroShardPiece>& pieces = zero.shard_pieces();
  TESSERA_EXPECTS(inner.parameters().size() == pieces.size(), "zero_adamw_state: the inner AdamW has ",
                  inner.parameters().size(), " parameters for ", pieces.size(), " shard pieces");
  OptimizerState<T> s;
  s.step = inner.steps();
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const ZeroBucketShard& b = shards.at(pieces[i].bucket);
    for (auto& t : b.layout.shards(pieces[i].begin, inner.exp_avg(i), ".exp_avg")) s.tensors.push_back(std::move(t));
    for (auto& t : b.layout.shards(pieces[i].begin, inner.exp_avg_sq(i), ".exp_avg_sq")) s.tensors.push_back(std::move(t));
  }
  return s;
}
/// As above, for a ZeroOptimizer over one DataParallel's `buckets`.
template <std::floating_point T>
OptimizerState<T> zero_adamw_state(ZeroOptimizer<optim::AdamW<T>>& zero, GradBuckets<T>& buckets) {
  return zero_adamw_state(zero, std::vector<GradBuckets<T>*>{&buckets});
}

}  // namespace tessera::checkpoint
