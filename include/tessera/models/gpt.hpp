#pragma once
/// @file
/// GPT-2 (Radford et al. 2019) described once, as a sequence of layers: GPTEmbedding (wte +
/// wpe), n_layer nn::Block, GPTHead (ln_f and the LM head tied to wte). Every form of it comes
/// from this one description through the generic policies (parallel/hybrid/sequential_model.hpp):
/// the serial model `GPT` (SequentialModel), its pipeline stages (SerialStage,
/// make_gpt_pipeline_stage), its tensor-parallel form with or without sequence parallelism
/// (TensorParallelGPT = TensorParallelModel), and Hybrid's stages (sequential_stages). Hugging
/// Face parameter names, so checkpoints interoperate.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/gpt_embedding.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/lm_head.hpp"
#include "tessera/parallel/tensor/dropout.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/hybrid/sequential_model.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/parallel/tensor/tensor_parallel_layer.hpp"
#include "tessera/parallel/tensor/tensor_parallel_plan.hpp"
#include "tessera/parallel/tensor/vocab_parallel_embedding.hpp"

namespace tessera {

/// Sizes of a GPT-2 model. Defaults are GPT-2 small (124M parameters).
struct GPTConfig {
  std::int64_t vocab_size = 50257;  ///< tokens in the vocabulary
  std::int64_t n_positions = 1024;  ///< longest sequence (rows of the position table)
  std::int64_t n_layer = 12;        ///< transformer blocks
  std::int64_t n_head = 12;         ///< attention heads per block
  std::int64_t d_model = 768;       ///< width (Hugging Face `n_embd`)
  /// Dropout probability on the embeddings (Hugging Face `embd_pdrop`; 0: none). Not part of
  /// the architecture: checkpoints do not record it.
  double embd_pdrop = 0.0;
};

/// `c` itself, after checking it: throws tessera::Error naming the values when a size is not
/// positive or n_head does not divide d_model.
inline GPTConfig validated(const GPTConfig& c) {
  TESSERA_EXPECTS(c.vocab_size > 0 && c.n_positions > 0 && c.n_layer > 0 && c.n_head > 0 && c.d_model > 0,
                  "GPTConfig: sizes must be positive: vocab_size=", c.vocab_size, " n_positions=", c.n_positions,
                  " n_layer=", c.n_layer, " n_head=", c.n_head, " d_model=", c.d_model);
  TESSERA_EXPECTS(c.d_model % c.n_head == 0, "GPTConfig: n_head ", c.n_head, " does not divide d_model ", c.d_model);
  TESSERA_EXPECTS(c.embd_pdrop >= 0.0 && c.embd_pdrop < 1.0, "GPTConfig: embd_pdrop ", c.embd_pdrop,
                  " is outside [0, 1)");
  return c;
}

/// GPT-2's first layer: the embedding (nn::GPTEmbedding: wte[tokens] + wpe[positions]), then
/// dropout with probability embd_pdrop (Hugging Face's `drop`), whose masks follow the
/// thread's BatchPosition (the step and the global row), so every layout draws the single-rank
/// run's masks; the identity in evaluation. Tensor-parallel form: VocabParallelGPTEmbedding.
///
/// tokens: (B, T) int32 -> (B, T, d).
template <std::floating_point T>
class GPTInput {
 public:
  using Input = Tensor<std::int32_t>;  ///< tokens: (B, T)
  /// What backward needs: the embedding's and the dropout's contexts.
  struct Context {
    typename nn::GPTEmbedding<T>::Context embedding;  ///< the lookups'
    typename Dropout<T>::Context drop;                ///< the mask
  };
  /// The embedding and its dropout.
  GPTInput(nn::GPTEmbedding<T> embedding, Dropout<T> drop) : embedding_(std::move(embedding)), drop_(std::move(drop)) {}

