#pragma once
/// @file
/// TensorParallelGPT: GPT-2 (nn::GPT) run tensor-parallel, optionally with sequence
/// parallelism: vocab-parallel token embedding, tensor-parallel blocks by their plans, and an
/// LM head tied to the embedding shard whose logits stay split over the vocabulary for
/// VocabParallelCrossEntropy (Megatron-LM's GPTModel; Shoeybi et al. 2019, Korthikanti et al.
/// 2022).

#include <concepts>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/gpt.hpp"
#include "tessera/nn/layer_init.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/lm_head.hpp"
#include "tessera/parallel/column_parallel.hpp"
#include "tessera/parallel/dropout.hpp"
#include "tessera/parallel/layouts.hpp"
#include "tessera/parallel/sharding.hpp"
#include "tessera/parallel/tensor_parallel.hpp"
#include "tessera/parallel/vocab_parallel_embedding.hpp"

namespace tessera {

/// Run-time options of TensorParallelGPT.
struct TensorParallelGPTOptions {
  /// Dropout probability on the embeddings (outside the tensor-parallel region: the same mask
  /// on every tp rank, and under sequence parallelism the unsharded model's mask). 0: none,
  /// so the model equals nn::GPT.
  double embd_dropout = 0.0;
};

/// GPT-2 over the ranks of `tp`, computing what nn::GPT(config, seed) computes:
/// x = wte[tokens] + wpe[positions] (wte a VocabParallelEmbedding over the vocabulary padded to
/// a multiple of tp, wpe replicated); n_layer TensorParallel<nn::Block> blocks; ln_f
/// (replicated); logits = x wte_shard^T, this rank's vocabulary columns (the LM head is a
/// ColumnParallel nn::LMHead tied to the wte shard). Each parameter is the slice of nn::GPT's
/// init for the same seed, whatever tp is; padding rows of wte are zero.
///
/// `BlockLayout` = Shard<1> turns on sequence parallelism: the embeddings are reduce-scattered
/// along T, blocks and ln_f run on (B, T / tp, d), the LM head all-gathers its input; at the
/// end of backward the gradients of the replicated parameters that saw only this rank's
/// positions (LayerNorms, wpe) are summed over tp in one all-reduce, so they stay equal on
/// every rank (CASES C7).
///
/// Communication per step (forward + backward), B x T tokens, L layers: without sequence
/// parallelism 4 L + 2 all-reduces of (B, T, d) (2 per block each way, the embedding's and
/// the LM head's input gradient); with it 4 L + 2 reduce-scatters and as many all-gathers of
/// the same tensors, plus that one all-reduce of replicated gradients. The loss adds 3
/// all-reduces of B x T values (VocabParallelCrossEntropy).
///
/// tokens: (B, T) int32, the same on every tp rank -> logits: (B, T, V_pad / tp), Shard<-1>.
/// Collective over `tp`: every tp rank builds it with the same config and seed and calls
/// forward and backward with the same tokens.
template <std::floating_point T, class BlockLayout = Replicate>
class TensorParallelGPT {
  static_assert(std::same_as<BlockLayout, Replicate> || std::same_as<BlockLayout, Shard<1>>,
                "tessera: TensorParallelGPT's blocks are replicated (Replicate) or sequence-parallel (Shard<1>).");
  static constexpr bool sp = std::same_as<BlockLayout, Shard<1>>;

 public:
  /// The token embedding (reduce-scattered under sequence parallelism).
  using Wte = VocabParallelEmbedding<T, VocabParallelEmbeddingOptions{.sequence_parallel = sp}>;
  /// A transformer block.
  using BlockType = TensorParallel<nn::Block<T>, BlockLayout>;
  /// The tied LM head (all-gathers its input along T under sequence parallelism).
  using Head = ColumnParallel<nn::LMHead<T>, ColumnParallelOptions{.sequence_parallel = sp}>;
  using Input = Tensor<std::int32_t>;              ///< tokens: (B, T)
  using Output = Activation<Tensor<T>, Shard<-1>>;  ///< logits: (B, T, V_pad / tp)
  /// What backward needs: every sub-layer's context.
  struct Context {
    typename Wte::Context wte;                        ///< token lookup
    typename nn::Embedding<T>::Context wpe;           ///< position lookup (this rank's positions)
    typename Dropout<T>::Context drop;                ///< embedding dropout
    std::vector<typename BlockType::Context> h;       ///< one per block
    typename nn::LayerNorm<T>::Context ln_f;          ///< final LayerNorm
    typename Head::Context lm_head;                   ///< LM head
  };

