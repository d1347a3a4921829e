#pragma once
/// @file
/// The reference GPT (nn::GPT) cut into pipeline stages: GPTPipelineStage holds a consecutive
/// run of the GPT's pipeline layers -- embedding, blocks h.0 .. h.{n-1}, head (ln_f + LM head
/// tied to wte) -- initialized exactly as nn::GPT from the same seed.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/gpt.hpp"
#include "tessera/nn/gpt_embedding.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/lm_head.hpp"
#include "tessera/parallel/pipeline_stage.hpp"
#include "tessera/parallel/stage_partition.hpp"

namespace tessera {

/// Number of pipeline layers of a GPT: n_layer + 2 (layer 0 the embedding wte + wpe, layers
/// 1..n_layer the blocks h.0..h.{n_layer-1}, layer n_layer + 1 the head: ln_f and the LM head).
inline int gpt_pipeline_num_layers(const nn::GPTConfig& config) { return static_cast<int>(config.n_layer) + 2; }

/// The pipeline layers' names: "embedding", "h.0", ..., "head".
inline std::vector<std::string> gpt_pipeline_layer_names(const nn::GPTConfig& config) {
  std::vector<std::string> names{"embedding"};
  for (std::int64_t i = 0; i < config.n_layer; ++i) names.push_back("h." + std::to_string(i));
  names.push_back("head");
  return names;
}

/// The parameter count of each pipeline layer, for StagePartition::balanced: embedding
/// (vocab + n_positions) d; block 12 d^2 + 13 d; head 2 d + vocab d (ln_f, and the copy of the
/// tied wte a last stage holds; its GEMM costs as much as the parameter count suggests).
inline std::vector<double> gpt_pipeline_layer_costs(const nn::GPTConfig& config) {
  const double d = static_cast<double>(config.d_model), v = static_cast<double>(config.vocab_size),
               p = static_cast<double>(config.n_positions);
  std::vector<double> costs{(v + p) * d};
  for (std::int64_t i = 0; i < config.n_layer; ++i) costs.push_back(12 * d * d + 13 * d);
  costs.push_back(2 * d + v * d);
  return costs;
}

/// A consecutive run [first_layer, end_layer) of a GPT's pipeline layers (see
/// gpt_pipeline_num_layers) as one pipeline stage, with the parameters, names and initial
/// values of nn::GPT(config, seed).
///
/// The stage holding layer 0 takes tokens (b, T) int32 and holds wte and wpe; the stage holding
/// the head outputs logits (b, T, vocab_size); the others map (b, T, d) to (b, T, d). When one
/// stage holds both the embedding and the head, the head shares wte (as nn::GPT); otherwise the
/// last stage holds its own copy "wte.weight", initialized identically, and both copies are
/// tied_parameters() so that the pipeline sums their gradients (Megatron-LM's embedding group)
/// and they stay bitwise identical.
template <std::floating_point T>
class GPTPipelineStage final : public PipelineStage<T, Tensor<std::int32_t>> {
 public:
  /// What backward needs: the contexts of the layers this stage holds.
  struct Context {
    std::optional<typename nn::GPTEmbedding<T>::Context> embedding;  ///< if it holds the embedding
    std::vector<typename nn::Block<T>::Context> h;                   ///< one per block held
    std::optional<typename nn::LayerNorm<T>::Context> ln_f;          ///< if it holds the head
    std::optional<typename nn::LMHead<T>::Context> lm_head;          ///< if it holds the head
  };

  /// Pipeline layers [first_layer, end_layer) of nn::GPT(config, seed). Throws Error naming the
  /// values when a size of config is not positive, n_head does not divide d_model, or the range
  /// is empty or outside [0, gpt_pipeline_num_layers(config)).
  GPTPipelineStage(const nn::GPTConfig& config, std::uint64_t seed, int first_layer, int end_layer)
      : config_(nn::validated(config)), first_(first_layer), end_(end_layer) {
    const int n = gpt_pipeline_num_layers(config);
    TESSERA_EXPECTS(0 <= first_layer && first_layer < end_layer && end_layer <= n, "GPTPipelineStage: layers [",
                    first_layer, ", ", end_layer, ") are not a non-empty range of the GPT's ", n,
                    " pipeline layers [0, ", n, ")");
    const nn::LayerInit init{.prefix = "", .seed = seed, .std = 0.02, .n_layer = static_cast<int>(config.n_layer)};
    if (first_layer == 0) embedding_.emplace(config.vocab_size, config.n_positions, config.d_model, init);
    for (int l = std::max(first_layer, 1); l < std::min(end_layer, n - 1); ++l)
      h_.emplace_back(config.d_model, config.n_head, init.child("h." + std::to_string(l - 1)));
    if (end_layer == n) {
      ln_f_.emplace(config.d_model, init.child("ln_f"));
      if (embedding_) {
        lm_head_.emplace(embedding_->wte().weight());
      } else {
        wte_.emplace(config.vocab_size, config.d_model, init.child("wte"));  // "wte.weight", same values
        lm_head_.emplace(wte_->weight());
      }
    }
  }

