#pragma once
/// @file
/// ColumnParallel: a layer whose weight is split along its output dim over the tp ranks
/// (Megatron-LM's ColumnParallelLinear; Shoeybi et al. 2019, "Megatron-LM", sec. 3).

#include <concepts>
#include <type_traits>
#include <utility>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/tensor/detail/layout_errors.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/tensor/sharding.hpp"
#include "tessera/parallel/tensor/tensor_parallel_shard.hpp"

namespace tessera {

/// Options of ColumnParallel, as Megatron-LM's ColumnParallelLinear. Compile-time: they decide
/// the layouts, and so the collectives.
struct ColumnParallelOptions {
  /// All-gather the output along its last dim (output Replicate); off: each rank keeps its
  /// columns (output Shard<-1>), the input of a row-parallel layer.
  bool gather_output = false;
  /// The input is sequence-sharded (Shard<1>) and is all-gathered along T in forward, its
  /// gradient reduce-scattered in backward (Korthikanti et al. 2022, "Reducing activation
  /// recomputation in large transformer models"); off: the input is replicated and its
  /// gradient all-reduced ("f").
  bool sequence_parallel = false;
  /// The output dim is `blocks` equal parts each split over the ranks (3 for a fused q, k, v
  /// projection: each rank holds its heads' q, k and v columns; Megatron's `stride`).
  int blocks = 1;
};

/// y_r = x A_r: rank r holds the columns A_r of the weight (and of the bias). Input: the full x,
/// replicated (or sequence-sharded with Options.sequence_parallel); output: this rank's
/// columns, Shard<-1> (or the full y, Replicate, with Options.gather_output).
///
/// Collectives (over `tp`, every rank calls forward and backward with the same shapes):
/// forward all-gathers the input along T under sequence parallelism and the output with
/// gather_output; backward all-reduces the input gradient ("f"), or reduce-scatters it along T
/// under sequence parallelism.
///
/// `L` is a Layer on Tensor<T> for which TensorParallelShard<L>::column exists (nn::Linear),
/// or any Layer built by the caller as a shard (from_shard, e.g. a tied LM head over a vocab
/// shard). Feeding it another layout fails to compile with one sentence.
template <class L, ColumnParallelOptions Options = ColumnParallelOptions{}>
class ColumnParallel {
  static_assert(check_layer<L>());
  using T = typename LayerTraits<L>::Scalar;
  static_assert(std::same_as<typename LayerTraits<L>::Input, Tensor<T>> &&
                    std::same_as<typename LayerTraits<L>::Output, Tensor<T>>,
                "tessera: ColumnParallel wraps a layer whose forward takes and returns tessera::Tensor<T>.");

 public:
  /// Shard<1> with sequence parallelism, else Replicate.
  using InputLayout = std::conditional_t<Options.sequence_parallel, Shard<1>, Replicate>;
  /// Replicate with gather_output, else Shard<-1>.
  using OutputLayout = std::conditional_t<Options.gather_output, Replicate, Shard<-1>>;
  using Input = Activation<Tensor<T>, InputLayout>;    ///< x: (..., in), (B, T / tp, in) under SP
  using Output = Activation<Tensor<T>, OutputLayout>;  ///< y: (..., out / tp), or (..., out)
  /// What backward needs: the shard's context.
  struct Context {
    typename LayerTraits<L>::Context layer;  ///< the local layer's
  };

  /// This rank's shard of the full layer `full` (its columns; the full layer is left as is).
  /// Throws tessera::Error naming the numbers when blocks x tp does not divide the output dim.
  ColumnParallel(L& full, Comm tp)
      : tp_(std::move(tp)), layer_(TensorParallelShard<L>::column(full, Options.blocks, tp_.rank(), tp_.size())) {}

  /// A layer around an existing shard (already holding this rank's columns).
  static ColumnParallel from_shard(L shard, Comm tp) { return ColumnParallel(std::move(shard), std::move(tp), 0); }

  /// This rank's columns of x A (+ b), or all of them with gather_output. Collective over tp
  /// under sequence parallelism or with gather_output.
  template <Layout In>
  ForwardResult<Output, Context> forward(const Activation<Tensor<T>, In>& x) {
    constexpr detail::tp::LayoutError error = detail::tp::column_input_error<In, Options.sequence_parallel>();
    if constexpr (error != detail::tp::LayoutError::none) {
      static_assert(detail::tp::check_layout_error<error>());
      (void)x;
      return {};
    } else {
      Tensor<T> in = x.value;
      if constexpr (Options.sequence_parallel) in = detail::tp::all_gather_dim(tp_, x.value, 1);
      auto r = layer_.forward(in);
      Tensor<T> y = std::move(r.output);
      if constexpr (Options.gather_output) y = detail::tp::all_gather_dim(tp_, y, -1, Options.blocks);
      return {Output{std::move(y)}, Context{std::move(r.ctx)}};
    }
  }

  /// The input gradient, summed over the ranks (all-reduce, or reduce-scatter along T under
  /// sequence parallelism); accumulates the shard's parameter gradients. Collective over tp.
  Input backward(const Output& dy, Context& ctx) {
    Tensor<T> g = dy.value;
    if constexpr (Options.gather_output) g = detail::tp::split_dim(g, -1, Options.blocks, tp_.rank(), tp_.size());
    Tensor<T> dx = layer_.backward(g, ctx.layer);
    if constexpr (Options.sequence_parallel) {
      return {detail::tp::reduce_scatter_dim(tp_, dx, 1)};
    } else {
      if (!dx.is_contiguous() || dx.shares_storage_with(g)) dx = dx.clone();
      detail::tp::all_reduce_sum(tp_, dx);
      return {std::move(dx)};
    }
  }

  /// The shard's parameters (names as in the full layer, layouts Shard).
  ParameterList<T> parameters() { return layer_.parameters(); }
  /// The local shard.
  L& layer() noexcept { return layer_; }
  /// The tp communicator.
  Comm& comm() noexcept { return tp_; }

 private:
  ColumnParallel(L shard, Comm tp, int) : tp_(std::move(tp)), layer_(std::move(shard)) {}

  Comm tp_;
  L layer_;
};

}  // namespace tessera
