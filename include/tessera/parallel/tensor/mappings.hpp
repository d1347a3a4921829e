#pragma once
/// @file
/// The conjugate communication operators of tensor and sequence parallelism (Megatron-LM,
/// megatron/core/tensor_parallel/mappings.py), as layers on layout-typed activations: the
/// type of their input and output says which layout they convert, so a policy inserts them
/// from the types and a misplaced one does not compile.
///
/// | operator | layouts | forward | backward |
/// |---|---|---|---|
/// | CopyToTensorModelParallelRegion ("f") | Replicate -> Replicate | identity | all-reduce |
/// | ReduceFromTensorModelParallelRegion ("g") | Partial -> Replicate | all-reduce (+ bias) | identity |
/// | ScatterToTensorModelParallelRegion | Replicate -> Shard<-1> | keep own slice | all-gather |
/// | GatherFromTensorModelParallelRegion | Shard<-1> -> Replicate | all-gather | keep own slice |
/// | ScatterToSequenceParallelRegion | Replicate -> Shard<1> | keep own slice | all-gather |
/// | GatherFromSequenceParallelRegion | Shard<1> -> Replicate | all-gather | reduce-scatter |
/// | ReduceScatterToSequenceParallelRegion | Partial -> Shard<1> | reduce-scatter (+ bias) | all-gather |
///
/// Each is collective over its communicator in both directions: every tp rank calls forward
/// (and backward) with the same shape. Shard<1> activations are (B, T, d) split along T.

#include <concepts>
#include <utility>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/tensor/sharding.hpp"

namespace tessera {

namespace detail::tp {
/// What the mappings share: the communicator, no parameters, an empty context.
template <std::floating_point T, Layout In, Layout Out>
class MappingBase {
 public:
  using Input = Activation<Tensor<T>, In>;    ///< the activation it converts
  using Output = Activation<Tensor<T>, Out>;  ///< the converted activation
  /// Nothing: the backward needs only the gradient.
  struct Context {};

  /// Over the ranks of `tp`.
  explicit MappingBase(Comm tp) : tp_(std::move(tp)) {}
  /// None.
  ParameterList<T> parameters() noexcept { return {}; }
  /// The tp communicator.
  Comm& comm() noexcept { return tp_; }

 protected:
  Comm tp_;
};
}  // namespace detail::tp

/// "f": identity forward, all-reduce of the gradient backward. Enters the tensor-parallel
/// region before a column-parallel layer, whose input gradient is a partial sum over the ranks.
/// Collective over `tp` in backward.
template <std::floating_point T>
class CopyToTensorModelParallelRegion : public detail::tp::MappingBase<T, Replicate, Replicate> {
  using Base = detail::tp::MappingBase<T, Replicate, Replicate>;

 public:
  using typename Base::Context;
  using typename Base::Input;
  using typename Base::Output;
  using Base::Base;
  /// x unchanged.
  ForwardResult<Output, Context> forward(const Input& x) { return {x, {}}; }
  /// The sum over the tp ranks of dy (a fresh tensor). Collective over `tp`.
  Input backward(const Output& dy, const Context& = {}) {
    Tensor<T> g = dy.value.clone();
    detail::tp::all_reduce_sum(this->tp_, g);
    return {std::move(g)};
  }
};

/// "g": the sum over the tp ranks of a pending partial sum, plus its bias once; identity
/// backward. Ends the tensor-parallel region after a row-parallel layer. Collective over `tp`
/// in forward.
template <std::floating_point T>
class ReduceFromTensorModelParallelRegion : public detail::tp::MappingBase<T, Partial, Replicate> {
  using Base = detail::tp::MappingBase<T, Partial, Replicate>;

 public:
  using typename Base::Context;
  using typename Base::Input;
  using typename Base::Output;
  using Base::Base;
  /// All-reduce (sum) of x's value, then x's bias added: in place when x's tensor is
  /// contiguous (it then holds the result), as the pending sum is not used again. Collective
  /// over `tp`.
  ForwardResult<Output, Context> forward(const Input& x) {
    const Tensor<T> y = x.value.contiguous();
    detail::tp::all_reduce_sum(this->tp_, y);
    detail::tp::add_bias_rows(y, x.bias);
    return {Output{y}, {}};
  }
  /// dy unchanged (the gradient of every addend is the gradient of the sum).
  Input backward(const Output& dy, const Context& = {}) { return {dy.value, {}}; }
};

/// Keeps this rank's slice of the last dim; backward all-gathers the gradient along it.
/// Collective over `tp` in backward.
template <std::floating_point T>
class ScatterToTensorModelParallelRegion : public detail::tp::MappingBase<T, Replicate, Shard<-1>> {
  using Base = detail::tp::MappingBase<T, Replicate, Shard<-1>>;