  /// The embedding (and the rest of the stage) on tokens (b, T). Throws Error if this stage
  /// does not hold the embedding, or as nn::GPTEmbedding for bad tokens.
  StageOutput<T> forward_first(const Tensor<std::int32_t>& tokens) override {
    TESSERA_EXPECTS(embedding_.has_value(), "GPTPipelineStage ", name(), " does not hold the embedding; it takes activations");
    Context ctx;
    auto [x, ce] = embedding_->forward(tokens);
    ctx.embedding = std::move(ce);
    return finish(std::move(x), std::move(ctx));
  }
  /// The stage on activations (b, T, d). Throws Error if this stage holds the embedding.
  StageOutput<T> forward(const Tensor<T>& x) override {
    TESSERA_EXPECTS(!embedding_.has_value(), "GPTPipelineStage ", name(), " holds the embedding; it takes tokens");
    return finish(x, Context{});
  }
  /// Backward through the held layers; returns dx (b, T, d), or an empty tensor for the stage
  /// holding the embedding.
  Tensor<T> backward(const Tensor<T>& dy, StageContext& sctx) override {
    Context& ctx = sctx.get<Context>();
    Tensor<T> d = dy;
    if (lm_head_) d = ln_f_->backward(lm_head_->backward(d, *ctx.lm_head), *ctx.ln_f);
    for (std::size_t i = h_.size(); i-- > 0;) d = h_[i].backward(d, ctx.h[i]);
    if (embedding_) {
      embedding_->backward(d, *ctx.embedding);
      return Tensor<T>();
    }
    return d;
  }
  /// (b, T) -> (b, T, d) with the embedding, (b, T, d) -> (b, T, d) without, last dim
  /// vocab_size with the head. Throws Error for another input rank or width.
  Shape output_shape(const Shape& input) override {
    Shape out = input;
    if (embedding_) {
      TESSERA_EXPECTS(input.rank() == 2, "GPTPipelineStage ", name(), ": tokens of shape ", input, " are not (B, T)");
      out = Shape{input[0], input[1], config_.d_model};
    } else {
      TESSERA_EXPECTS(input.rank() == 3 && input[2] == config_.d_model, "GPTPipelineStage ", name(),
                      ": input of shape ", input, " is not (B, T, ", config_.d_model, ")");
    }
    if (lm_head_) out = out.with(-1, config_.vocab_size);
    return out;
  }
  /// wte, wpe (with the embedding), the blocks' parameters, ln_f, and the own copy of wte
  /// (with the head but not the embedding), each once.
  ParameterList<T> parameters() override {
    ParameterList<T> ps;
    if (embedding_) ps.append(embedding_->parameters());
    for (nn::Block<T>& b : h_) ps.append(b.parameters());
    if (ln_f_) ps.append(ln_f_->parameters());
    if (wte_) ps.append(wte_->parameters());
    return ps;
  }
  /// wte on a first stage without the head, the copy of wte on a last stage without the
  /// embedding; empty otherwise.
  ParameterList<T> tied_parameters() override {
    if (embedding_ && !lm_head_) return {&embedding_->wte().weight()};
    if (wte_) return {&wte_->weight()};
    return {};
  }
  /// "layers 0-2 (embedding .. h.1)".
  std::string name() const override {
    const std::vector<std::string> names = gpt_pipeline_layer_names(config_);
    if (first_ + 1 == end_) return tessera::detail::str("layer ", first_, " (", names[static_cast<std::size_t>(first_)], ")");
    return tessera::detail::str("layers ", first_, "-", end_ - 1, " (", names[static_cast<std::size_t>(first_)], " .. ",
                                names[static_cast<std::size_t>(end_ - 1)], ")");
  }

  /// Whether this stage holds the embedding (layer 0).
  bool has_embedding() const noexcept { return embedding_.has_value(); }
  /// Whether this stage holds the head (the last layer).
  bool has_head() const noexcept { return lm_head_.has_value(); }
  /// The blocks held, in order.
  std::vector<nn::Block<T>>& blocks() noexcept { return h_; }

 private:
  StageOutput<T> finish(Tensor<T> x, Context ctx) {
    ctx.h.reserve(h_.size());
    for (const nn::Block<T>& b : h_) {
      auto [y, cb] = b.forward(x);
      ctx.h.push_back(std::move(cb));
      x = std::move(y);
    }
    if (lm_head_) {
      auto [xf, cf] = ln_f_->forward(x);
      ctx.ln_f = std::move(cf);
      auto [logits, cl] = lm_head_->forward(xf);
      ctx.lm_head = std::move(cl);
      x = std::move(logits);
    }
    return StageOutput<T>{x.contiguous(), StageContext::hold(std::move(ctx))};
  }

  nn::GPTConfig config_;
  int first_, end_;
  std::optional<nn::GPTEmbedding<T>> embedding_;
  std::vector<nn::Block<T>> h_;
  std::optional<nn::LayerNorm<T>> ln_f_;
  std::optional<nn::Embedding<T>> wte_;  // the last stage's own copy of the tied weight
  std::optional<nn::LMHead<T>> lm_head_;
};

/// Stage `stage` of `partition` (over gpt_pipeline_num_layers(config) layers) of
/// nn::GPT(config, seed), as an owned PipelineStage. Throws Error if the partition has another
/// number of layers, or as GPTPipelineStage.
template <std::floating_point T>
std::unique_ptr<PipelineStage<T, Tensor<std::int32_t>>> make_gpt_pipeline_stage(const nn::GPTConfig& config,
                                                                                 std::uint64_t seed,
                                                                                 const StagePartition& partition,
                                                                                 int stage) {
  TESSERA_EXPECTS(partition.num_layers() == gpt_pipeline_num_layers(config), "make_gpt_pipeline_stage: the partition cuts ",
                  partition.num_layers(), " layers, but a GPT with n_layer=", config.n_layer, " has ",
                  gpt_pipeline_num_layers(config), " pipeline layers (embedding, blocks, head)");
  return std::make_unique<GPTPipelineStage<T>>(config, seed, partition.begin(stage), partition.end(stage));
}

}  // namespace tessera
