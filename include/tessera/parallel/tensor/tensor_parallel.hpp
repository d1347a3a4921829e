#pragma once
/// @file
/// TensorParallel<Block, Layout>: runs a block over the tp ranks by its plan
/// (tensor_parallel_plan.hpp). Every parameter is sharded or replicated as the plan says, and
/// the collectives the plan implies are chosen at compile time from the layouts the
/// activations have between the steps (Megatron-LM, Shoeybi et al. 2019; sequence parallelism:
/// Korthikanti et al. 2022).

#include <concepts>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/tensor/column_parallel.hpp"
#include "tessera/parallel/tensor/detail/layout_errors.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/tensor/row_parallel.hpp"
#include "tessera/parallel/tensor/sharding.hpp"
#include "tessera/parallel/tensor/tensor_parallel_plan.hpp"
#include "tessera/parallel/tensor/tensor_parallel_shard.hpp"

namespace tessera {

/// Run-time options of TensorParallel.
struct TensorParallelOptions {
  /// Under sequence parallelism, end backward with one all-reduce (sum over tp) of the
  /// gradients of the replicated parameters that saw only this rank's positions (LayerNorms),
  /// so they stay equal on every rank (Megatron-LM's finalize_model_grads does it for the
  /// whole model). Off when an enclosing model does it once for all its blocks.
  bool all_reduce_sequence_parallel_grads = true;
};

template <class Block, class BlockLayout = Replicate>
class TensorParallel;

/// The layout a block's output leaves TensorParallel with: the block's own layout, unless the
/// block declares `using tp_output = tessera::Shard<-1>;` -- its plan ends with a
/// column-parallel layer whose output stays split over the last dim (an LM head whose logits
/// go to VocabParallelCrossEntropy, Megatron-LM's `gather_output=False` output layer).
template <class Block, class BlockLayout>
struct TensorParallelOutputLayout {
  using type = BlockLayout;  ///< the block's own layout
};
/// A block that declares `tp_output`.
template <class Block, class BlockLayout>
  requires requires { typename Block::tp_output; }
struct TensorParallelOutputLayout<Block, BlockLayout> {
  using type = typename Block::tp_output;  ///< what the block declares
};

namespace detail::tp {

using tessera::tp::ColumnStep;
using tessera::tp::ElementwiseStep;
using tessera::tp::GatherStep;
using tessera::tp::HeadsStep;
using tessera::tp::NestedStep;
using tessera::tp::ReduceStep;
using tessera::tp::ReplicateStep;
using tessera::tp::ResidualStep;
using tessera::tp::RowStep;
using tessera::tp::ScatterStep;

/// The member a step names.
template <class Get, class B>
using member_t = std::remove_cvref_t<std::invoke_result_t<Get, B&>>;

template <class L>
inline constexpr bool is_block_layout_v = std::same_as<L, Replicate> || std::same_as<L, Shard<1>>;

template <class B>
concept has_member_plan = requires { B::tp_plan.steps; };
template <class B>
concept has_trait_plan = requires { TensorParallelPlan<B>::value.steps; };

inline constexpr tessera::tp::Plan<> empty_plan{};

/// The block's plan: its `tp_plan` member, else TensorParallelPlan<B>::value, else none.
template <class B>
constexpr const auto& plan_of() noexcept {
  if constexpr (has_member_plan<B>) return B::tp_plan;
  else if constexpr (has_trait_plan<B>) return TensorParallelPlan<B>::value;
  else return empty_plan;
}

template <class B>
using plan_steps_t = std::remove_cvref_t<decltype(plan_of<B>().steps)>;

template <class>
inline constexpr bool always_false_type = false;

/// Fails with one sentence unless B has a plan.
template <class B>
consteval bool check_has_plan() {
  if constexpr (!has_member_plan<B> && !has_trait_plan<B>)
    static_assert(always_false_type<B>,
                  "tessera: the block type declares no tensor-parallel plan; give it `static constexpr auto "
                  "tp_plan = tessera::tp::plan(...);` or specialize tessera::TensorParallelPlan<Block>.");
  return true;
}

template <class T, Layout L>
using Act = Activation<Tensor<T>, L>;

// ---- conversions between layouts -----------------------------------------------------------

/// The collective(s) that turn layout `From` into `To` at the end of a branch or by an explicit
/// reduce/gather/scatter step; `error` is cannot_end when none does.
template <class T, class From, class To>
struct Conversion {
  static constexpr LayoutError error = LayoutError::cannot_end;
};
template <class T, class L>
struct Conversion<T, L, L> {
  static constexpr LayoutError error = LayoutError::none;
  static Act<T, L> forward(Comm&, const Act<T, L>& x) { return x; }
  static Tensor<T> backward(Comm&, const Tensor<T>& dy) { return dy; }
};
/// g: all-reduce, then the pending bias.
template <class T>
struct Conversion<T, Partial, Replicate> {
  static constexpr LayoutError error = LayoutError::none;
  static Act<T, Replicate> forward(Comm& tp, const Act<T, Partial>& x) {
    Tensor<T> y = x.value.contiguous();
    all_reduce_sum(tp, y);
    add_bias_rows(y, x.bias);
    return {std::move(y)};
  }
  static Tensor<T> backward(Comm&, const Tensor<T>& dy) { return dy; }
};
/// Reduce-scatter along T, then the pending bias.
template <class T>
struct Conversion<T, Partial, Shard<1>> {
  static constexpr LayoutError error = LayoutError::none;
  static Act<T, Shard<1>> forward(Comm& tp, const Act<T, Partial>& x) {
    expect_sequence_rank(x.value.shape(), "TensorParallel (sequence parallel)");
    Tensor<T> y = reduce_scatter_dim(tp, x.value, 1);
    add_bias_rows(y, x.bias);
    return {std::move(y)};
  }
  static Tensor<T> backward(Comm& tp, const Tensor<T>& dy) { return all_gather_dim(tp, dy, 1); }
};
/// All-gather of the last dim.
template <class T>
struct Conversion<T, Shard<-1>, Replicate> {
  static constexpr LayoutError error = LayoutError::none;
  static Act<T, Replicate> forward(Comm& tp, const Act<T, Shard<-1>>& x) { return {all_gather_dim(tp, x.value, -1)}; }
  static Tensor<T> backward(Comm& tp, const Tensor<T>& dy) { return split_dim(dy, -1, 1, tp.rank(), tp.size()); }
};
/// This rank's slice of the last dim.
template <class T>
struct Conversion<T, Replicate, Shard<-1>> {
  static constexpr LayoutError error = LayoutError::none;
  static Act<T, Shard<-1>> forward(Comm& tp, const Act<T, Replicate>& x) {
    return {split_dim(x.value, -1, 1, tp.rank(), tp.size(), "TensorParallel scatter")};
  }
  static Tensor<T> backward(Comm& tp, const Tensor<T>& dy) { return all_gather_dim(tp, dy, -1); }
};
/// This rank's positions.
template <class T>
struct Conversion<T, Replicate, Shard<1>> {
  static constexpr LayoutError error = LayoutError::none;
  static Act<T, Shard<1>> forward(Comm& tp, const Act<T, Replicate>& x) {
    expect_sequence_rank(x.value.shape(), "TensorParallel (sequence parallel)");
    return {split_dim(x.value, 1, 1, tp.rank(), tp.size(), "TensorParallel sequence scatter")};
  }
  static Tensor<T> backward(Comm& tp, const Tensor<T>& dy) { return all_gather_dim(tp, dy, 1); }
};
/// All-gather of the last dim, then this rank's positions.
template <class T>
struct Conversion<T, Shard<-1>, Shard<1>> {
  static constexpr LayoutError error = LayoutError::none;
  static Act<T, Shard<1>> forward(Comm& tp, const Act<T, Shard<-1>>& x) {
    return Conversion<T, Replicate, Shard<1>>::forward(tp, Conversion<T, Shard<-1>, Replicate>::forward(tp, x));
  }
  static Tensor<T> backward(Comm& tp, const Tensor<T>& dy) {
    return Conversion<T, Shard<-1>, Replicate>::backward(tp, Conversion<T, Replicate, Shard<1>>::backward(tp, dy));
  }
};

/// Nothing to hold or remember.
struct Empty {};

// ---- steps ---------------------------------------------------------------------------------
// StepExec<T, B, Step, In, Region> compiles one step entered with layout In inside a block of
// layout Region: Out (its output layout), error (the first misuse, or none), Module (what it
// holds at run time), Context, make, forward, backward (gradient tensors), collect (parameters;
// and those whose gradient is a partial sum over tp under sequence parallelism).

template <class T, class B, class Step, class In, class Region>
struct StepExec;

template <class T, class B, class Region, class In, std::size_t I, class Steps, class Exit = Region,
          bool End = (I == std::tuple_size_v<Steps>)>
struct ChainExec;

template <class T, class B, class Get, tessera::tp::ColumnOptions O, class In, class Region>
struct StepExec<T, B, ColumnStep<Get, O>, In, Region> {
  static constexpr bool sp = std::same_as<In, Shard<1>>;
  static constexpr LayoutError error = column_input_error<In, sp>();
  using Out = std::conditional_t<O.gather_output, Replicate, Shard<-1>>;
  using Module = ColumnParallel<member_t<Get, B>,
                                ColumnParallelOptions{.gather_output = O.gather_output, .sequence_parallel = sp, .blocks = O.blocks}>;
  using Context = typename Module::Context;
  static Module make(B& b, const ColumnStep<Get, O>& s, Comm& tp) { return Module(std::invoke(s.get, b), tp); }
  static ForwardResult<Act<T, Out>, Context> forward(Module& m, Comm&, const Act<T, In>& x) { return m.forward(x); }
  static Tensor<T> backward(Module& m, Comm&, const Tensor<T>& dy, Context& ctx) {
    return m.backward(Act<T, Out>{dy}, ctx).value;
  }
  static void collect(Module& m, ParameterList<T>& all, ParameterList<T>&) { all.append(m.parameters()); }
};

template <class T, class B, class Get, tessera::tp::RowOptions O, class In, class Region>
struct StepExec<T, B, RowStep<Get, O>, In, Region> {
  static constexpr LayoutError error = row_input_error<In, O.input_is_parallel>();
  using Out = Partial;
  using Module = RowParallel<member_t<Get, B>, RowParallelOptions{.input_is_parallel = O.input_is_parallel}>;
  using Context = typename Module::Context;
  static Module make(B& b, const RowStep<Get, O>& s, Comm& tp) { return Module(std::invoke(s.get, b), tp); }
  static ForwardResult<Act<T, Partial>, Context> forward(Module& m, Comm&, const Act<T, In>& x) {
    return m.forward_partial(x);
  }
  static Tensor<T> backward(Module& m, Comm&, const Tensor<T>& dy, Context& ctx) {
    return m.backward_partial(dy, ctx).value;
  }
  static void collect(Module& m, ParameterList<T>& all, ParameterList<T>&) { all.append(m.parameters()); }
};

/// What a layer that runs unchanged on every rank (replicate / elementwise steps) shares.
template <class T, class B, class Get, class In>
struct LocalLayerExec {
  using Module = member_t<Get, B>;
  static_assert(check_layer<Module>());
  using Context = typename LayerTraits<Module>::Context;
  template <class Step>
  static Module make(B& b, const Step& s, Comm&) {
    Module m(std::move(std::invoke(s.get, b)));
    if constexpr (!std::same_as<In, Replicate> && !std::same_as<In, Shard<1>> && !std::same_as<In, Partial>) {
      // Replicated parameters on a tensor-parallel shard would see only this rank's units.
      const ParameterList<T> ps = m.parameters();
      TESSERA_EXPECTS(ps.empty(), "TensorParallel: the element-wise member holding parameter \"", ps[0].name,
                      "\" runs on a tensor-parallel shard (Shard<-1>), where a replicated parameter would see only "
                      "this rank's units; give it no parameters or move it out of the tensor-parallel region");
    }
    return m;
  }
  static ForwardResult<Act<T, In>, Context> forward(Module& m, Comm& tp, const Act<T, In>& x) {
    if constexpr (requires { m.forward(x.value, ShardInfo{}); }) {
      auto r = m.forward(x.value, ShardInfo{.region = region_of<In>(), .rank = tp.rank(), .size = tp.size()});
      return {Act<T, In>{std::move(r.output)}, std::move(r.ctx)};
    } else {
      auto r = m.forward(x.value);
      return {Act<T, In>{std::move(r.output)}, std::move(r.ctx)};
    }
  }
  static Tensor<T> backward(Module& m, Comm&, const Tensor<T>& dy, Context& ctx) { return m.backward(dy, ctx); }
  static void collect(Module& m, ParameterList<T>& all, ParameterList<T>& seq) {
    all.append(m.parameters());
    if constexpr (std::same_as<In, Shard<1>>) seq.append(m.parameters());
  }
};

template <class T, class B, class Get, class In, class Region>
struct StepExec<T, B, ReplicateStep<Get>, In, Region> : LocalLayerExec<T, B, Get, In> {
  static constexpr LayoutError error = std::same_as<In, Partial>                                     ? LayoutError::partial_to_nonlinear
                                       : std::same_as<In, Replicate> || std::same_as<In, Shard<1>> ? LayoutError::none
                                                                                                      : LayoutError::shard_to_replicated;
  using Out = In;
};

template <class T, class B, class Get, class In, class Region>
struct StepExec<T, B, ElementwiseStep<Get>, In, Region> : LocalLayerExec<T, B, Get, In> {
  static constexpr LayoutError error = std::same_as<In, Partial> ? LayoutError::partial_to_nonlinear : LayoutError::none;
  using Out = In;
};

template <class T, class B, class Get, class In, class Region>
struct StepExec<T, B, HeadsStep<Get>, In, Region> {
  static constexpr LayoutError error = std::same_as<In, Partial>     ? LayoutError::partial_to_nonlinear
                                       : std::same_as<In, Shard<-1>> ? LayoutError::none
                                                                     : LayoutError::heads_need_shard;
  using Out = Shard<-1>;
  using Module = member_t<Get, B>;
  static_assert(check_layer<Module>());
  using Context = typename LayerTraits<Module>::Context;
  static Module make(B& b, const HeadsStep<Get>& s, Comm& tp) {
    return TensorParallelShard<Module>::heads(std::invoke(s.get, b), tp.rank(), tp.size());
  }
  static ForwardResult<Act<T, Out>, Context> forward(Module& m, Comm&, const Act<T, In>& x) {
    auto r = m.forward(x.value);
    return {Act<T, Out>{std::move(r.output)}, std::move(r.ctx)};
  }
  static Tensor<T> backward(Module& m, Comm&, const Tensor<T>& dy, Context& ctx) { return m.backward(dy, ctx); }
  static void collect(Module& m, ParameterList<T>& all, ParameterList<T>&) { all.append(m.parameters()); }
};

template <class T, class B, class Get, class In, class Region>
struct StepExec<T, B, NestedStep<Get>, In, Region> {
  static constexpr LayoutError error = std::same_as<In, Partial> ? LayoutError::partial_to_nonlinear
                                       : is_block_layout_v<In>   ? LayoutError::none
                                                                 : LayoutError::nested_layout;
  using Out = std::conditional_t<is_block_layout_v<In>, In, Replicate>;
  using Module = TensorParallel<member_t<Get, B>, Out>;
  using Context = typename Module::Context;
  static Module make(B& b, const NestedStep<Get>& s, Comm& tp) {
    return Module(std::move(std::invoke(s.get, b)), tp, TensorParallelOptions{.all_reduce_sequence_parallel_grads = false});
  }
  static ForwardResult<Act<T, Out>, Context> forward(Module& m, Comm&, const Act<T, In>& x) { return m.forward(x); }
  static Tensor<T> backward(Module& m, Comm&, const Tensor<T>& dy, Context& ctx) {
    return m.backward(Act<T, Out>{dy}, ctx).value;
  }
  static void collect(Module& m, ParameterList<T>& all, ParameterList<T>& seq) {
    all.append(m.parameters());
    seq.append(m.sequence_parallel_parameters());
  }
};

template <class T, class B, class... S, class In, class Region>
struct StepExec<T, B, ResidualStep<S...>, In, Region> {
  using Branch = ChainExec<T, B, In, In, 0, std::tuple<S...>>;
  static constexpr LayoutError error = std::same_as<In, Partial> ? LayoutError::partial_to_nonlinear : Branch::error;
  using Out = In;
  using Module = typename Branch::Module;
  using Context = typename Branch::Context;
  static Module make(B& b, const ResidualStep<S...>& s, Comm& tp) { return Branch::make(b, s.steps, tp); }
  static ForwardResult<Act<T, Out>, Context> forward(Module& m, Comm& tp, const Act<T, In>& x) {
    auto r = Branch::forward(m, tp, x);
    return {Act<T, Out>{add_into_fresh(std::move(r.output.value), x.value)}, std::move(r.ctx)};
  }
  static Tensor<T> backward(Module& m, Comm& tp, const Tensor<T>& dy, Context& ctx) {
    return add_into_fresh(Branch::backward(m, tp, dy, ctx), dy);
  }
  static void collect(Module& m, ParameterList<T>& all, ParameterList<T>& seq) { Branch::collect(m, all, seq); }
};

/// The explicit conversion steps: Conversion<In, To> with a precondition on In.
template <class T, class In, class To, bool Ok, LayoutError E>
struct ConversionStepExec {
  static constexpr LayoutError error = !Ok ? E : Conversion<T, In, To>::error;
  using Out = To;
  using Module = Empty;
  using Context = Empty;
  template <class B, class Step>
  static Module make(B&, const Step&, Comm&) {
    return {};
  }
  static ForwardResult<Act<T, Out>, Context> forward(Module&, Comm& tp, const Act<T, In>& x) {
    return {Conversion<T, In, To>::forward(tp, x), {}};
  }
  static Tensor<T> backward(Module&, Comm& tp, const Tensor<T>& dy, Context&) {
    return Conversion<T, In, To>::backward(tp, dy);
  }
  static void collect(Module&, ParameterList<T>&, ParameterList<T>&) {}
};

template <class T, class B, class In, class Region>
struct StepExec<T, B, ReduceStep, In, Region>
    : ConversionStepExec<T, In, Region, std::same_as<In, Partial>, LayoutError::reduce_needs_partial> {};
template <class T, class B, class In, class Region>
struct StepExec<T, B, GatherStep, In, Region>
    : ConversionStepExec<T, In, Replicate, std::same_as<In, Shard<-1>>, LayoutError::gather_needs_shard> {};
template <class T, class B, class In, class Region>
struct StepExec<T, B, ScatterStep, In, Region>
    : ConversionStepExec<T, In, Shard<-1>, std::same_as<In, Replicate>, LayoutError::scatter_needs_replicate> {};

// ---- chains ----------------------------------------------------------------------------------

/// Steps I.. of `Steps` entered with layout In; at the end, the conversion to Exit (the
/// block's layout Region, or the output layout a block declares).
template <class T, class B, class Region, class In, std::size_t I, class Steps, class Exit>
struct ChainExec<T, B, Region, In, I, Steps, Exit, false> {
  using Head = StepExec<T, B, std::tuple_element_t<I, Steps>, In, Region>;
  using Tail = ChainExec<T, B, Region, typename Head::Out, I + 1, Steps, Exit>;
  static constexpr LayoutError error = Head::error != LayoutError::none ? Head::error : Tail::error;
  /// The step's module, then the rest's.
  struct Module {
    typename Head::Module head;  ///< this step's
    typename Tail::Module tail;  ///< the following steps'
  };
  /// The step's context, then the rest's.
  struct Context {
    typename Head::Context head;  ///< this step's
    typename Tail::Context tail;  ///< the following steps'
  };
  static Module make(B& b, const Steps& steps, Comm& tp) {
    return Module{Head::make(b, std::get<I>(steps), tp), Tail::make(b, steps, tp)};
  }
  static ForwardResult<Act<T, Exit>, Context> forward(Module& m, Comm& tp, const Act<T, In>& x) {
    auto h = Head::forward(m.head, tp, x);
    auto t = Tail::forward(m.tail, tp, h.output);
    return {std::move(t.output), Context{std::move(h.ctx), std::move(t.ctx)}};
  }
  static Tensor<T> backward(Module& m, Comm& tp, const Tensor<T>& dy, Context& ctx) {
    return Head::backward(m.head, tp, Tail::backward(m.tail, tp, dy, ctx.tail), ctx.head);
  }
  static void collect(Module& m, ParameterList<T>& all, ParameterList<T>& seq) {
    Head::collect(m.head, all, seq);
    Tail::collect(m.tail, all, seq);
  }
};

/// The end of a chain: the conversion from its last layout to Exit.
template <class T, class B, class Region, class In, std::size_t I, class Steps, class Exit>
struct ChainExec<T, B, Region, In, I, Steps, Exit, true> {
  using Convert = Conversion<T, In, Exit>;
  static constexpr LayoutError error = Convert::error;
  using Module = Empty;
  using Context = Empty;
  static Module make(B&, const Steps&, Comm&) { return {}; }
  static ForwardResult<Act<T, Exit>, Context> forward(Module&, Comm& tp, const Act<T, In>& x) {
    return {Convert::forward(tp, x), {}};
  }
  static Tensor<T> backward(Module&, Comm& tp, const Tensor<T>& dy, Context&) { return Convert::backward(tp, dy); }
  static void collect(Module&, ParameterList<T>&, ParameterList<T>&) {}
};

/// Sums over tp the gradients that the parameters `params` receive during one backward, leaving
/// what they held before untouched: the gradients are set aside and zeroed first (stash), then
/// one all-reduce of the fresh gradients, flattened, is added to them (reduce).
template <class T>
struct ReplicatedGradSum {
  std::vector<Tensor<T>> saved;  ///< the gradients before the backward