  /// This rank's part of nn::GPT(config, seed). Throws tessera::Error naming the numbers when
  /// a size is not positive or tp does not divide n_head (or, through the blocks, d_model).
  TensorParallelGPT(const nn::GPTConfig& config, Comm tp, std::uint64_t seed = 0,
                    const TensorParallelGPTOptions& options = {})
      : tp_(std::move(tp)),
        config_(checked(config, tp_.size())),
        wte_(config.vocab_size, config.d_model, tp_, init(seed).child("wte")),
        wpe_(config.n_positions, config.d_model, init(seed).child("wpe")),
        drop_(options.embd_dropout, init(seed).child("drop")),
        ln_f_(config.d_model, init(seed).child("ln_f")),
        lm_head_(Head::from_shard(nn::LMHead<T>(wte_.weight()), tp_)) {
    h_.reserve(static_cast<std::size_t>(config.n_layer));
    for (std::int64_t i = 0; i < config.n_layer; ++i)
      h_.emplace_back(nn::Block<T>(config.d_model, config.n_head, init(seed).child("h." + std::to_string(i))), tp_,
                      TensorParallelOptions{.all_reduce_sequence_parallel_grads = false});
  }

  /// This rank's vocabulary columns of the logits. Collective over tp. Throws tessera::Error
  /// when tokens is not (B, T), T exceeds n_positions (or, under sequence parallelism, is not
  /// divisible by tp), or a token is outside the vocabulary (naming the values).
  ForwardResult<Output, Context> forward(const Tensor<std::int32_t>& tokens) {
    TESSERA_EXPECTS(tokens.rank() == 2, "TensorParallelGPT: tokens of shape ", tokens.shape(), " are not (B, T)");
    const std::int64_t B = tokens.size(0), Tn = tokens.size(1), d = config_.d_model;
    TESSERA_EXPECTS(Tn <= config_.n_positions, "TensorParallelGPT: sequence length ", Tn,
                    " exceeds the position table n_positions=", config_.n_positions);
    if constexpr (sp)
      TESSERA_EXPECTS(Tn % tp_.size() == 0, "TensorParallelGPT: sequence length ", Tn,
                      " is not divisible by the tp size ", tp_.size(), " (sequence parallelism)");
    Context ctx;
    auto [e, ce] = wte_.forward(tokens);  // (B, T, d), or (B, T / tp, d) under SP
    ctx.wte = std::move(ce);
    const std::int64_t local_t = e.value.size(1), t0 = sp ? local_t * tp_.rank() : 0;
    auto [p, cp] = wpe_.forward(positions(t0, local_t));  // (T_local, d)
    ctx.wpe = std::move(cp);
    for (std::int64_t b = 0; b < B; ++b) e.value.slice(0, b, b + 1).reshape(Shape{local_t, d}).add_(p);
    auto [x, cd] = drop_.forward(e.value, ShardInfo{.region = region_of<BlockLayout>(), .rank = tp_.rank(), .size = tp_.size()});
    ctx.drop = std::move(cd);
    Activation<Tensor<T>, BlockLayout> a{std::move(x)};
    ctx.h.reserve(h_.size());
    for (BlockType& block : h_) {
      auto [y, cb] = block.forward(a);
      ctx.h.push_back(std::move(cb));
      a = std::move(y);
    }
    auto [xf, cf] = ln_f_.forward(a.value);
    ctx.ln_f = std::move(cf);
    auto [logits, cl] = lm_head_.forward(Activation<Tensor<T>, BlockLayout>{std::move(xf)});
    ctx.lm_head = std::move(cl);
    return {std::move(logits), std::move(ctx)};
  }