 public:
  using typename Base::Context;
  using typename Base::Input;
  using typename Base::Output;
  using Base::Base;
  /// This rank's slice of the last dim. Throws tessera::Error unless tp divides it.
  ForwardResult<Output, Context> forward(const Input& x) {
    return {Output{detail::tp::split_dim(x.value, -1, 1, this->tp_.rank(), this->tp_.size(), "scatter")}, {}};
  }
  /// The full gradient, all-gathered along the last dim. Collective over `tp`.
  Input backward(const Output& dy, const Context& = {}) {
    return {detail::tp::all_gather_dim(this->tp_, dy.value, -1)};
  }
};

/// All-gathers the last dim; backward keeps this rank's slice of the gradient (Megatron's
/// gather_output). Collective over `tp` in forward.
template <std::floating_point T>
class GatherFromTensorModelParallelRegion : public detail::tp::MappingBase<T, Shard<-1>, Replicate> {
  using Base = detail::tp::MappingBase<T, Shard<-1>, Replicate>;

 public:
  using typename Base::Context;
  using typename Base::Input;
  using typename Base::Output;
  using Base::Base;
  /// The full tensor, all-gathered along the last dim. Collective over `tp`.
  ForwardResult<Output, Context> forward(const Input& x) {
    return {Output{detail::tp::all_gather_dim(this->tp_, x.value, -1)}, {}};
  }
  /// This rank's slice of the last dim of dy.
  Input backward(const Output& dy, const Context& = {}) {
    return {detail::tp::split_dim(dy.value, -1, 1, this->tp_.rank(), this->tp_.size(), "gather backward")};
  }
};

/// Keeps this rank's T / tp positions of a (B, T, d) activation; backward all-gathers the
/// gradient along T. Collective over `tp` in backward.
template <std::floating_point T>
class ScatterToSequenceParallelRegion : public detail::tp::MappingBase<T, Replicate, Shard<1>> {
  using Base = detail::tp::MappingBase<T, Replicate, Shard<1>>;

 public:
  using typename Base::Context;
  using typename Base::Input;
  using typename Base::Output;
  using Base::Base;
  /// This rank's positions. Throws tessera::Error unless x is (B, T, d) with tp dividing T.
  ForwardResult<Output, Context> forward(const Input& x) {
    detail::tp::expect_sequence_rank(x.value.shape(), "ScatterToSequenceParallelRegion");
    return {Output{detail::tp::split_dim(x.value, 1, 1, this->tp_.rank(), this->tp_.size(), "sequence scatter")}, {}};
  }
  /// The full gradient, all-gathered along T. Collective over `tp`.
  Input backward(const Output& dy, const Context& = {}) { return {detail::tp::all_gather_dim(this->tp_, dy.value, 1)}; }
};

/// All-gathers a (B, T / tp, d) activation along T before a column-parallel layer; backward
/// reduce-scatters the gradient along T (the layer's input gradient is a partial sum: Megatron's
/// gather_from_sequence_parallel_region with tensor_parallel_output_grad). Collective over `tp`.
template <std::floating_point T>
class GatherFromSequenceParallelRegion : public detail::tp::MappingBase<T, Shard<1>, Replicate> {
  using Base = detail::tp::MappingBase<T, Shard<1>, Replicate>;

 public:
  using typename Base::Context;
  using typename Base::Input;
  using typename Base::Output;
  using Base::Base;
  /// The full (B, T, d) activation. Collective over `tp`. Throws tessera::Error unless x is
  /// (B, T / tp, d).
  ForwardResult<Output, Context> forward(const Input& x) {
    detail::tp::expect_sequence_rank(x.value.shape(), "GatherFromSequenceParallelRegion");
    return {Output{detail::tp::all_gather_dim(this->tp_, x.value, 1)}, {}};
  }
  /// This rank's positions of the sum over ranks of dy. Collective over `tp`.
  Input backward(const Output& dy, const Context& = {}) { return {detail::tp::reduce_scatter_dim(this->tp_, dy.value, 1)}; }
};

/// Reduce-scatters a pending partial sum along T (each rank gets the sum for its positions),
/// then adds the bias once; backward all-gathers the gradient along T. Replaces "g" under
/// sequence parallelism. Collective over `tp`.
template <std::floating_point T>
class ReduceScatterToSequenceParallelRegion : public detail::tp::MappingBase<T, Partial, Shard<1>> {
  using Base = detail::tp::MappingBase<T, Partial, Shard<1>>;

 public:
  using typename Base::Context;
  using typename Base::Input;
  using typename Base::Output;
  using Base::Base;
  /// This rank's positions of the sum, plus the bias. Collective over `tp`. Throws
  /// tessera::Error unless x is (B, T, d) with tp dividing T.
  ForwardResult<Output, Context> forward(const Input& x) {
    detail::tp::expect_sequence_rank(x.value.shape(), "ReduceScatterToSequenceParallelRegion");
    Tensor<T> y = detail::tp::reduce_scatter_dim(this->tp_, x.value, 1);
    detail::tp::add_bias_rows(y, x.bias);
    return {Output{std::move(y)}, {}};
  }
  /// The full gradient, all-gathered along T (replicated, as a pending sum's gradient is).
  /// Collective over `tp`.
  Input backward(const Output& dy, const Context& = {}) { return {detail::tp::all_gather_dim(this->tp_, dy.value, 1), {}}; }
};

}  // namespace tessera