  /// Sets every gradient of `params` aside and zeroes it.
  void stash(const ParameterList<T>& params) {
    saved.clear();
    for (Parameter<T>& p : params) {
      saved.push_back(p.grad.clone());
      p.grad.zero();
    }
  }
  /// grad = saved + sum over tp of grad, in one all-reduce. Collective over `tp`.
  void reduce(Comm& tp, const ParameterList<T>& params) {
    if (params.empty()) return;
    std::int64_t n = 0;
    for (Parameter<T>& p : params) n += p.grad.numel();
    Tensor<T> flat = Tensor<T>::empty(Shape{n});
    std::int64_t at = 0;
    for (Parameter<T>& p : params) {
      flat.slice(0, at, at + p.grad.numel()).copy_from(p.grad.contiguous().reshape(Shape{p.grad.numel()}));
      at += p.grad.numel();
    }
    all_reduce_sum(tp, flat);
    at = 0;
    std::size_t i = 0;
    for (Parameter<T>& p : params) {
      p.grad.copy_from(saved[i++]);
      p.grad.add_(flat.slice(0, at, at + p.grad.numel()).reshape(p.grad.shape()));
      at += p.grad.numel();
    }
  }
};

}  // namespace detail::tp

/// A block run tensor-parallel over the ranks of `tp`, by its plan (see
/// tensor_parallel_plan.hpp): the plan's column and row members hold their shards of the
/// serial block's weights (each shard the slice of the serial init, whatever tp is),
/// replicated members their full copy, and forward and backward insert exactly the
/// collectives the layouts between the steps imply, all decided at compile time:
/// - entering a column-parallel layer from Replicate: "f" (all-reduce of the input gradient);
///   from Shard<1>: all-gather along T (reduce-scatter of the gradient);
/// - a row-parallel layer leaves a pending sum (Partial), summed where the branch or block
///   ends or at tp::reduce(): all-reduce ("g") into Replicate, reduce-scatter into Shard<1>;
///   its bias is added once, after the sum;
/// - tp::gather() / tp::scatter() and gather_output / !input_is_parallel: all-gather / split.
/// A plan that feeds a pending sum to a non-linear layer, a replicated activation to a
/// row-parallel layer without a scatter, and the like, fails to compile with one sentence.
///
/// `BlockLayout` is the layout of the block's input and output: Replicate, or Shard<1>
/// (sequence parallelism: (B, T / tp, d) activations; LayerNorms run on this rank's positions
/// and their gradients are summed over tp at the end of backward, see TensorParallelOptions).
/// A block that declares `using tp_output = tessera::Shard<-1>;` keeps its last column-parallel
/// output split instead (TensorParallelOutputLayout): an LM head's vocab-parallel logits.
///
/// For GPT-2's block (nn::Block: attention and MLP by their plans): per forward, 2 all-reduces
/// of (B, T, d), per backward 2 more; under sequence parallelism, each of them becomes a
/// reduce-scatter and an all-gather.
///
/// Collective over `tp`: every tp rank builds it from the same serial block and calls forward
/// and backward with the same shapes. `Block` must be a Layer (its serial forward is the
/// reference) with a plan; every member named by the plan appears in one step only.
template <class Block, class BlockLayout>
class TensorParallel {
  static_assert(check_layer<Block>());
  static_assert(detail::tp::check_has_plan<Block>());
  static_assert(detail::tp::check_layout_error<detail::tp::is_block_layout_v<BlockLayout>
                                                   ? detail::tp::LayoutError::none
                                                   : detail::tp::LayoutError::block_layout>());
  using T = typename LayerTraits<Block>::Scalar;
  using Region = std::conditional_t<detail::tp::is_block_layout_v<BlockLayout>, BlockLayout, Replicate>;
  using Steps = detail::tp::plan_steps_t<Block>;
  using OutLayout = typename TensorParallelOutputLayout<Block, Region>::type;
  static_assert(std::same_as<OutLayout, Region> || std::same_as<OutLayout, Shard<-1>>,
                "tessera: a block's `tp_output` layout is tessera::Shard<-1> (its last column-parallel output kept "
                "split); otherwise leave it out and the output has the block's layout.");
  using Chain = detail::tp::ChainExec<T, Block, Region, Region, 0, Steps, OutLayout>;
  static constexpr bool plan_ok = Chain::error == detail::tp::LayoutError::none;
  static_assert(detail::tp::check_layout_error<Chain::error>());

