#pragma once
/// @file
/// TensorParallelGPTStage: a consecutive run of a GPT's pipeline layers (embedding, blocks,
/// head) run tensor-parallel over the tp ranks of its pipeline stage -- the stage type of
/// Hybrid's GPT (Megatron-LM's GPTModel with pre_process / post_process: the first stage
/// holds the vocab-parallel embedding, the last the LM head tied to its own copy of it).

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/gpt.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/lm_head.hpp"
#include "tessera/parallel/column_parallel.hpp"
#include "tessera/parallel/layouts.hpp"
#include "tessera/parallel/pipeline_gpt.hpp"
#include "tessera/parallel/pipeline_loss.hpp"
#include "tessera/parallel/pipeline_stage.hpp"
#include "tessera/parallel/stage_partition.hpp"
#include "tessera/parallel/tensor_parallel.hpp"
#include "tessera/parallel/vocab_parallel_cross_entropy.hpp"
#include "tessera/parallel/vocab_parallel_embedding.hpp"

namespace tessera {

/// Pipeline layers [first_layer, end_layer) of nn::GPT(config, seed) (see
/// gpt_pipeline_num_layers: 0 the embedding, 1..n_layer the blocks, n_layer + 1 the head) as
/// one pipeline stage, tensor-parallel over the ranks of `tp` as TensorParallelGPT runs them:
/// wte a VocabParallelEmbedding (vocabulary padded to a multiple of tp), wpe replicated, the
/// blocks TensorParallel<nn::Block> (one all-reduce per attention and per MLP each way), ln_f
/// replicated, the LM head a ColumnParallel nn::LMHead tied to a wte shard whose logits stay
/// split over the vocabulary (use VocabParallelGPTLoss on them).
///
/// Shapes: the stage holding the embedding takes tokens (b, T) int32 (the same on every tp
/// rank); activations between stages are (b, T, d), replicated over tp; the stage holding the
/// head outputs logits (b, T, V_pad / tp). Each parameter is the slice of nn::GPT's init for
/// the same seed, whatever tp and the cut are. A last stage without the embedding holds its
/// own copy of the wte shard ("wte.weight"), listed in tied_parameters() so that the pipeline
/// sums both copies' gradients (Megatron-LM's embedding group, per tp rank).
///
/// Collective over `tp`: every tp rank of the stage builds it with the same arguments and runs
/// the same forwards and backwards. Throws tessera::Error naming the values when a size of
/// config is not positive, n_head does not divide d_model, tp does not divide n_head, or the
/// layer range is empty or outside the model.
template <std::floating_point T>
class TensorParallelGPTStage final : public PipelineStage<T, Tensor<std::int32_t>> {
 public:
  using Wte = VocabParallelEmbedding<T>;                    ///< the token embedding shard
  using BlockType = TensorParallel<nn::Block<T>, Replicate>;  ///< a tensor-parallel block
  using Head = ColumnParallel<nn::LMHead<T>>;               ///< the tied LM head

  /// What backward needs: the contexts of the layers this stage holds.
  struct Context {
    std::optional<typename Wte::Context> wte;             ///< token lookup (first stage)
    std::optional<typename nn::Embedding<T>::Context> wpe;  ///< position lookup (first stage)
    std::vector<typename BlockType::Context> h;           ///< one per block held
    std::optional<typename nn::LayerNorm<T>::Context> ln_f;  ///< final LayerNorm (last stage)
    std::optional<typename Head::Context> lm_head;        ///< LM head (last stage)
  };

