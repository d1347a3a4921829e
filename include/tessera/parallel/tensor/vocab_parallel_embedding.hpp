#pragma once
/// @file
/// VocabParallelEmbedding: a token embedding whose rows (the vocabulary) are split over the tp
/// ranks (Megatron-LM's VocabParallelEmbedding; Shoeybi et al. 2019, sec. 3).

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/tensor/sharding.hpp"

namespace tessera {

/// Options of VocabParallelEmbedding. Compile-time: they decide the output layout.
struct VocabParallelEmbeddingOptions {
  /// Reduce-scatter the embeddings along T into the sequence-parallel region (Shard<1>)
  /// instead of all-reducing them (Replicate): Megatron's reduce_scatter_embeddings.
  bool sequence_parallel = false;
};

/// A lookup table split by rows: with tp ranks, the vocabulary of `vocab_size` ids is padded to
/// the next multiple of tp, V_pad, and rank r holds rows [r V_pad / tp, (r + 1) V_pad / tp).
/// Each rank looks up the ids in its range (others give zero rows); the sum over ranks is the
/// serial lookup. Padding rows are zero and no id reaches them; tied to a vocab-parallel LM
/// head, their logits are masked by VocabParallelCrossEntropy, so they never get a gradient.
///
/// Parameter "<prefix>.weight" [V_pad / tp, d], layout Shard(0) of the padded [V_pad, d]
/// table (the serial table is its first vocab_size rows), with extent vocab_size when there is
/// padding (checkpoints save and load the [vocab_size, d] table; see layout_for).
///
/// ids: any shape of rank <= 2, int32, the same on every tp rank -> (ids..., d), Replicate (or
/// (B, T / tp, d), Shard<1>, with sequence_parallel). Collective over `tp` in forward (and in
/// backward under sequence parallelism): every rank calls it with the same ids.
template <std::floating_point T, VocabParallelEmbeddingOptions Options = VocabParallelEmbeddingOptions{}>
class VocabParallelEmbedding {
 public:
  using Input = Tensor<std::int32_t>;  ///< ids
  /// Shard<1> with sequence_parallel, else Replicate.
  using OutputLayout = std::conditional_t<Options.sequence_parallel, Shard<1>, Replicate>;
  using Output = Activation<Tensor<T>, OutputLayout>;    ///< the embeddings
  using PartialOutput = Activation<Tensor<T>, Partial>;  ///< this rank's rows, zeros elsewhere
  /// What backward needs: the ids.
  struct Context {
    Tensor<std::int32_t> ids;  ///< contiguous
  };

  /// V_pad: `vocab_size` rounded up to a multiple of `tp_size`.
  static constexpr std::int64_t padded_vocab_size(std::int64_t vocab_size, int tp_size) noexcept {
    return (vocab_size + tp_size - 1) / tp_size * tp_size;
  }

  /// The weight's layout: Shard(0), with the unpadded extent vocab_size when tp does not divide
  /// it (ParamLayout::padded_shard), so checkpoints hold the [vocab_size, d] table.
  static constexpr ParamLayout layout_for(std::int64_t vocab_size, int tp_size) noexcept {
    return padded_vocab_size(vocab_size, tp_size) == vocab_size ? ParamLayout::shard(0)
                                                                : ParamLayout::padded_shard(0, vocab_size);
  }

  /// This rank's rows of a new table normal(0, init.std) from the stream "<prefix>.weight":
  /// exactly the rows of nn::Embedding(vocab_size, dim, init), whatever tp is. Throws
  /// tessera::Error unless both sizes are positive.
  VocabParallelEmbedding(std::int64_t vocab_size, std::int64_t dim, Comm tp, const nn::LayerInit& init = {})
      : tp_(std::move(tp)),
        vocab_size_(vocab_size),
        tp_rank_(tp_.rank()),
        weight_(init.join("weight"), make_table(vocab_size, dim, tp_.size())) {
    weight_.layout = layout_for(vocab_size_, tp_.size());
    const std::int64_t rows = vocab_end() - vocab_start();
    if (rows > 0)
      fill_normal(weight_.value.slice(0, 0, rows), init.seed, weight_.name, init.std, Shape{vocab_size, dim},
                  Index{vocab_start(), 0});
  }
  /// This rank's rows of the full table `full` (copied; padding rows zero).
  VocabParallelEmbedding(nn::Embedding<T>& full, Comm tp)
      : tp_(std::move(tp)),
        vocab_size_(full.num_embeddings()),
        tp_rank_(tp_.rank()),
        weight_(full.weight().name, make_table(full.num_embeddings(), full.dim(), tp_.size())) {
    weight_.layout = layout_for(vocab_size_, tp_.size());
    const std::int64_t rows = vocab_end() - vocab_start();
    if (rows > 0) weight_.value.slice(0, 0, rows).copy_from(full.weight().value.slice(0, vocab_start(), vocab_end()));
  }

