#pragma once
/// @file
/// The Llama-style model described once (tessera::SequentialModelDescription), from the
/// layers of llama_layers.hpp: the token embedding, the decoder layers, and a head (final
/// RMSNorm, untied LM head). This description is all the glue the model needs. With it,
/// tessera's generic policies make the serial model (llama::Llama), the pipeline stages, the
/// tensor-parallel form (the head's logits split over the vocabulary) and Hybrid's stages at
/// any dp x pp x tp (tessera::sequential_stages), as they do for the GPT.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "llama_layers.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/hybrid/sequential_model.hpp"

namespace llama {

/// The last layer: norm, then the untied lm_head [d, V]. Under tp its logits stay split over
/// the vocabulary (tp_output), for tessera::VocabParallelCrossEntropy.
template <std::floating_point T>
struct Head {
  RMSNorm<T> norm;        ///< "model.norm"
  nn::Linear<T> lm_head;  ///< "lm_head", no bias
  using Input = Tensor<T>;             ///< x: (B, T, d)
  using tp_output = tessera::Shard<-1>;  ///< logits split over the vocabulary under tp
  /// norm replicated, lm_head column-parallel.
  static constexpr auto tp_plan = tp::plan(tp::replicate(&Head::norm), tp::column(&Head::lm_head));
  /// Both contexts.
  struct Context {
    typename RMSNorm<T>::Context norm;        ///< the norm's
    typename nn::Linear<T>::Context lm_head;  ///< the head's
  };
  /// logits: (B, T, V).
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    auto [h, c1] = norm.forward(x);
    auto [y, c2] = lm_head.forward(h);
    return {std::move(y), Context{std::move(c1), std::move(c2)}};
  }
  /// dx from dlogits.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    return norm.backward(lm_head.backward(dy, ctx.lm_head), ctx.norm);
  }
  /// model.norm.weight, lm_head.weight.
  ParameterList<T> parameters() {
    ParameterList<T> ps = norm.parameters();
    ps.append(lm_head.parameters());
    return ps;
  }
};

/// Llama(config, seed) as a sequence of layers: embed_tokens, model.layers.{i}, the head. Every
/// value is a function of (seed, parameter name), so a stage that builds some of the layers
/// holds the same values as the whole model.
template <std::floating_point T>
struct LlamaDescription {
  using First = nn::Embedding<T>;  ///< "model.embed_tokens"
  using Block = DecoderLayer<T>;   ///< "model.layers.{i}"
  using Last = Head<T>;            ///< "model.norm", "lm_head"
  LlamaConfig config;              ///< the sizes
  std::uint64_t seed = 0;          ///< the seed of every parameter's stream
  /// The description of Llama(config, seed). Throws tessera::Error naming the values when the
  /// config is invalid.
  LlamaDescription(const LlamaConfig& c, std::uint64_t s) : config(validated(c)), seed(s) {}
  /// n_layer.
  int num_blocks() const { return static_cast<int>(config.n_layer); }
  /// The token embedding.
  First first() const { return First(config.vocab_size, config.d_model, model_init(seed).child("model.embed_tokens")); }
  /// Decoder layer i.
  Block block(int i) const { return decoder_layer<T>(config, i, seed); }
  /// The head.
  Last last() const {
    return Last{RMSNorm<T>(config.d_model, model_init(seed).child("model.norm"), static_cast<T>(config.norm_eps)),
                nn::Linear<T>(config.d_model, config.vocab_size, model_init(seed).child("lm_head"), false)};
  }
  /// Throws tessera::Error naming the numbers when tp does not divide the heads, the KV heads,
  /// the MLP width or the vocabulary.
  void check_tensor_parallel(int tp) const {
    TESSERA_EXPECTS(config.n_head % tp == 0 && config.n_kv_head % tp == 0, "Llama: n_head ", config.n_head,
                    " and n_kv_head ", config.n_kv_head, " must both be divisible by tp ", tp,
                    " (a rank holds whole query heads and the KV heads they read)");
    TESSERA_EXPECTS(config.ffn_hidden % tp == 0 && config.vocab_size % tp == 0, "Llama: ffn_hidden ", config.ffn_hidden,
                    " and vocab_size ", config.vocab_size, " must both be divisible by tp ", tp);
  }
};

/// The serial Llama: tessera::SequentialModel of the description. tokens: (B, T) int32 ->
/// logits: (B, T, vocab_size); parameters in layer order with Hugging Face names.
template <std::floating_point T>
class Llama : public tessera::SequentialModel<LlamaDescription<T>> {
 public:
  /// Llama with `config`, initialized from `seed`. Throws tessera::Error naming the values
  /// when the config is invalid.
  explicit Llama(const LlamaConfig& config, std::uint64_t seed = 0)
      : tessera::SequentialModel<LlamaDescription<T>>(LlamaDescription<T>(config, seed)), config_(config) {}
  /// The sizes.
  const LlamaConfig& config() const noexcept { return config_; }
  /// The decoder layers.
  std::vector<DecoderLayer<T>>& layers() noexcept { return this->blocks(); }

 private:
  LlamaConfig config_;
};

}  // namespace llama