  /// Layers [first_layer, end_layer) of nn::GPT(config, seed), this tp rank's shards.
  TensorParallelGPTStage(const nn::GPTConfig& config, std::uint64_t seed, int first_layer, int end_layer, Comm tp)
      : tp_(std::move(tp)), config_(checked(config, tp_.size())), first_(first_layer), end_(end_layer) {
    const int n = gpt_pipeline_num_layers(config);
    TESSERA_EXPECTS(0 <= first_layer && first_layer < end_layer && end_layer <= n, "TensorParallelGPTStage: layers [",
                    first_layer, ", ", end_layer, ") are not a non-empty range of the GPT's ", n,
                    " pipeline layers [0, ", n, ")");
    const nn::LayerInit init{.prefix = "", .seed = seed, .std = 0.02, .n_layer = static_cast<int>(config.n_layer)};
    const bool head = end_layer == n;
    if (first_layer == 0 || head) wte_.emplace(config.vocab_size, config.d_model, tp_, init.child("wte"));
    if (first_layer == 0) wpe_.emplace(config.n_positions, config.d_model, init.child("wpe"));
    h_.reserve(static_cast<std::size_t>(std::max(0, std::min(end_layer, n - 1) - std::max(first_layer, 1))));
    for (int l = std::max(first_layer, 1); l < std::min(end_layer, n - 1); ++l)
      h_.emplace_back(nn::Block<T>(config.d_model, config.n_head, init.child("h." + std::to_string(l - 1))), tp_,
                      TensorParallelOptions{.all_reduce_sequence_parallel_grads = false});
    if (head) {
      ln_f_.emplace(config.d_model, init.child("ln_f"));
      lm_head_.emplace(Head::from_shard(nn::LMHead<T>(wte_->weight()), tp_));
    }
  }
  TensorParallelGPTStage(const TensorParallelGPTStage&) = delete;             ///< the head points into wte
  TensorParallelGPTStage& operator=(const TensorParallelGPTStage&) = delete;  ///< not copyable