  /// This rank's addend of the lookup: the rows of ids in its range, zero rows elsewhere; no
  /// communication. Throws tessera::Error naming the id and vocab_size when an id is outside
  /// [0, vocab_size), and when ids have rank 3 or more.
  ForwardResult<PartialOutput, Context> forward_partial(const Tensor<std::int32_t>& ids) const {
    TESSERA_EXPECTS(ids.rank() <= 2, "VocabParallelEmbedding ", weight_.name, ": ids of shape ", ids.shape(),
                    " have rank ", ids.rank(), "; at most 2 is supported");
    const Tensor<std::int32_t> ic = ids.contiguous();
    const std::int64_t n = ic.numel(), d = dim(), start = vocab_start(), rows = weight_.value.size(0);
    Index dims = ids.shape().dims();
    dims[static_cast<std::size_t>(ids.rank())] = d;
    Tensor<T> y = Tensor<T>::empty(Shape::from(dims, ids.rank() + 1));
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t id = ic.data()[i];
      TESSERA_EXPECTS(id >= 0 && id < vocab_size_, "VocabParallelEmbedding ", weight_.name, ": id ", id,
                      " at flat position ", i, " is outside the vocabulary of size ", vocab_size_);
      T* out = y.data() + i * d;
      if (id >= start && id < start + rows) std::copy_n(weight_.value.data() + (id - start) * d, d, out);
      else std::fill(out, out + d, T{0});
    }
    return {PartialOutput{std::move(y), {}}, Context{ic}};
  }

  /// Adds the rows of the full output gradient `dy` (ids..., d) (the same on every rank) into
  /// the gradient rows of the ids in this rank's range.
  NoGrad backward_partial(const Tensor<T>& dy, const Context& ctx) {
    const std::int64_t n = ctx.ids.numel(), d = dim(), start = vocab_start(), rows = weight_.value.size(0);
    TESSERA_EXPECTS(dy.numel() == n * d && dy.size(-1) == d, "VocabParallelEmbedding ", weight_.name,
                    ": output gradient of shape ", dy.shape(), " does not match ids of shape ", ctx.ids.shape());
    const Tensor<T> g = dy.contiguous();
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t id = ctx.ids.data()[i];
      if (id < start || id >= start + rows) continue;
      T* row = weight_.grad.data() + (id - start) * d;
      const T* src = g.data() + i * d;
      for (std::int64_t j = 0; j < d; ++j) row[j] += src[j];
    }
    return {};
  }

  /// The embeddings: the addends summed over the ranks (all-reduce), or reduce-scattered along
  /// T with sequence_parallel (ids then (B, T) with tp dividing T). Collective over tp.
  ForwardResult<Output, Context> forward(const Tensor<std::int32_t>& ids) {
    auto [p, ctx] = forward_partial(ids);
    if constexpr (Options.sequence_parallel) {
      TESSERA_EXPECTS(ids.rank() == 2, "VocabParallelEmbedding: sequence parallelism needs ids (B, T); got ",
                      ids.shape());
      return {Output{detail::tp::reduce_scatter_dim(tp_, p.value, 1)}, std::move(ctx)};
    } else {
      detail::tp::all_reduce_sum(tp_, p.value);
      return {Output{std::move(p.value)}, std::move(ctx)};
    }
  }

  /// Accumulates the gradient rows of this rank's ids (all-gathering dy along T first under
  /// sequence parallelism: collective over tp then).
  NoGrad backward(const Output& dy, const Context& ctx) {
    if constexpr (Options.sequence_parallel) return backward_partial(detail::tp::all_gather_dim(tp_, dy.value, 1), ctx);
    else return backward_partial(dy.value, ctx);
  }

  /// The weight shard.
  ParameterList<T> parameters() { return {&weight_}; }
  /// The weight shard [V_pad / tp, d], layout Shard(0).
  Parameter<T>& weight() noexcept { return weight_; }
  /// The real vocabulary size (without padding).
  std::int64_t vocab_size() const noexcept { return vocab_size_; }
  /// First id of this rank's range.
  std::int64_t vocab_start() const noexcept { return tp_rank_ * weight_.value.size(0); }
  /// One past the last real id of this rank's range (<= vocab_start() + rows; padding after).
  std::int64_t vocab_end() const noexcept { return std::min(vocab_start() + weight_.value.size(0), vocab_size_); }
  /// Width of a row.
  std::int64_t dim() const noexcept { return weight_.value.size(1); }
  /// The tp communicator.
  Comm& comm() noexcept { return tp_; }

 private:
  static Tensor<T> make_table(std::int64_t vocab_size, std::int64_t dim, int tp_size) {
    TESSERA_EXPECTS(vocab_size > 0 && dim > 0, "VocabParallelEmbedding: sizes vocab_size=", vocab_size, " dim=", dim,
                    " must be positive");
    return Tensor<T>(Shape{padded_vocab_size(vocab_size, tp_size) / tp_size, dim});
  }

  Comm tp_;
  std::int64_t vocab_size_;
  std::int64_t tp_rank_;
  Parameter<T> weight_;
};

}  // namespace tessera
