#pragma once
/// @file
/// GPT: the GPT-2 language model (Radford et al. 2019) with Hugging Face parameter names.

#include <concepts>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/gpt_embedding.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/lm_head.hpp"

namespace tessera::nn {

/// Sizes of a GPT-2 model. Defaults are GPT-2 small (124M parameters).
struct GPTConfig {
  std::int64_t vocab_size = 50257;  ///< tokens in the vocabulary
  std::int64_t n_positions = 1024;  ///< longest sequence (rows of the position table)
  std::int64_t n_layer = 12;        ///< transformer blocks
  std::int64_t n_head = 12;         ///< attention heads per block
  std::int64_t d_model = 768;       ///< width (Hugging Face `n_embd`)
};

/// `c` itself, after checking it: throws tessera::Error naming the values when a size is not
/// positive or n_head does not divide d_model. Every GPT model type (serial, tensor-parallel,
/// pipeline stages) checks its configuration with it.
inline GPTConfig validated(const GPTConfig& c) {
  TESSERA_EXPECTS(c.vocab_size > 0 && c.n_positions > 0 && c.n_layer > 0 && c.n_head > 0 && c.d_model > 0,
                  "GPTConfig: sizes must be positive: vocab_size=", c.vocab_size, " n_positions=", c.n_positions,
                  " n_layer=", c.n_layer, " n_head=", c.n_head, " d_model=", c.d_model);
  TESSERA_EXPECTS(c.d_model % c.n_head == 0, "GPTConfig: n_head ", c.n_head, " does not divide d_model ", c.d_model);
  return c;
}

/// GPT-2: x = wte[tokens] + wpe[positions]; n_layer pre-LN blocks; ln_f; logits = x wte^T (the
/// LM head tied to the token embedding). Parameters, in Hugging Face GPT2Model order:
/// "wte.weight", "wpe.weight", "h.{i}.ln_1.weight", "h.{i}.ln_1.bias",
/// "h.{i}.attn.c_attn.weight" [d, 3d], "h.{i}.attn.c_attn.bias", "h.{i}.attn.c_proj.weight",
/// "h.{i}.attn.c_proj.bias", "h.{i}.ln_2.*", "h.{i}.mlp.c_fc.*", "h.{i}.mlp.c_proj.*",
/// "ln_f.weight", "ln_f.bias". The tied head adds no parameter of its own.
///
/// tokens: (B, T) int32 -> logits: (B, T, vocab_size). Pair it with CrossEntropy for the loss.
template <std::floating_point T>
class GPT {
 public:
  using Input = Tensor<std::int32_t>;  ///< tokens: (B, T)
  /// What backward needs: every sub-layer's context.
  struct Context {
    typename GPTEmbedding<T>::Context embedding;    ///< the embeddings'
    std::vector<typename Block<T>::Context> h;      ///< one per block
    typename LayerNorm<T>::Context ln_f;             ///< the final LayerNorm's
    typename LMHead<T>::Context lm_head;             ///< the head's
  };

  /// A model initialized as GPT-2 from `seed` (see LayerInit). Throws tessera::Error naming
  /// the values when a size is not positive or n_head does not divide d_model.
  explicit GPT(const GPTConfig& config, std::uint64_t seed = 0)
      : config_(validated(config)),
        embedding_(config.vocab_size, config.n_positions, config.d_model, init(seed)),
        ln_f_(config.d_model, init(seed).child("ln_f")),
        lm_head_(embedding_.wte().weight()) {
    h_.reserve(static_cast<std::size_t>(config.n_layer));
    for (std::int64_t i = 0; i < config.n_layer; ++i)
      h_.emplace_back(config.d_model, config.n_head, init(seed).child("h." + std::to_string(i)));
  }

  /// The logits (B, T, vocab_size). Throws tessera::Error when tokens is not (B, T), T exceeds
  /// n_positions, or a token id is outside the vocabulary (naming the values).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<std::int32_t>& tokens) const {
    Context ctx;
    auto [x, ce] = embedding_.forward(tokens);
    ctx.embedding = std::move(ce);
    ctx.h.reserve(h_.size());
    for (const Block<T>& block : h_) {
      auto [y, cb] = block.forward(x);
      ctx.h.push_back(std::move(cb));
      x = std::move(y);
    }
    auto [xf, cf] = ln_f_.forward(x);
    ctx.ln_f = std::move(cf);
    auto [logits, cl] = lm_head_.forward(xf);
    ctx.lm_head = std::move(cl);
    return {std::move(logits), std::move(ctx)};
  }

  /// Accumulates every parameter gradient from dlogits: (B, T, vocab_size). Throws
  /// tessera::Error naming both shapes when dlogits does not have the output's shape.
  NoGrad backward(const Tensor<T>& dlogits, const Context& ctx) {
    TESSERA_EXPECTS(ctx.h.size() == h_.size(), "GPT: context holds ", ctx.h.size(), " blocks, the model ",
                    h_.size());
    Tensor<T> dx = ln_f_.backward(lm_head_.backward(dlogits, ctx.lm_head), ctx.ln_f);
    for (std::size_t i = h_.size(); i-- > 0;) dx = h_[i].backward(dx, ctx.h[i]);
    return embedding_.backward(dx, ctx.embedding);
  }

  /// All parameters in Hugging Face order (see the class comment).
  ParameterList<T> parameters() {
    ParameterList<T> ps = embedding_.parameters();
    for (Block<T>& block : h_) ps.append(block.parameters());
    ps.append(ln_f_.parameters());
    return ps;
  }

  /// The sizes.
  const GPTConfig& config() const noexcept { return config_; }
  /// Token and position embeddings.
  GPTEmbedding<T>& embedding() noexcept { return embedding_; }
  /// The blocks h.0 .. h.{n_layer-1}.
  std::vector<Block<T>>& blocks() noexcept { return h_; }
  /// The final LayerNorm.
  LayerNorm<T>& ln_f() noexcept { return ln_f_; }
  /// The LM head (tied to wte).
  LMHead<T>& lm_head() noexcept { return lm_head_; }

 private:
  LayerInit init(std::uint64_t seed) const {
    return LayerInit{.prefix = "", .seed = seed, .std = 0.02, .n_layer = static_cast<int>(config_.n_layer)};
  }

  GPTConfig config_;
  GPTEmbedding<T> embedding_;
  std::vector<Block<T>> h_;
  LayerNorm<T> ln_f_;
  LMHead<T> lm_head_;
};

}  // namespace tessera::nn