  /// The embedding (and the rest of the stage) on tokens (b, T). Collective over tp. Throws
  /// tessera::Error if this stage does not hold the embedding, T exceeds n_positions, or a
  /// token is outside the vocabulary.
  StageOutput<T> forward_first(const Tensor<std::int32_t>& tokens) override {
    TESSERA_EXPECTS(wpe_.has_value(), "TensorParallelGPTStage ", name(), " does not hold the embedding; it takes activations");
    TESSERA_EXPECTS(tokens.rank() == 2, "TensorParallelGPTStage: tokens of shape ", tokens.shape(), " are not (B, T)");
    const std::int64_t B = tokens.size(0), Tn = tokens.size(1), d = config_.d_model;
    TESSERA_EXPECTS(Tn <= config_.n_positions, "TensorParallelGPTStage: sequence length ", Tn,
                    " exceeds the position table n_positions=", config_.n_positions);
    Context ctx;
    auto [e, ce] = wte_->forward(tokens);  // (B, T, d), replicated after the all-reduce
    ctx.wte = std::move(ce);
    Tensor<std::int32_t> pos = Tensor<std::int32_t>::empty(Shape{Tn});
    for (std::int64_t t = 0; t < Tn; ++t) pos.data()[t] = static_cast<std::int32_t>(t);
    auto [p, cp] = wpe_->forward(pos);  // (T, d)
    ctx.wpe = std::move(cp);
    for (std::int64_t b = 0; b < B; ++b) e.value.slice(0, b, b + 1).reshape(Shape{Tn, d}).add_(p);
    return finish(std::move(e.value), std::move(ctx));
  }
  /// The stage on activations (b, T, d). Collective over tp. Throws tessera::Error if this
  /// stage holds the embedding.
  StageOutput<T> forward(const Tensor<T>& x) override {
    TESSERA_EXPECTS(!wpe_.has_value(), "TensorParallelGPTStage ", name(), " holds the embedding; it takes tokens");
    return finish(x, Context{});
  }
  /// Backward through the held layers from dy (the output's shape): returns dx (b, T, d), or
  /// an empty tensor on the stage holding the embedding. Collective over tp.
  Tensor<T> backward(const Tensor<T>& dy, StageContext& sctx) override {
    Context& ctx = sctx.get<Context>();
    Tensor<T> d = dy;
    if (lm_head_)
      d = ln_f_->backward(lm_head_->backward(Activation<Tensor<T>, Shard<-1>>{d}, *ctx.lm_head).value, *ctx.ln_f);
    for (std::size_t i = h_.size(); i-- > 0;)
      d = h_[i].backward(Activation<Tensor<T>, Replicate>{std::move(d)}, ctx.h[i]).value;
    if (wpe_) {
      const std::int64_t B = d.size(0), Tn = d.size(1), dm = d.size(2);
      Tensor<T> dp(Shape{Tn, dm});  // summed over the batch
      for (std::int64_t b = 0; b < B; ++b) dp.add_(d.slice(0, b, b + 1).contiguous().reshape(Shape{Tn, dm}));
      wpe_->backward(dp, *ctx.wpe);
      wte_->backward(Activation<Tensor<T>, Replicate>{std::move(d)}, *ctx.wte);
      return Tensor<T>();
    }
    return d;
  }
  /// (b, T) -> (b, T, d) with the embedding, (b, T, d) -> (b, T, d) without; the last dim is
  /// V_pad / tp with the head. Throws tessera::Error for another input rank or width.
  Shape output_shape(const Shape& input) override {
    Shape out = input;
    if (wpe_) {
      TESSERA_EXPECTS(input.rank() == 2, "TensorParallelGPTStage ", name(), ": tokens of shape ", input, " are not (B, T)");
      out = Shape{input[0], input[1], config_.d_model};
    } else {
      TESSERA_EXPECTS(input.rank() == 3 && input[2] == config_.d_model, "TensorParallelGPTStage ", name(),
                      ": input of shape ", input, " is not (B, T, ", config_.d_model, ")");
    }
    if (lm_head_) out = out.with(-1, padded_vocab_size() / tp_.size());
    return out;
  }
  /// This rank's parameters in Hugging Face order: wte.weight (its vocabulary rows), wpe.weight,
  /// the blocks', ln_f; a last stage without the embedding lists its copy of wte.weight last.
  ParameterList<T> parameters() override {
    ParameterList<T> ps;
    if (wpe_) ps.append(ParameterList<T>{&wte_->weight(), &wpe_->weight()});
    for (BlockType& b : h_) ps.append(b.parameters());
    if (ln_f_) ps.append(ln_f_->parameters());
    if (wte_ && !wpe_) ps.push_back(wte_->weight());
    return ps;
  }
  /// The wte shard on a first stage without the head, its copy on a last stage without the
  /// embedding; empty otherwise.
  ParameterList<T> tied_parameters() override {
    if (wte_ && (wpe_.has_value() != lm_head_.has_value())) return {&wte_->weight()};
    return {};
  }
  /// "layers 0-2 (embedding .. h.1), tp rank 0 of 2".
  std::string name() const override {
    const std::vector<std::string> names = gpt_pipeline_layer_names(config_);
    const std::string range =
        first_ + 1 == end_
            ? tessera::detail::str("layer ", first_, " (", names[static_cast<std::size_t>(first_)], ")")
            : tessera::detail::str("layers ", first_, "-", end_ - 1, " (", names[static_cast<std::size_t>(first_)], " .. ",
                                   names[static_cast<std::size_t>(end_ - 1)], ")");
    return tessera::detail::str(range, ", tp rank ", tp_.rank(), " of ", tp_.size());
  }

  /// Whether this stage holds the embedding (layer 0).
  bool has_embedding() const noexcept { return wpe_.has_value(); }
  /// Whether this stage holds the head (the last layer).
  bool has_head() const noexcept { return lm_head_.has_value(); }
  /// The vocabulary padded to a multiple of tp.
  std::int64_t padded_vocab_size() const noexcept { return Wte::padded_vocab_size(config_.vocab_size, tp_.size()); }
  /// The tp communicator.
  Comm& comm() noexcept { return tp_; }

