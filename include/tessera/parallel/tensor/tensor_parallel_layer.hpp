#pragma once
/// @file
/// TensorParallelLayer<L>: the tensor-parallel form of one layer of a model, with plain tensors
/// in and out (the adapter through which a tensor-parallel layer sits inside a pipeline stage
/// or a sequential model), chosen per layer type:
/// - a layer with a tensor-parallel plan: TensorParallel<L> (its input and output replicated
///   over tp, or the output split over the vocabulary when L declares `tp_output`);
/// - nn::Embedding: VocabParallelEmbedding (token ids in, replicated embeddings out).
/// Specialize it for another layer type with `using type = ...;` and `static type make(L, Comm)`.

#include <concepts>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/tensor/tensor_parallel.hpp"
#include "tessera/parallel/tensor/vocab_parallel_embedding.hpp"

namespace tessera {

namespace detail {
template <class X>
struct plain_of {
  using type = X;
  using layout = Replicate;
  static const X& unwrap(const X& x) noexcept { return x; }
  static X wrap(X x) { return x; }
};
template <class V, Layout L>
struct plain_of<Activation<V, L>> {
  using type = V;
  using layout = L;
  static const V& unwrap(const Activation<V, L>& x) noexcept { return x.value; }
  static Activation<V, L> wrap(V x) { return {std::move(x)}; }
};
}  // namespace detail

/// A layer whose input and output are Activation<Tensor<T>, L> (a tensor-parallel layer) seen
/// as a layer of plain tensors: forward and backward wrap and unwrap the activations. Types
/// that are not activations (token ids, NoGrad) pass unchanged. `InputLayout` and
/// `OutputLayout` keep what the activations' layouts were (Replicate for plain types), so that
/// a composition can still check them at compile time (e.g. that logits split over the
/// vocabulary go to a vocab-parallel loss).
///
/// Collective as `L` is: every tp rank calls forward and backward together.
template <Layer L>
class PlainLayer {
  using In = detail::plain_of<typename LayerTraits<L>::Input>;
  using Out = detail::plain_of<typename LayerTraits<L>::Output>;
  using Grad = typename LayerTraits<L>::InputGrad;

 public:
  using Input = typename In::type;              ///< L's input, unwrapped
  using Output = typename Out::type;            ///< L's output, unwrapped
  using InputLayout = typename In::layout;      ///< the layout of L's input on the tp axis
  using OutputLayout = typename Out::layout;    ///< the layout of L's output on the tp axis
  using Context = typename LayerTraits<L>::Context;  ///< L's context
  using Scalar = typename LayerTraits<L>::Scalar;    ///< parameter element type

  /// Wraps `layer` (moved in).
  explicit PlainLayer(L layer) : layer_(std::move(layer)) {}

  /// L's forward on `x` tagged with L's input layout.
  ForwardResult<Output, Context> forward(const Input& x) {
    auto r = layer_.forward(In::wrap(x));
    return {Out::unwrap(r.output), std::move(r.ctx)};
  }
  /// L's backward on `dy` tagged with L's output layout; the input gradient unwrapped (NoGrad
  /// stays NoGrad).
  auto backward(const Output& dy, Context& ctx) {
    if constexpr (std::same_as<Grad, NoGrad>) {
      return layer_.backward(Out::wrap(dy), ctx);
    } else {
      return detail::plain_of<Grad>::unwrap(layer_.backward(Out::wrap(dy), ctx));
    }
  }
  /// L's parameters.
  ParameterList<Scalar> parameters() { return layer_.parameters(); }
  /// L's replicated parameters whose gradients are partial sums over tp under sequence
  /// parallelism (TensorParallel's LayerNorms); empty if L has none.
  ParameterList<Scalar> sequence_parallel_parameters() {
    if constexpr (requires { layer_.sequence_parallel_parameters(); })
      return layer_.sequence_parallel_parameters();
    else
      return {};
  }
  /// The wrapped layer.
  L& layer() noexcept { return layer_; }

 private:
  L layer_;
};

namespace detail {
template <class L>
concept has_tp_plan = requires { L::tp_plan.steps; } || requires { TensorParallelPlan<L>::value.steps; };
}  // namespace detail

/// The tensor-parallel form of layer type `L` over a tp communicator (see the file comment),
/// between activations of layout `Layout` (Replicate, or Shard<1> under sequence parallelism:
/// (B, T / tp, d)): `using type` (a Layer of plain tensors) and `static type make(L serial,
/// Comm tp)`, which takes this rank's shards of the serial layer's values, so that every tp size
/// computes what the serial layer computes. Under sequence parallelism the replicated
/// parameters' partial gradients are left to the caller (type's sequence_parallel_parameters():
/// a model sums them over tp once, at the end of its backward). The primary template fails with
/// one sentence for a layer without a plan.
template <class L, class Layout = Replicate>
struct TensorParallelLayer {
  static_assert(detail::has_tp_plan<L>,
                "tessera: this layer type has parameters but no tensor-parallel plan; give it `static constexpr auto "
                "tp_plan = tessera::tp::plan(...);` or specialize tessera::TensorParallelLayer<L>.");
};

/// A layer with a plan: TensorParallel<L, Layout>, as plain tensors.
template <class L, class Layout>
  requires detail::has_tp_plan<L>
struct TensorParallelLayer<L, Layout> {
  using type = PlainLayer<TensorParallel<L, Layout>>;  ///< the plain-tensor form
  /// This rank's form of `serial`. Collective over tp (as TensorParallel's constructor).
  static type make(L serial, Comm tp) {
    return type(TensorParallel<L, Layout>(std::move(serial), std::move(tp),
                                          TensorParallelOptions{.all_reduce_sequence_parallel_grads = false}));
  }
};

/// An embedding table: split over the vocabulary (VocabParallelEmbedding; token ids, the same
/// on every tp rank, in; replicated embeddings out, or reduce-scattered along T under sequence
/// parallelism). The vocabulary is padded to a multiple of tp.
template <std::floating_point T, class Layout>
struct TensorParallelLayer<nn::Embedding<T>, Layout> {
  /// The vocab-parallel embedding.
  using Embedding = VocabParallelEmbedding<T, VocabParallelEmbeddingOptions{.sequence_parallel = std::same_as<Layout, Shard<1>>}>;
  using type = PlainLayer<Embedding>;  ///< the plain-tensor form
  /// This rank's rows of `serial`.
  static type make(nn::Embedding<T> serial, Comm tp) { return type(Embedding(serial, std::move(tp))); }
};

/// The tensor-parallel form of `serial` over `tp` between activations of layout `Layout`
/// (TensorParallelLayer<L, Layout>::make).
template <class Layout = Replicate, class L>
typename TensorParallelLayer<L, Layout>::type tensor_parallel_layer(L serial, Comm tp) {
  return TensorParallelLayer<L, Layout>::make(std::move(serial), std::move(tp));
}

}  // namespace tessera