  /// Embeddings, dropped out. Throws what nn::GPTEmbedding throws.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<std::int32_t>& tokens) const {
    auto [h, ce] = embedding_.forward(tokens);
    auto [y, cd] = drop_.forward(h);
    return {std::move(y), Context{std::move(ce), std::move(cd)}};
  }
  /// Accumulates wte's and wpe's gradients.
  NoGrad backward(const Tensor<T>& dy, const Context& ctx) {
    return embedding_.backward(drop_.backward(dy, ctx.drop), ctx.embedding);
  }
  /// wte.weight, wpe.weight.
  ParameterList<T> parameters() { return embedding_.parameters(); }
  /// The embedding.
  nn::GPTEmbedding<T>& embedding() noexcept { return embedding_; }
  /// The dropout.
  const Dropout<T>& dropout() const noexcept { return drop_; }

 private:
  nn::GPTEmbedding<T> embedding_;
  Dropout<T> drop_;
};

/// GPT-2's last layer: ln_f, then logits = x W^T with W the token embedding "wte.weight"
/// [vocab_size, d] (the tied LM head; Press and Wolf 2017). Built alone it holds its own copy
/// of wte, initialized as the embedding's (same seed stream); in one model or stage with the
/// embedding the description ties the two into one parameter.
///
/// Tensor-parallel plan: ln_f replicated, the LM head column-parallel over the vocabulary (its
/// rows of the table padded to a multiple of tp, as the vocab-parallel embedding's), the logits
/// left split over the vocabulary (tp_output) for VocabParallelCrossEntropy.
///
/// x: (B, T, d) -> logits: (B, T, vocab_size).
template <std::floating_point T>
class GPTHead {
 public:
  using Input = Tensor<T>;     ///< x: (B, T, d)
  using tp_output = Shard<-1>;  ///< under tp: this rank's vocabulary columns of the logits
  /// What backward needs: both sub-layers' contexts.
  struct Context {
    typename nn::LayerNorm<T>::Context ln_f;    ///< the final LayerNorm's
    typename nn::LMHead<T>::Context lm_head;    ///< the head's
  };

  /// A head of width `d_model` over `vocab_size` tokens, initialized from `init` (its ln_f
  /// from "ln_f", its weight from "wte", as the embedding's).
  GPTHead(std::int64_t vocab_size, std::int64_t d_model, const nn::LayerInit& init)
      : ln_f_(d_model, init.child("ln_f")), lm_head_(nn::Embedding<T>(vocab_size, d_model, init.child("wte")).weight()) {}

  /// The logits. Throws tessera::Error naming the shapes when x's last dim is not d.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    auto [h, c1] = ln_f_.forward(x);
    auto [y, c2] = lm_head_.forward(h);
    return {std::move(y), Context{std::move(c1), std::move(c2)}};
  }
  /// dx from dlogits; accumulates ln_f's and the head weight's gradients.
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) {
    return ln_f_.backward(lm_head_.backward(dy, ctx.lm_head), ctx.ln_f);
  }
  /// ln_f.weight, ln_f.bias, wte.weight (the head's weight).
  ParameterList<T> parameters() {
    ParameterList<T> ps = ln_f_.parameters();
    ps.append(lm_head_.parameters());
    return ps;
  }
  /// The final LayerNorm.
  nn::LayerNorm<T>& ln_f() noexcept { return ln_f_; }
  /// The LM head.
  nn::LMHead<T>& lm_head() noexcept { return lm_head_; }
  /// ln_f (replicated), lm_head (column-parallel over the vocabulary).
  static constexpr auto tp_plan = tp::plan(tp::replicate(&GPTHead::ln_f), tp::column(&GPTHead::lm_head));

 private:
  nn::LayerNorm<T> ln_f_;
  nn::LMHead<T> lm_head_;
};

/// GPT-2 described as a sequence of layers (SequentialModelDescription): layer 0 the
/// embedding and its dropout (GPTInput: tokens (B, T) int32 -> (B, T, d)), layers 1..n_layer the blocks
/// "h.{i}" (nn::Block), layer n_layer + 1 the head (GPTHead -> logits (B, T, vocab_size)), the
/// head's weight tied to "wte.weight". Each layer initialized as GPT-2 from `seed` (LayerInit:
/// normal(0, 0.02), residual projections scaled by 1 / sqrt(2 n_layer)), keyed by parameter
/// name, so any layer built anywhere holds the same values.
template <std::floating_point T>
struct GPTDescription {
  using First = GPTInput<T>;          ///< wte + wpe, dropout
  using Block = nn::Block<T>;         ///< a pre-LN transformer block
  using Last = GPTHead<T>;            ///< ln_f + the tied LM head