 private:
  static nn::GPTConfig checked(const nn::GPTConfig& c, int tp_size) {
    nn::validated(c);
    TESSERA_EXPECTS(c.n_head % tp_size == 0, "TensorParallelGPTStage: n_head ", c.n_head,
                    " is not divisible by the tp size ", tp_size);
    return c;
  }
  StageOutput<T> finish(Tensor<T> x, Context ctx) {
    Activation<Tensor<T>, Replicate> a{std::move(x)};
    ctx.h.reserve(h_.size());
    for (BlockType& b : h_) {
      auto [y, cb] = b.forward(a);
      ctx.h.push_back(std::move(cb));
      a = std::move(y);
    }
    Tensor<T> out = std::move(a.value);
    if (lm_head_) {
      auto [xf, cf] = ln_f_->forward(out);
      ctx.ln_f = std::move(cf);
      auto [logits, cl] = lm_head_->forward(Activation<Tensor<T>, Replicate>{std::move(xf)});
      ctx.lm_head = std::move(cl);
      out = std::move(logits.value);
    }
    return StageOutput<T>{out.contiguous(), StageContext::hold(std::move(ctx))};
  }

  Comm tp_;
  nn::GPTConfig config_;
  int first_, end_;
  std::optional<Wte> wte_;  // the embedding's, or the last stage's copy
  std::optional<nn::Embedding<T>> wpe_;
  std::vector<BlockType> h_;
  std::optional<nn::LayerNorm<T>> ln_f_;
  std::optional<Head> lm_head_;
};

/// Stage `stage` of `partition` (over gpt_pipeline_num_layers(config) layers) of
/// nn::GPT(config, seed), tensor-parallel over `tp`, as an owned PipelineStage. Collective
/// over tp. Throws tessera::Error if the partition cuts another number of layers, or as
/// TensorParallelGPTStage.
template <std::floating_point T>
std::unique_ptr<PipelineStage<T, Tensor<std::int32_t>>> make_tensor_parallel_gpt_stage(const nn::GPTConfig& config,
                                                                                       std::uint64_t seed,
                                                                                       const StagePartition& partition,
                                                                                       int stage, Comm tp) {
  TESSERA_EXPECTS(partition.num_layers() == gpt_pipeline_num_layers(config), "make_tensor_parallel_gpt_stage: the partition cuts ",
                  partition.num_layers(), " layers, but a GPT with n_layer=", config.n_layer, " has ",
                  gpt_pipeline_num_layers(config), " pipeline layers (embedding, blocks, head)");
  return std::make_unique<TensorParallelGPTStage<T>>(config, seed, partition.begin(stage), partition.end(stage),
                                                     std::move(tp));
}

/// The pipeline loss of a tensor-parallel GPT's last stage: VocabParallelCrossEntropy (summed)
/// on the logits shard (b, T, V_pad / tp) and targets (b, T) int32, the same on every tp rank.
/// Collective over tp in forward (3 all-reduces of b x T values); copies share the loss.
/// Models PipelineLossFunction.
template <std::floating_point T>
class VocabParallelGPTLoss {
 public:
  using Context = typename VocabParallelCrossEntropy<T>::Context;  ///< what backward needs
  /// The loss over the global vocabulary of `vocab_size` entries split over `tp`. Throws
  /// tessera::Error when vocab_size is not positive.
  VocabParallelGPTLoss(std::int64_t vocab_size, Comm tp)
      : ce_(std::make_shared<VocabParallelCrossEntropy<T>>(std::move(tp), vocab_size,
                                                           VocabParallelCrossEntropyOptions{.reduction = nn::Reduction::sum})) {}
  /// The summed loss of the micro-batch (the same on every tp rank) and the context.
  ForwardResult<T, Context> forward(const Tensor<T>& logits, const Tensor<std::int32_t>& targets) const {
    return ce_->forward(Activation<Tensor<T>, Shard<-1>>{logits}, targets);
  }
  /// dlogits on this rank's vocabulary columns for `dloss` times the summed loss.
  Tensor<T> backward(T dloss, const Context& ctx) const { return ce_->backward(dloss, ctx).value; }
  /// Targets not equal to the ignore index (-100).
  std::int64_t count_valid(const Tensor<std::int32_t>& targets) const { return ce_->count_valid(targets); }

 private:
  std::shared_ptr<VocabParallelCrossEntropy<T>> ce_;
};

}  // namespace tessera
