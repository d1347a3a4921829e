#pragma once
/// @file
/// Dropout with counter-based random masks, aware of the tensor-parallel region it runs in (Srivastava et al. 2014, "Dropout"), keyed by
/// (seed, stream, iteration, global element index), so that a mask does not depend on how many
/// ranks compute it, and recomputation draws the same mask.

#include <concepts>
#include <cstdint>
#include <string>
#include <utility>

#include "tessera/core/batch_position.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/parallel/tensor/layouts.hpp"

namespace tessera {

/// y = x * keep / (1 - p), keep = 1 with probability 1 - p, element-wise; no parameters. With
/// p = 0 it is the identity (y is x itself, and no mask is drawn).
///
/// The keep bit of element i is a pure function of (init.seed, the stream named init.prefix,
/// the iteration set by set_iteration, the step of the thread's BatchPosition, i)
/// (counter-based, tessera::random_bits), so a forward recomputed for activation checkpointing
/// draws the same mask, and the mask of a slice is the slice of the mask. i counts from the
/// BatchPosition's first row: element (b, rest) of x is element (first_row + b, rest) of the
/// global batch, so micro-batches, accumulation calls and dp replicas that hold other rows of
/// one step's batch draw together exactly the mask of the whole batch on one rank. With
/// BatchPosition::training false (evaluation: PipelineParallel::forward_only) it is the identity.
///
/// Under tensor parallelism (forward with a ShardInfo, as TensorParallel calls it):
/// - replicated region: the same mask on every tp rank (i is the element index);
/// - sequence-parallel region (Shard<1> of (B, T, d)): i is the element's index in the full
///   (B, T, d) tensor, so the ranks together draw exactly the mask of the unsharded tensor;
/// - tensor-parallel region (Shard<-1>): the stream also includes the tp rank, so each rank
///   draws its own mask (Megatron-LM's model-parallel RNG tracker).
///
/// x: any shape -> y: same shape.
template <std::floating_point T>
class Dropout {
 public:
  using Input = Tensor<T>;  ///< x: any shape
  /// What backward needs: the mask, already scaled (empty when p is 0).
  struct Context {
    Tensor<T> mask;  ///< 1 / (1 - p) where kept, 0 where dropped
  };

  /// Drops with probability `p` in [0, 1); the stream is named `init.prefix` (e.g. "drop")
  /// under `init.seed`. Throws tessera::Error naming p when it is outside [0, 1).
  explicit Dropout(double p = 0.0, const nn::LayerInit& init = {}) : p_(p), seed_(init.seed), stream_(stream_id(init.prefix)) {
    TESSERA_EXPECTS(p >= 0.0 && p < 1.0, "Dropout: p ", p, " is outside [0, 1)");
  }

  /// The masks of the next forward calls are those of `iteration` (e.g. step x
  /// num_microbatches + microbatch); every rank sets the same value.
  void set_iteration(std::uint64_t iteration) noexcept { iteration_ = iteration; }
  /// The iteration whose masks forward draws.
  std::uint64_t iteration() const noexcept { return iteration_; }
  /// The drop probability.
  double p() const noexcept { return p_; }

  /// The counter-based key of the masks drawn at `at` in `where`'s region: element g (its global
  /// index, see the class comment) is kept when (splitmix64(key ^ g) >> 11) >= keep_threshold().
  /// The device kernels (tessera/cuda) draw the same masks from it.
  std::uint64_t mask_key(const BatchPosition& at, const ShardInfo& where = {}) const noexcept {
    std::uint64_t stream = stream_ ^ detail::splitmix64(iteration_) ^ detail::splitmix64(0x5354455000000000ULL ^ at.step);
    if (where.region == ShardInfo::Region::tensor_parallel)
      stream ^= detail::splitmix64(0x7470000000000000ULL + static_cast<std::uint64_t>(where.rank));
    return stream_key(seed_, stream);
  }
  /// p * 2^53: 53 random bits below it drop the element.
  std::uint64_t keep_threshold() const noexcept { return static_cast<std::uint64_t>(p_ * 9007199254740992.0); }

  /// x with dropped elements zeroed and kept ones scaled by 1 / (1 - p).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const { return forward(x, ShardInfo{}); }

  /// The same on this rank's part of a tensor-parallel activation (see the class comment).
  /// Throws tessera::Error unless a sequence-parallel x is (B, T / tp, d).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x, const ShardInfo& where) const {
    const BatchPosition at = current_batch_position();
    if (p_ == 0.0 || !at.training) return {x, Context{}};
    const Tensor<T> xc = x.contiguous();
    Tensor<T> y = Tensor<T>::empty(x.shape());
    Tensor<T> mask = Tensor<T>::empty(x.shape());
    const std::uint64_t key = mask_key(at, where);
    const T scale = static_cast<T>(1.0 / (1.0 - p_));
    // Global index of local element i: under sequence parallelism, rank r holds positions
    // [r Tl, (r + 1) Tl) of each of the B rows of T = Tl * tp positions.
    std::int64_t rows = 1, local_t = 1, inner = x.numel(), offset = 0, global_t = 1;
    if (where.region == ShardInfo::Region::sequence_parallel) {
      TESSERA_EXPECTS(x.rank() == 3, "Dropout: a sequence-parallel activation must be (B, T / tp, d); got shape ",
                      x.shape());
      rows = x.size(0);
      local_t = x.size(1);
      inner = x.size(2);
      global_t = local_t * where.size;
      offset = local_t * where.rank;
    }
    // Rows: dim 0 (the batch), so that the mask follows the rows' place in the global batch.
    if (where.region != ShardInfo::Region::sequence_parallel && x.rank() >= 2 && x.size(0) > 0) {
      rows = x.size(0);
      inner = x.numel() / rows;
    }
    const std::int64_t row0 = at.first_row;
    const std::uint64_t threshold = keep_threshold();
    std::int64_t i = 0;
    for (std::int64_t b = 0; b < rows; ++b)
      for (std::int64_t t = 0; t < local_t; ++t)
        for (std::int64_t j = 0; j < inner; ++j, ++i) {
          const auto g = static_cast<std::uint64_t>(((row0 + b) * global_t + offset + t) * inner + j);
          const bool keep = (detail::splitmix64(key ^ g) >> 11) >= threshold;
          mask.data()[i] = keep ? scale : T{0};
          y.data()[i] = xc.data()[i] * mask.data()[i];
        }
    return {std::move(y), Context{std::move(mask)}};
  }

  /// dx = dy * mask (dy itself when p is 0). Throws tessera::Error naming both shapes when dy
  /// does not have the input's shape.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) const {
    if (ctx.mask.numel() == 0 && p_ == 0.0) return dy;
    expect_same_shape("Dropout: output gradient and mask", dy, ctx.mask);
    Tensor<T> dx = dy.clone();
    detail::for_each_element("Dropout", [](T& d, const T& m) { d *= m; }, dx, ctx.mask);
    return dx;
  }

  /// None: dropout has no parameters.
  ParameterList<T> parameters() noexcept { return {}; }

 private:
  double p_;
  std::uint64_t seed_;
  std::uint64_t stream_;
  std::uint64_t iteration_ = 0;
};

}  // namespace tessera
