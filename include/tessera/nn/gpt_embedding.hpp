#pragma once
/// @file
/// GPTEmbedding: GPT-2's token plus learned position embeddings (`wte`, `wpe`).

#include <concepts>
#include <cstdint>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/layer_init.hpp"

namespace tessera::nn {

/// x[b, t] = wte[tokens[b, t]] + wpe[t]. Parameters "wte.weight" [vocab_size, d] and
/// "wpe.weight" [n_positions, d] (under `init.prefix`, if any).
///
/// tokens: (B, T) int32 -> x: (B, T, d). The first layer of a GPT, and so of its first
/// pipeline stage.
template <std::floating_point T>
class GPTEmbedding {
 public:
  using Input = Tensor<std::int32_t>;  ///< tokens: (B, T)
  /// What backward needs: the two lookups' contexts.
  struct Context {
    typename Embedding<T>::Context wte;  ///< token lookup
    typename Embedding<T>::Context wpe;  ///< position lookup
  };

  /// New tables for `vocab_size` tokens and `n_positions` positions of width `d_model`.
  /// Throws tessera::Error unless all sizes are positive.
  GPTEmbedding(std::int64_t vocab_size, std::int64_t n_positions, std::int64_t d_model, const LayerInit& init = {})
      : wte_(vocab_size, d_model, init.child("wte")), wpe_(n_positions, d_model, init.child("wpe")) {}

  /// Token plus position embeddings. Throws tessera::Error when tokens is not (B, T), when T
  /// exceeds n_positions (naming both), or when a token id is outside the vocabulary (naming
  /// the id and the vocabulary size).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<std::int32_t>& tokens) const {
    TESSERA_EXPECTS(tokens.rank() == 2, "GPT: tokens of shape ", tokens.shape(), " are not (B, T)");
    const std::int64_t B = tokens.size(0), Tn = tokens.size(1), d = wte_.dim();
    TESSERA_EXPECTS(Tn <= wpe_.num_embeddings(), "GPT: sequence length ", Tn,
                    " exceeds the position table n_positions=", wpe_.num_embeddings());
    auto [x, c1] = wte_.forward(tokens);  // (B, T, d)
    auto [p, c2] = wpe_.forward(positions(Tn));  // (T, d)
    for (std::int64_t b = 0; b < B; ++b) x.slice(0, b, b + 1).reshape(Shape{Tn, d}).add_(p);
    return {std::move(x), Context{std::move(c1), std::move(c2)}};
  }

  /// Accumulates the gradients of both tables from dx: (B, T, d); tokens have no gradient.
  NoGrad backward(const Tensor<T>& dx, const Context& ctx) {
    const Shape want{ctx.wte.ids.size(0), ctx.wte.ids.size(1), wte_.dim()};
    TESSERA_EXPECTS(dx.shape() == want, "GPT: embedding gradient of shape ", dx.shape(),
                    " does not match the output shape ", want);
    const std::int64_t B = want[0], Tn = want[1], d = want[2];
    wte_.backward(dx, ctx.wte);
    Tensor<T> dp(Shape{Tn, d});  // sum over the batch of dx[b]
    for (std::int64_t b = 0; b < B; ++b) dp.add_(dx.slice(0, b, b + 1).contiguous().reshape(Shape{Tn, d}));
    wpe_.backward(dp, ctx.wpe);
    return {};
  }

  /// wte.weight, wpe.weight.
  ParameterList<T> parameters() { return {&wte_.weight(), &wpe_.weight()}; }
  /// Token embedding [vocab_size, d].
  Embedding<T>& wte() noexcept { return wte_; }
  /// Position embedding [n_positions, d].
  Embedding<T>& wpe() noexcept { return wpe_; }

 private:
  static Tensor<std::int32_t> positions(std::int64_t n) {
    Tensor<std::int32_t> pos = Tensor<std::int32_t>::empty(Shape{n});
    for (std::int64_t t = 0; t < n; ++t) pos.data()[t] = static_cast<std::int32_t>(t);
    return pos;
  }

  Embedding<T> wte_;
  Embedding<T> wpe_;
};

}  // namespace tessera::nn
