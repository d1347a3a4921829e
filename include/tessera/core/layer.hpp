#pragma once
/// @file
/// The Layer contract: what a type must provide for tessera's policies to wrap it, with a
/// one-sentence diagnosis (check_layer) of the first part a type misses.
///
/// ```cpp
/// auto [y, ctx] = layer.forward(x);   // ctx: what backward needs for this call only
/// auto dx = layer.backward(dy, ctx);  // returns dL/dx, accumulates dL/dθ into the grads
/// for (Parameter<float>& p : layer.parameters()) { p.name; p.value; p.grad; p.layout; }
/// ```
///
/// Grad-ready hook: a layer that owns parameters calls `p.mark_grad_ready()` on each of them at
/// the end of its backward, after adding that call's contribution into `p.grad` (the nn layers
/// do). DataParallel uses it to start reducing a gradient bucket while backward still runs on
/// earlier layers. A user layer that does not call it is still correct: its buckets are
/// reduced when backward returns, just not overlapped with it.
///
/// All per-call state lives in the context, not in the layer, so several micro-batches can be
/// in flight at once (pipeline schedules) and a context can be dropped and rebuilt by running
/// forward again (activation checkpointing). A context holds handles to tensors (the input,
/// intermediate results), not copies: do not write into a tensor given to forward before the
/// matching backward has run.

#include <concepts>
#include <type_traits>
#include <utility>

#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera {

/// What `forward` returns: the output and the per-call context that `backward` needs.
/// An aggregate, so `auto [y, ctx] = layer.forward(x);` works.
template <class Out, class Ctx>
struct ForwardResult {
  using Output = Out;   ///< the output type
  using Context = Ctx;  ///< the context type
  Out output;           ///< the layer's output
  Ctx ctx;              ///< what backward needs for this call
};

/// What `backward` returns for an input that has no gradient (token ids).
struct NoGrad {};

namespace detail {
template <class R>
struct is_forward_result : std::false_type {};
template <class O, class C>
struct is_forward_result<ForwardResult<O, C>> : std::true_type {};

template <class P>
struct parameter_list_scalar {};
template <class T>
struct parameter_list_scalar<ParameterList<T>> {
  using type = T;
};

template <class L>
concept layer_has_input = requires { typename L::Input; };

template <class L>
concept layer_has_forward =
    layer_has_input<L> && requires(L& l, const typename L::Input& x) { l.forward(x); };

template <class L>
using forward_result_t =
    std::remove_cvref_t<decltype(std::declval<L&>().forward(std::declval<const typename L::Input&>()))>;

template <class L>
concept layer_forward_returns_result = layer_has_forward<L> && is_forward_result<forward_result_t<L>>::value;

template <class L>
concept layer_has_backward =
    layer_forward_returns_result<L> &&
    requires(L& l, const typename forward_result_t<L>::Output& dy, typename forward_result_t<L>::Context& ctx) {
      l.backward(dy, ctx);
    };

template <class L>
using backward_result_t = std::remove_cvref_t<decltype(std::declval<L&>().backward(
    std::declval<const typename forward_result_t<L>::Output&>(),
    std::declval<typename forward_result_t<L>::Context&>()))>;

template <class L>
concept layer_backward_returns_input_grad =
    layer_has_backward<L> &&
    (std::same_as<backward_result_t<L>, typename L::Input> || std::same_as<backward_result_t<L>, NoGrad>);

template <class L>
concept layer_has_parameters = requires(L& l) {
  typename parameter_list_scalar<std::remove_cvref_t<decltype(l.parameters())>>::type;
};

template <class>
inline constexpr bool always_false = false;

/// Stand-in for the associated types of a type that is not a Layer, so that a policy
/// instantiated with it reports only check_layer's sentence.
struct NotALayer {};
}  // namespace detail

/// A type that tessera's policies can wrap:
/// - `using Input = ...;` the type forward takes (a Tensor, or token ids);
/// - `forward(const Input& x)` returns `ForwardResult<Output, Context>`;
/// - `backward(const Output& dy, Context& ctx)` returns dL/dx as an `Input` (or `NoGrad` where
///   the input has no gradient) and adds dL/dθ into each parameter's grad (then, optionally,
///   calls each parameter's mark_grad_ready(); see the file comment);
/// - `parameters()` returns a `ParameterList<float>` or `ParameterList<double>`.
template <class L>
concept Layer = detail::layer_backward_returns_input_grad<L> && detail::layer_has_parameters<L>;

/// The associated types of a Layer: Input, Output, Context, InputGrad (what backward returns)
/// and Scalar (the parameters' element type). For a type that is not a Layer they are all
/// detail::NotALayer, so that code naming them compiles far enough to print check_layer's
/// sentence.
template <class L>
struct LayerTraits {
  using Input = detail::NotALayer;      ///< forward's argument
  using Output = detail::NotALayer;     ///< forward's output
  using Context = detail::NotALayer;    ///< forward's per-call context
  using InputGrad = detail::NotALayer;  ///< backward's result
  using Scalar = float;                 ///< parameter element type
};
/// The associated types of a Layer.
template <Layer L>
struct LayerTraits<L> {
  using Input = typename L::Input;                                     ///< forward's argument
  using Output = typename detail::forward_result_t<L>::Output;         ///< forward's output
  using Context = typename detail::forward_result_t<L>::Context;       ///< forward's context
  using InputGrad = detail::backward_result_t<L>;                      ///< backward's result
  using Scalar = typename detail::parameter_list_scalar<
      std::remove_cvref_t<decltype(std::declval<L&>().parameters())>>::type;  ///< param element type
};

/// Checks that `L` is a Layer; where it is not, fails to compile with one sentence naming the
/// first missing part. Policies call it as `static_assert(check_layer<L>());`.
template <class L>
consteval bool check_layer() {
  if constexpr (!detail::layer_has_input<L>) {
    static_assert(detail::always_false<L>,
                  "tessera: the layer type does not declare `using Input = ...;`, the type its "
                  "forward() takes (e.g. tessera::Tensor<float>).");
  } else if constexpr (!detail::layer_has_forward<L>) {
    static_assert(detail::always_false<L>,
                  "tessera: the layer type has no member forward(const Input&) that accepts its "
                  "Input type.");
  } else if constexpr (!detail::layer_forward_returns_result<L>) {
    static_assert(detail::always_false<L>,
                  "tessera: the layer's forward() must return tessera::ForwardResult<Output, "
                  "Context>, the output together with the per-call context that backward needs.");
  } else if constexpr (!detail::layer_has_backward<L>) {
    static_assert(detail::always_false<L>,
                  "tessera: the layer type has no member backward(const Output& dy, Context& ctx) "
                  "taking the output gradient and the context returned by forward().");
  } else if constexpr (!detail::layer_backward_returns_input_grad<L>) {
    static_assert(detail::always_false<L>,
                  "tessera: the layer's backward() must return the input gradient, of the type "
                  "Input (or tessera::NoGrad where the input has no gradient).");
  } else if constexpr (!detail::layer_has_parameters<L>) {
    static_assert(detail::always_false<L>,
                  "tessera: the layer type has no member parameters() returning "
                  "tessera::ParameterList<float> or tessera::ParameterList<double>.");
  }
  return true;
}

}  // namespace tessera