  GPTConfig config;       ///< the sizes
  std::uint64_t seed = 0;  ///< the seed of every parameter's random stream

  /// The description of GPT-2 with `config` and `seed`. Throws tessera::Error naming the values
  /// when a size is not positive or n_head does not divide d_model.
  GPTDescription(const GPTConfig& c, std::uint64_t s = 0) : config(validated(c)), seed(s) {}

  /// n_layer.
  int num_blocks() const noexcept { return static_cast<int>(config.n_layer); }
  /// The embedding.
  First first() const {
    return First(nn::GPTEmbedding<T>(config.vocab_size, config.n_positions, config.d_model, init()),
                 Dropout<T>(config.embd_pdrop, init().child("drop")));
  }
  /// Block h.{i}.
  Block block(int i) const { return Block(config.d_model, config.n_head, init().child("h." + std::to_string(i))); }
  /// The head.
  Last last() const { return Last(config.vocab_size, config.d_model, init()); }
  /// The LM head's weight is the token embedding.
  std::vector<std::string> tied_parameter_names() const { return {"wte.weight"}; }
  /// "embedding", "h.0", ..., "head".
  std::vector<std::string> layer_names() const {
    std::vector<std::string> names{"embedding"};
    for (std::int64_t i = 0; i < config.n_layer; ++i) names.push_back("h." + std::to_string(i));
    names.push_back("head");
    return names;
  }
  /// Throws tessera::Error naming both when tp does not divide n_head.
  void check_tensor_parallel(int tp_size) const {
    TESSERA_EXPECTS(config.n_head % tp_size == 0, "GPT: n_head ", config.n_head, " is not divisible by the tp size ",
                    tp_size);
  }

 private:
  nn::LayerInit init() const {
    return nn::LayerInit{.prefix = "", .seed = seed, .std = 0.02, .n_layer = static_cast<int>(config.n_layer)};
  }
};

/// GPT-2 on one rank: the serial model of GPTDescription (x = wte[tokens] + wpe[positions];
/// n_layer pre-LN blocks; ln_f; logits = x wte^T). Parameters in Hugging Face GPT2Model
/// order: "wte.weight", "wpe.weight", "h.{i}.ln_1.*", "h.{i}.attn.c_attn.*" ([d, 3d]),
/// "h.{i}.attn.c_proj.*", "h.{i}.ln_2.*", "h.{i}.mlp.c_fc.*", "h.{i}.mlp.c_proj.*",
/// "ln_f.weight", "ln_f.bias"; the tied head adds none.
///
/// tokens: (B, T) int32 -> logits: (B, T, vocab_size). Pair it with nn::CrossEntropy.
template <std::floating_point T>
class GPT : public SequentialModel<GPTDescription<T>> {
 public:
  /// GPT-2 with `config`, initialized from `seed`. Throws tessera::Error naming the values when
  /// a size is not positive or n_head does not divide d_model.
  explicit GPT(const GPTConfig& config, std::uint64_t seed = 0)
      : SequentialModel<GPTDescription<T>>(GPTDescription<T>(config, seed)), config_(config) {}
  /// The sizes.
  const GPTConfig& config() const noexcept { return config_; }
  /// The LM head (its weight is wte.weight).
  nn::LMHead<T>& lm_head() { return this->last().lm_head(); }

 private:
  GPTConfig config_;
};

/// GPT-2 run tensor-parallel over tp (the whole model at pp = 1): TensorParallelModel of
/// GPTDescription. `Layout` = Shard<1> turns on sequence parallelism. tokens (B, T) int32, the
/// same on every tp rank -> logits (B, T, V_pad / tp), Shard<-1>. Collective over tp.
template <std::floating_point T, class Layout = Replicate>
using TensorParallelGPT = TensorParallelModel<GPTDescription<T>, Layout>;

/// Number of pipeline layers of a GPT: n_layer + 2 (the embedding, the blocks, the head).
inline int gpt_pipeline_num_layers(const GPTConfig& config) { return static_cast<int>(config.n_layer) + 2; }