  /// Accumulates every local parameter gradient from this rank's dlogits (B, T, V_pad / tp);
  /// under sequence parallelism, ends with one all-reduce of the replicated parameters'
  /// gradients. Collective over tp.
  NoGrad backward(const Output& dlogits, Context& ctx) {
    TESSERA_EXPECTS(ctx.h.size() == h_.size(), "TensorParallelGPT: context holds ", ctx.h.size(),
                    " blocks, the model ", h_.size());
    detail::tp::ReplicatedGradSum<T> sum;
    ParameterList<T> seq;
    if constexpr (sp) {
      seq = sequence_parallel_parameters();
      sum.stash(seq);
    }
    Tensor<T> dx = ln_f_.backward(lm_head_.backward(dlogits, ctx.lm_head).value, ctx.ln_f);
    for (std::size_t i = h_.size(); i-- > 0;)
      dx = h_[i].backward(Activation<Tensor<T>, BlockLayout>{std::move(dx)}, ctx.h[i]).value;
    dx = drop_.backward(dx, ctx.drop);
    const std::int64_t B = dx.size(0), local_t = dx.size(1), d = dx.size(2);
    Tensor<T> dp(Shape{local_t, d});  // sum over the batch: the gradient of this rank's positions
    for (std::int64_t b = 0; b < B; ++b) dp.add_(dx.slice(0, b, b + 1).contiguous().reshape(Shape{local_t, d}));
    wpe_.backward(dp, ctx.wpe);
    wte_.backward(Activation<Tensor<T>, BlockLayout>{std::move(dx)}, ctx.wte);
    if constexpr (sp) sum.reduce(tp_, seq);
    return {};
  }

  /// This rank's parameters in Hugging Face order: wte.weight (its vocabulary rows), wpe.weight,
  /// the blocks' (shards and replicated), ln_f.weight, ln_f.bias. The tied head adds none.
  ParameterList<T> parameters() {
    ParameterList<T> ps{&wte_.weight(), &wpe_.weight()};
    for (BlockType& block : h_) ps.append(block.parameters());
    ps.append(ln_f_.parameters());
    return ps;
  }
  /// Under sequence parallelism, the replicated parameters whose gradients are summed over tp
  /// at the end of backward: wpe.weight, every ln_1, ln_2, and ln_f; empty without it.
  ParameterList<T> sequence_parallel_parameters() {
    ParameterList<T> ps;
    if constexpr (sp) {
      ps.push_back(wpe_.weight());
      for (BlockType& block : h_) ps.append(block.sequence_parallel_parameters());
      ps.append(ln_f_.parameters());
    }
    return ps;
  }

  /// The dropout masks of the next forward calls are those of `iteration` (e.g. step x
  /// num_microbatches + microbatch); every rank sets the same value.
  void set_dropout_iteration(std::uint64_t iteration) noexcept { drop_.set_iteration(iteration); }
  /// The sizes.
  const nn::GPTConfig& config() const noexcept { return config_; }
  /// The vocabulary padded to a multiple of tp (the logits' width times tp).
  std::int64_t padded_vocab_size() const noexcept { return Wte::padded_vocab_size(config_.vocab_size, tp_.size()); }
  /// The token embedding shard.
  Wte& wte() noexcept { return wte_; }
  /// The position embedding (replicated).
  nn::Embedding<T>& wpe() noexcept { return wpe_; }
  /// The blocks h.0 .. h.{n_layer-1}.
  std::vector<BlockType>& blocks() noexcept { return h_; }
  /// The final LayerNorm (replicated).
  nn::LayerNorm<T>& ln_f() noexcept { return ln_f_; }
  /// The LM head (tied to the wte shard).
  Head& lm_head() noexcept { return lm_head_; }
  /// The tp communicator.
  Comm& comm() noexcept { return tp_; }

 private:
  static nn::GPTConfig checked(const nn::GPTConfig& c, int tp_size) {
    nn::validated(c);
    TESSERA_EXPECTS(c.n_head % tp_size == 0, "TensorParallelGPT: n_head ", c.n_head,
                    " is not divisible by the tp size ", tp_size);
    return c;
  }
  nn::LayerInit init(std::uint64_t seed) const {
    return nn::LayerInit{.prefix = "", .seed = seed, .std = 0.02, .n_layer = static_cast<int>(config_.n_layer)};
  }
  static Tensor<std::int32_t> positions(std::int64_t start, std::int64_t n) {
    Tensor<std::int32_t> pos = Tensor<std::int32_t>::empty(Shape{n});
    for (std::int64_t t = 0; t < n; ++t) pos.data()[t] = static_cast<std::int32_t>(start + t);
    return pos;
  }

  Comm tp_;
  nn::GPTConfig config_;
  Wte wte_;
  nn::Embedding<T> wpe_;
  Dropout<T> drop_;
  std::vector<BlockType> h_;
  nn::LayerNorm<T> ln_f_;
  Head lm_head_;
};

}  // namespace tessera