 public:
  using Input = Activation<Tensor<T>, Region>;   ///< x: (B, T, d), or (B, T / tp, d) under SP
  using Output = Activation<Tensor<T>, OutLayout>;  ///< y: as x (Shard<-1>: this rank's last-dim slice)
  using Context = typename Chain::Context;       ///< every step's context

  /// The tensor-parallel form of `block` on this rank: shards of its column and row members,
  /// its other members moved in. Throws tessera::Error naming the numbers when tp does not
  /// divide a sharded dim (e.g. the heads).
  TensorParallel(Block block, Comm tp, const TensorParallelOptions& options = {})
      : tp_(std::move(tp)), options_(options), module_(Chain::make(block, detail::tp::plan_of<Block>().steps, tp_)) {}

  /// The block's output, by the plan. Collective over tp.
  ForwardResult<Output, Context> forward(const Input& x) {
    if constexpr (plan_ok) {
      return Chain::forward(module_, tp_, x);
    } else {
      (void)x;
      return {};
    }
  }

  /// The input gradient; accumulates every local parameter gradient (and, under sequence
  /// parallelism with the option on, sums the LayerNorms' over tp). Collective over tp.
  Input backward(const Output& dy, Context& ctx) {
    if constexpr (plan_ok) {
      if constexpr (std::same_as<Region, Shard<1>>) {
        if (options_.all_reduce_sequence_parallel_grads) {
          const ParameterList<T> seq = sequence_parallel_parameters();
          detail::tp::ReplicatedGradSum<T> sum;
          sum.stash(seq);
          Tensor<T> dx = Chain::backward(module_, tp_, dy.value, ctx);
          sum.reduce(tp_, seq);
          return {std::move(dx)};
        }
      }
      return {Chain::backward(module_, tp_, dy.value, ctx)};
    } else {
      (void)dy;
      (void)ctx;
      return {};
    }
  }

  /// This rank's parameters in plan order (shards with layout Shard, the rest Replicate), names
  /// as in the serial block.
  ParameterList<T> parameters() {
    ParameterList<T> all, seq;
    Chain::collect(module_, all, seq);
    return all;
  }
  /// The replicated parameters whose gradients are partial sums over tp under sequence
  /// parallelism (the LayerNorms'); empty without it.
  ParameterList<T> sequence_parallel_parameters() {
    ParameterList<T> all, seq;
    Chain::collect(module_, all, seq);
    return seq;
  }
  /// The tp communicator.
  Comm& comm() noexcept { return tp_; }
  /// The options.
  const TensorParallelOptions& options() const noexcept { return options_; }

 private:
  Comm tp_;
  TensorParallelOptions options_;
  typename Chain::Module module_;
};

/// A block run tensor-parallel with sequence parallelism: input and output (B, T / tp, d).
template <class Block>
using SequenceParallel = TensorParallel<Block, Shard<1>>;

}  // namespace tessera