/// The pipeline layers' names: "embedding", "h.0", ..., "head".
inline std::vector<std::string> gpt_pipeline_layer_names(const GPTConfig& config) {
  return GPTDescription<float>(config).layer_names();
}

/// The parameter count of each pipeline layer, for StagePartition::balanced: embedding
/// (vocab + n_positions) d; block 12 d^2 + 13 d; head 2 d + vocab d (ln_f, and the copy of the
/// tied wte a last stage holds; its GEMM costs as much as the parameter count suggests).
inline std::vector<double> gpt_pipeline_layer_costs(const GPTConfig& config) {
  const double d = static_cast<double>(config.d_model), v = static_cast<double>(config.vocab_size),
               p = static_cast<double>(config.n_positions);
  std::vector<double> costs{(v + p) * d};
  for (std::int64_t i = 0; i < config.n_layer; ++i) costs.push_back(12 * d * d + 13 * d);
  costs.push_back(2 * d + v * d);
  return costs;
}

/// The GPT's pipeline layers cut into `num_stages` stages balanced by parameter count. Throws
/// tessera::Error when there are more stages than layers (n_layer + 2).
inline StagePartition gpt_balanced_partition(const GPTConfig& config, int num_stages) {
  return StagePartition::balanced(gpt_pipeline_layer_costs(config), num_stages, gpt_pipeline_layer_names(config));
}

/// Stage `stage` of `partition` of GPT(config, seed), serial layers, as an owned PipelineStage
/// (PipelineParallel's stages; make_serial_stage of GPTDescription). Throws tessera::Error if the
/// partition cuts another number of layers than n_layer + 2.
template <std::floating_point T>
auto make_gpt_pipeline_stage(const GPTConfig& config, std::uint64_t seed, const StagePartition& partition, int stage) {
  TESSERA_EXPECTS(partition.num_layers() == gpt_pipeline_num_layers(config), "make_gpt_pipeline_stage: the partition cuts ",
                  partition.num_layers(), " layers, but a GPT with n_layer=", config.n_layer, " has ",
                  gpt_pipeline_num_layers(config), " pipeline layers (embedding, blocks, head)");
  return make_serial_stage(GPTDescription<T>(config, seed), partition, stage);
}


/// The tensor-parallel form of GPT-2's embedding: wte split over the vocabulary
/// (VocabParallelEmbedding, padded to a multiple of tp), wpe replicated; under sequence
/// parallelism (Layout Shard<1>) the sum is reduce-scattered along T and each rank adds the
/// rows of its own positions (wpe's gradient then partial over tp: sequence_parallel_parameters).
/// Then the dropout, in the replicated region (the same mask on every tp rank) or the
/// sequence-parallel one (each rank the mask's rows of its positions): the serial mask.
/// tokens (B, T) int32, the same on every tp rank -> (B, T, d), or (B, T / tp, d). Collective
/// over tp.
template <std::floating_point T, class Layout>
class VocabParallelGPTEmbedding {
  static constexpr bool sp = std::same_as<Layout, Shard<1>>;
  using Wte = VocabParallelEmbedding<T, VocabParallelEmbeddingOptions{.sequence_parallel = sp}>;

 public:
  using Input = Tensor<std::int32_t>;  ///< tokens: (B, T)
  using OutputLayout = Layout;         ///< Replicate, or Shard<1> under sequence parallelism
  /// What backward needs: both lookups' contexts.
  struct Context {
    typename Wte::Context wte;               ///< token lookup
    typename nn::Embedding<T>::Context wpe;  ///< this rank's positions
    typename Dropout<T>::Context drop;       ///< the dropout mask of this rank's positions
  };

  /// This rank's form of `serial` (and its dropout). Collective over tp.
  VocabParallelGPTEmbedding(nn::GPTEmbedding<T>& serial, Comm tp, Dropout<T> drop = Dropout<T>())
      : tp_(tp), wte_(serial.wte(), std::move(tp)), wpe_(std::move(serial.wpe())), drop_(std::move(drop)) {}

