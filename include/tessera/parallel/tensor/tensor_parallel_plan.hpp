#pragma once
/// @file
/// The tensor-parallel plan of a block: which members are column-sharded, row-sharded, split by
/// heads or replicated, in the order the block's forward runs them, with residual branches and
/// nested blocks. TensorParallel reads it at compile time and inserts the collectives it
/// implies. Plans of the reference GPT-2 layers (nn::SelfAttention, nn::MLP, nn::Block).
///
/// ```cpp
/// struct FeedForward {                       // a user's block: y = x + down(gelu(up(ln(x))))
///   nn::LayerNorm<float> ln; nn::Linear<float> up; nn::GELU<float> act; nn::Linear<float> down;
///   static constexpr auto tp_plan = tessera::tp::plan(
///       tessera::tp::residual(tessera::tp::replicate(&FeedForward::ln),
///                             tessera::tp::column(&FeedForward::up),
///                             tessera::tp::elementwise(&FeedForward::act),
///                             tessera::tp::row(&FeedForward::down)));
///   ...  // Input, forward, backward, parameters: the serial layer
/// };
/// tessera::TensorParallel<FeedForward> ff(FeedForward{...}, mesh.tp());
/// ```

#include <concepts>
#include <tuple>
#include <type_traits>

#include "tessera/nn/block.hpp"
#include "tessera/nn/mlp.hpp"
#include "tessera/nn/self_attention.hpp"

