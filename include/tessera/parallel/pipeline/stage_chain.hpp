#pragma once
/// @file
/// StageChain: consecutive layers run one after the other as one Layer -- what a pipeline
/// stage of a model given as a type list is (torch.nn.Sequential's role, with the per-call
/// contexts of tessera's Layer contract).

#include <concepts>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera {

namespace detail {
template <class... Ls>
struct chain_links_ok : std::true_type {};
template <class A, class B, class... Rest>
struct chain_links_ok<A, B, Rest...>
    : std::bool_constant<std::same_as<typename LayerTraits<A>::Output, typename LayerTraits<B>::Input> &&
                         std::same_as<typename LayerTraits<B>::InputGrad, typename LayerTraits<B>::Input> &&
                         chain_links_ok<B, Rest...>::value> {};

template <class First, class... Rest>
struct first_of {
  using type = First;
};
template <class... Ls>
struct last_of;
template <class L>
struct last_of<L> {
  using type = L;
};
template <class L, class... Rest>
struct last_of<L, Rest...> : last_of<Rest...> {};
}  // namespace detail

/// The layers `Ls...` applied in order as one Layer: y = L_k(...L_1(L_0(x))). Its Input is
/// L_0's, its Output L_k's; backward runs the layers in reverse and returns L_0's input
/// gradient (NoGrad for token ids). Parameters are listed layer by layer.
///
/// Each layer's Output must be the next layer's Input, and every layer but the first must
/// return a gradient of its input (a static_assert says so in a sentence); the layers'
/// contexts must be default-constructible. Built from the layers themselves:
/// `StageChain<A, B>(A{...}, B{...})`.
template <Layer... Ls>
  requires(sizeof...(Ls) >= 1)
class StageChain {
  static_assert(detail::chain_links_ok<Ls...>::value,
                "tessera: in a StageChain each layer's Output must be the next layer's Input, and every layer "
                "after the first must return the gradient of its input from backward().");

  using First = typename detail::first_of<Ls...>::type;
  using Last = typename detail::last_of<Ls...>::type;

 public:
  using Input = typename LayerTraits<First>::Input;  ///< the first layer's input
  using Output = typename LayerTraits<Last>::Output;  ///< the last layer's output
  /// One context per layer, in order.
  struct Context {
    std::tuple<typename LayerTraits<Ls>::Context...> ctx;  ///< the layers' contexts
  };

  /// The chain of the given layers (moved in).
  explicit StageChain(Ls... layers) : layers_(std::move(layers)...) {}

  /// Runs every layer in order; returns the last output and every context.
  ForwardResult<Output, Context> forward(const Input& x) {
    Context ctx;
    auto y = step<0>(x, ctx);
    return {std::move(y), std::move(ctx)};
  }

  /// Runs every layer's backward in reverse order; returns the first layer's input gradient.
  typename LayerTraits<First>::InputGrad backward(const Output& dy, Context& ctx) {
    return backward_impl<sizeof...(Ls) - 1>(dy, ctx);
  }

  /// Every layer's parameters, in layer order.
  ParameterList<typename LayerTraits<First>::Scalar> parameters() {
    ParameterList<typename LayerTraits<First>::Scalar> ps;
    std::apply([&](auto&... l) { (ps.append(l.parameters()), ...); }, layers_);
    return ps;
  }

  /// The I-th layer.
  template <std::size_t I>
  auto& layer() noexcept {
    return std::get<I>(layers_);
  }
  /// Number of layers.
  static constexpr std::size_t size() noexcept { return sizeof...(Ls); }

 private:
  template <std::size_t I, class X>
  auto step(const X& x, Context& ctx) {
    auto [y, c] = std::get<I>(layers_).forward(x);
    std::get<I>(ctx.ctx) = std::move(c);
    if constexpr (I + 1 == sizeof...(Ls)) {
      return y;
    } else {
      return step<I + 1>(y, ctx);
    }
  }
  template <std::size_t I, class G>
  typename LayerTraits<First>::InputGrad backward_impl(const G& dy, Context& ctx) {
    auto dx = std::get<I>(layers_).backward(dy, std::get<I>(ctx.ctx));
    if constexpr (I == 0) {
      return dx;
    } else {
      return backward_impl<I - 1>(dx, ctx);
    }
  }

  std::tuple<Ls...> layers_;
};

}  // namespace tessera