  /// Embeddings of this rank's positions. Throws tessera::Error when tokens is not (B, T), T
  /// exceeds n_positions or (sequence parallelism) is not divisible by tp, or a token is outside
  /// the vocabulary.
  ForwardResult<Tensor<T>, Context> forward(const Tensor<std::int32_t>& tokens) {
    TESSERA_EXPECTS(tokens.rank() == 2, "GPT: tokens of shape ", tokens.shape(), " are not (B, T)");
    const std::int64_t B = tokens.size(0), Tn = tokens.size(1), d = wte_.dim();
    TESSERA_EXPECTS(Tn <= wpe_.num_embeddings(), "GPT: sequence length ", Tn,
                    " exceeds the position table n_positions=", wpe_.num_embeddings());
    if constexpr (sp)
      TESSERA_EXPECTS(Tn % tp_.size() == 0, "GPT: sequence length ", Tn, " is not divisible by the tp size ", tp_.size(),
                      " (sequence parallelism)");
    auto [e, ce] = wte_.forward(tokens);
    const std::int64_t local_t = e.value.size(1), t0 = sp ? local_t * tp_.rank() : 0;
    Tensor<std::int32_t> pos = Tensor<std::int32_t>::empty(Shape{local_t});
    for (std::int64_t t = 0; t < local_t; ++t) pos.data()[t] = static_cast<std::int32_t>(t0 + t);
    auto [p, cp] = wpe_.forward(pos);
    for (std::int64_t b = 0; b < B; ++b) e.value.slice(0, b, b + 1).reshape(Shape{local_t, d}).add_(p);
    const ShardInfo where{.region = sp ? ShardInfo::Region::sequence_parallel : ShardInfo::Region::replicated,
                          .rank = tp_.rank(), .size = tp_.size()};
    auto [y, cd] = drop_.forward(e.value, where);
    return {std::move(y), Context{std::move(ce), std::move(cp), std::move(cd)}};
  }
  /// Accumulates both tables' gradients from dx (this rank's positions). Collective over tp
  /// under sequence parallelism.
  NoGrad backward(const Tensor<T>& dy, const Context& ctx) {
    const Tensor<T> dx = drop_.backward(dy, ctx.drop);
    const std::int64_t B = dx.size(0), local_t = dx.size(1), d = dx.size(2);
    Tensor<T> dp(Shape{local_t, d});
    for (std::int64_t b = 0; b < B; ++b) dp.add_(dx.slice(0, b, b + 1).contiguous().reshape(Shape{local_t, d}));
    wpe_.backward(dp, ctx.wpe);
    wte_.backward(Activation<Tensor<T>, Layout>{dx}, ctx.wte);
    return {};
  }
  /// wte.weight (this rank's vocabulary rows), wpe.weight.
  ParameterList<T> parameters() { return {&wte_.weight(), &wpe_.weight()}; }
  /// Under sequence parallelism wpe.weight (each rank saw its own positions); else none.
  ParameterList<T> sequence_parallel_parameters() {
    if constexpr (sp) return {&wpe_.weight()};
    else return {};
  }

 private:
  Comm tp_;
  Wte wte_;
  nn::Embedding<T> wpe_;
  Dropout<T> drop_;
};

/// GPT-2's embedding runs as VocabParallelGPTEmbedding.
template <std::floating_point T, class Layout>
struct TensorParallelLayer<nn::GPTEmbedding<T>, Layout> {
  using type = VocabParallelGPTEmbedding<T, Layout>;  ///< the tensor-parallel form
  /// This rank's form of `serial`.
  static type make(nn::GPTEmbedding<T> serial, Comm tp) { return type(serial, std::move(tp)); }
};

/// GPT-2's first layer (embedding and dropout) runs as VocabParallelGPTEmbedding.
template <std::floating_point T, class Layout>
struct TensorParallelLayer<GPTInput<T>, Layout> {
  using type = VocabParallelGPTEmbedding<T, Layout>;  ///< the tensor-parallel form
  /// This rank's form of `serial`.
  static type make(GPTInput<T> serial, Comm tp) { return type(serial.embedding(), std::move(tp), serial.dropout()); }
};

}  // namespace tessera