namespace tessera {

/// The plan DSL (see the file comment). Each step names a member of the block by a pointer to
/// a data member or to an accessor returning a reference (`&Block::ln_1`); a member may appear
/// in one step only.
namespace tp {

/// Options of a column-parallel step (sequence parallelism follows the block's layout).
struct ColumnOptions {
  bool gather_output = false;  ///< all-gather the output (Replicate) instead of keeping Shard<-1>
  int blocks = 1;              ///< equal parts of the output dim, each split over tp (3: fused q, k, v)
};
/// Options of a row-parallel step.
struct RowOptions {
  bool input_is_parallel = true;  ///< the input is Shard<-1>; false: a Replicate input is scattered first
};

/// Step: the member is a ColumnParallel layer (Replicate or Shard<1> -> Shard<-1>).
template <class Get, ColumnOptions Options>
struct ColumnStep {
  Get get;  ///< the member
};
/// Step: the member is a RowParallel layer (Shard<-1> -> Partial, bias pending).
template <class Get, RowOptions Options>
struct RowStep {
  Get get;  ///< the member
};
/// Step: the member runs unchanged on every rank and needs the whole last dim (LayerNorm):
/// Replicate or Shard<1> in, the same out. Under sequence parallelism its parameters'
/// gradients are summed over tp.
template <class Get>
struct ReplicateStep {
  Get get;  ///< the member
};
/// Step: the member is element-wise (GELU, Dropout): any layout but Partial, unchanged. A
/// member with `forward(x, ShardInfo)` learns the region it runs in.
template <class Get>
struct ElementwiseStep {
  Get get;  ///< the member
};
/// Step: the member works on independent heads of the last dim (nn::CoreAttention): Shard<-1>
/// in and out; each rank runs TensorParallelShard<L>::heads of it.
template <class Get>
struct HeadsStep {
  Get get;  ///< the member
};
/// Step: the member is a block with its own plan, run as TensorParallel<Member, layout>
/// (Replicate or Shard<1> in and out).
template <class Get>
struct NestedStep {
  Get get;  ///< the member
};
/// Step: y = x + steps(x); the branch's output is turned back into x's layout (all-reduce or
/// reduce-scatter of a pending sum) before the addition.
template <class... Steps>
struct ResidualStep {
  std::tuple<Steps...> steps;  ///< the branch
};
/// Step: sums a pending partial sum: all-reduce ("g") into Replicate, or reduce-scatter into
/// Shard<1> under sequence parallelism.
struct ReduceStep {};
/// Step: all-gathers a Shard<-1> activation into Replicate.
struct GatherStep {};
/// Step: keeps this rank's slice of the last dim of a Replicate activation (Shard<-1>).
struct ScatterStep {};
/// A block's plan: its steps in forward order.
template <class... Steps>
struct Plan {
  std::tuple<Steps...> steps;  ///< the steps
};

/// A pointer to a data member or to an accessor returning a reference to a member.
template <class G>
concept MemberPointer = std::is_member_pointer_v<G>;

/// Column-parallel step over the member `get`; options as template argument:
/// `tp::column<tp::ColumnOptions{.blocks = 3}>(&Attn::c_attn)`.
template <ColumnOptions Options = ColumnOptions{}, MemberPointer Get>
constexpr ColumnStep<Get, Options> column(Get get) noexcept {
  return {get};
}
/// Row-parallel step over the member `get`: `tp::row(&Mlp::c_proj)`.
template <RowOptions Options = RowOptions{}, MemberPointer Get>
constexpr RowStep<Get, Options> row(Get get) noexcept {
  return {get};
}
/// Replicated step (see ReplicateStep).
template <MemberPointer Get>
constexpr ReplicateStep<Get> replicate(Get get) noexcept {
  return {get};
}
/// Element-wise step (see ElementwiseStep).
template <MemberPointer Get>
constexpr ElementwiseStep<Get> elementwise(Get get) noexcept {
  return {get};
}
/// Per-head step (see HeadsStep).
template <MemberPointer Get>
constexpr HeadsStep<Get> heads(Get get) noexcept {
  return {get};
}
/// Nested block step (see NestedStep).
template <MemberPointer Get>
constexpr NestedStep<Get> nested(Get get) noexcept {
  return {get};
}
/// Residual branch (see ResidualStep).
template <class... Steps>
constexpr ResidualStep<Steps...> residual(Steps... steps) noexcept {
  return {{steps...}};
}
/// Reduction of a pending partial sum (see ReduceStep).
constexpr ReduceStep reduce() noexcept { return {}; }
/// All-gather of a Shard<-1> activation (see GatherStep).
constexpr GatherStep gather() noexcept { return {}; }
/// Scatter of a Replicate activation (see ScatterStep).
constexpr ScatterStep scatter() noexcept { return {}; }
/// The plan of a block: its steps in forward order.
template <class... Steps>
constexpr Plan<Steps...> plan(Steps... steps) noexcept {
  return {{steps...}};
}

}  // namespace tp

/// The plan of a block type that cannot declare `static constexpr auto tp_plan` itself (a
/// library's type): specialize with `static constexpr auto value = tp::plan(...);`.
template <class Block>
struct TensorParallelPlan {};

/// GPT-2 attention: c_attn column-parallel with each rank holding its heads' q, k and v
/// columns, the core attention on those heads, c_proj row-parallel (Megatron-LM's
/// ParallelAttention): one all-reduce forward, one backward.
template <std::floating_point T>
struct TensorParallelPlan<nn::SelfAttention<T>> {
  /// c_attn (column, blocks 3), core (heads), c_proj (row).
  static constexpr auto value = tp::plan(tp::column<tp::ColumnOptions{.blocks = 3}>(&nn::SelfAttention<T>::c_attn),
                                         tp::heads(&nn::SelfAttention<T>::core), tp::row(&nn::SelfAttention<T>::c_proj));
};

/// GPT-2 MLP: c_fc column-parallel, GELU on the hidden shard, c_proj row-parallel (Megatron-LM's
/// ParallelMLP): one all-reduce forward, one backward.
template <std::floating_point T>
struct TensorParallelPlan<nn::MLP<T>> {
  /// c_fc (column), act (element-wise), c_proj (row).
  static constexpr auto value = tp::plan(tp::column(&nn::MLP<T>::c_fc), tp::elementwise(&nn::MLP<T>::act),
                                         tp::row(&nn::MLP<T>::c_proj));
};

/// GPT-2 block: x + attn(ln_1(x)), then + mlp(ln_2(.)), with the LayerNorms replicated and attn
/// and mlp tensor-parallel by their own plans.
template <std::floating_point T>
struct TensorParallelPlan<nn::Block<T>> {
  /// Two residual branches.
  static constexpr auto value =
      tp::plan(tp::residual(tp::replicate(&nn::Block<T>::ln_1), tp::nested(&nn::Block<T>::attn)),
               tp::residual(tp::replicate(&nn::Block<T>::ln_2), tp::nested(&nn::Block<T>::mlp)));
};

}  // namespace tessera
