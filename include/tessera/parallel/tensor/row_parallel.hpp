#pragma once
/// @file
/// RowParallel: a layer whose weight is split along its input dim over the tp ranks, its bias
/// added once after the reduction (Megatron-LM's RowParallelLinear; Shoeybi et al. 2019,
/// "Megatron-LM", sec. 3).

#include <concepts>
#include <optional>
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

/// Options of RowParallel, as Megatron-LM's RowParallelLinear. Compile-time: they decide the
/// layouts, and so the collectives.
struct RowParallelOptions {
  /// The input is already split over its last dim (Shard<-1>, from a column-parallel layer);
  /// off: the input is replicated and each rank keeps its slice first (scatter).
  bool input_is_parallel = true;
  /// The output is reduce-scattered along T (Shard<1>) instead of all-reduced (Replicate);
  /// requires input_is_parallel, as in Megatron-LM.
  bool sequence_parallel = false;
};

/// y = sum_r x_r A_r + b: rank r holds the rows A_r of the weight and multiplies its slice x_r
/// of the input; the partial products are summed over the ranks, then the (replicated) bias is
/// added once. Input: Shard<-1> (or Replicate without input_is_parallel); output: Replicate (or
/// Shard<1> with sequence_parallel).
///
/// Collectives (over `tp`, every rank calls forward and backward with the same shapes):
/// forward all-reduces the partial products ("g"), or reduce-scatters them along T under
/// sequence parallelism; backward all-gathers the output gradient along T under sequence
/// parallelism, and the input gradient along the last dim without input_is_parallel.
///
/// forward_partial / backward_partial stop before the reduction and return the pending sum as
/// a Partial activation (carrying the bias), for a policy that places the reduction itself.
/// Feeding it another layout fails to compile with one sentence.
template <class L, RowParallelOptions Options = RowParallelOptions{}>
class RowParallel {
  static_assert(check_layer<L>());
  using T = typename LayerTraits<L>::Scalar;
  static_assert(std::same_as<typename LayerTraits<L>::Input, Tensor<T>> &&
                    std::same_as<typename LayerTraits<L>::Output, Tensor<T>>,
                "tessera: RowParallel wraps a layer whose forward takes and returns tessera::Tensor<T>.");
  static_assert(Options.input_is_parallel || !Options.sequence_parallel,
                "tessera: a row-parallel layer under sequence parallelism needs input_is_parallel, as in "
                "Megatron-LM.");

 public:
  /// Shard<-1> with input_is_parallel, else Replicate.
  using InputLayout = std::conditional_t<Options.input_is_parallel, Shard<-1>, Replicate>;
  /// Shard<1> with sequence_parallel, else Replicate.
  using OutputLayout = std::conditional_t<Options.sequence_parallel, Shard<1>, Replicate>;
  using Input = Activation<Tensor<T>, InputLayout>;    ///< x: (..., in / tp), or (..., in)
  using Output = Activation<Tensor<T>, OutputLayout>;  ///< y: (..., out), (B, T / tp, out) under SP
  using PartialOutput = Activation<Tensor<T>, Partial>;  ///< this rank's x_r A_r, with the bias
  /// What backward needs: the shard's context.
  struct Context {
    typename LayerTraits<L>::Context layer;  ///< the local layer's
  };

  /// This rank's rows of the full layer `full` (the full layer is left as is), its bias
  /// replicated. Throws tessera::Error naming the numbers when tp does not divide the input dim.
  RowParallel(L& full, Comm tp) : RowParallel(TensorParallelShard<L>::row(full, tp.rank(), tp.size()), tp) {}
  /// Around an existing row shard (weight rows, no bias) and the replicated bias.
  RowParallel(RowShard<L, T> shard, Comm tp)
      : tp_(std::move(tp)), layer_(std::move(shard.layer)), bias_(std::move(shard.bias)) {}

  /// The pending sum x_r A_r with the bias to add after the reduction: no communication except
  /// the scatter of a replicated input. Feeding another layout fails to compile with one
  /// sentence.
  template <Layout In>
  ForwardResult<PartialOutput, Context> forward_partial(const Activation<Tensor<T>, In>& x) {
    constexpr detail::tp::LayoutError error = detail::tp::row_input_error<In, Options.input_is_parallel>();
    if constexpr (error != detail::tp::LayoutError::none) {
      static_assert(detail::tp::check_layout_error<error>());
      (void)x;
      return {};
    } else {
      Tensor<T> in = x.value;
      if constexpr (!Options.input_is_parallel)
        in = detail::tp::split_dim(x.value, -1, 1, tp_.rank(), tp_.size(), "RowParallel scatter");
      auto r = layer_.forward(in);
      return {PartialOutput{std::move(r.output), bias_ ? bias_->value : Tensor<T>{}}, Context{std::move(r.ctx)}};
    }
  }

  /// From the gradient of the reduced output (the same full tensor on every rank): accumulates
  /// the weight rows' and the bias's gradients and returns this rank's input gradient
  /// (all-gathered along the last dim without input_is_parallel: collective over tp then).
  Input backward_partial(const Tensor<T>& dy, Context& ctx) {
    if (bias_) detail::tp::add_column_sums(bias_->grad, dy);
    Tensor<T> dx = layer_.backward(dy, ctx.layer);
    if constexpr (!Options.input_is_parallel) dx = detail::tp::all_gather_dim(tp_, dx, -1);
    return {std::move(dx)};
  }

  /// sum_r x_r A_r + b: the partial products all-reduced (or reduce-scattered along T under
  /// sequence parallelism), then the bias added. Collective over tp.
  template <Layout In>
  ForwardResult<Output, Context> forward(const Activation<Tensor<T>, In>& x) {
    auto [p, ctx] = forward_partial(x);
    Tensor<T> y = p.value.contiguous();
    if constexpr (Options.sequence_parallel) {
      y = detail::tp::reduce_scatter_dim(tp_, y, 1);
    } else {
      detail::tp::all_reduce_sum(tp_, y);
    }
    detail::tp::add_bias_rows(y, p.bias);
    return {Output{std::move(y)}, std::move(ctx)};
  }

  /// The input gradient from the output's (all-gathered along T first under sequence
  /// parallelism); accumulates the parameter gradients. Collective over tp under sequence
  /// parallelism or without input_is_parallel.
  Input backward(const Output& dy, Context& ctx) {
    if constexpr (Options.sequence_parallel) return backward_partial(detail::tp::all_gather_dim(tp_, dy.value, 1), ctx);
    else return backward_partial(dy.value, ctx);
  }

  /// The weight rows (Shard(0)), then the bias (Replicate) if any.
  ParameterList<T> parameters() {
    ParameterList<T> ps = layer_.parameters();
    if (bias_) ps.push_back(*bias_);
    return ps;
  }
  /// The local shard (weight rows, no bias).
  L& layer() noexcept { return layer_; }
  /// The replicated bias, or null.
  Parameter<T>* bias() noexcept { return bias_ ? &*bias_ : nullptr; }
  /// The tp communicator.
  Comm& comm() noexcept { return tp_; }

 private:
  Comm tp_;
  L layer_;
  std::optional<Parameter<T>> bias_;
};

}  // namespace tessera
