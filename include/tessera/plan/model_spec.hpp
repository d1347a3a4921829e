#pragma once
/// @file
/// ModelSpec: the shape of a decoder-only transformer (GPT / Llama style) as the planner sees
/// it -- layer count and sizes, no weights.

#include <string>

#include "tessera/core/error.hpp"

namespace tessera::plan {

/// The shape of a decoder-only transformer: `layers` blocks of self-attention (`heads` query
/// heads, `kv_heads` key/value heads) and a two-matrix MLP of width `ffn`, a vocabulary of
/// `vocab` tokens, sequences of `seq` tokens, the LM head tied to the input embedding or not.
/// Set with designated initializers: `ModelSpec{.layers = 24, .hidden = 2304, .heads = 24, ...}`.
struct ModelSpec {
  std::string name{};  ///< shown in reports, e.g. "GPT 1.7B"
  int layers = 1;      ///< transformer blocks (l)
  int hidden = 1;      ///< hidden size (h)
  int heads = 1;       ///< attention (query) heads (a)
  int kv_heads = 0;    ///< key/value heads (grouped-query attention); 0 means `heads`
  int ffn = 0;         ///< MLP inner width; 0 means 4 * hidden
  int vocab = 1;       ///< vocabulary size (V)
  int seq = 1;         ///< sequence length in tokens (s)
  bool tied = true;    ///< LM head shares the input embedding's weight
  /// The block has Megatron-LM's dropouts (on the attention probabilities and on both residual
  /// branches), whose masks and outputs it keeps for backward; tessera's nn::Block has none
  /// (train_gpt: false).
  bool dropout = true;
  /// The blocks are tessera's nn::Block (train_gpt: true): they keep fp32-style contexts as
  /// nn::block_activation_bytes counts them (LayerNorm's x-hat and 1/sigma, the GELU's input,
  /// gate and output; no dropout), and full recomputation keeps each pipeline stage's input
  /// once, not each block's (PipelineOptions::recompute). false: Megatron-LM's block, counted
  /// as Korthikanti et al. 2022 do.
  bool tessera_block = false;

  /// Limits validate() enforces, far above any published model (GPT-3 175B: 96 layers, hidden
  /// 12288, seq 2048; PaLM 540B: 118 layers, hidden 18432, ffn 73728, vocab 256k; GPT-4-scale
  /// guesses: ~120 layers, hidden ~20k-25k). They keep every count the planner forms -- one
  /// weight's elements (hidden x ffn <= 2^38), parameters, FLOPs, bytes -- inside 64-bit
  /// integers and doubles, and a prediction to seconds.
  static constexpr int max_layers = 4096;         ///< at most 4096 blocks
  static constexpr int max_hidden = 1 << 18;      ///< hidden size at most 262144
  static constexpr int max_ffn = 1 << 20;         ///< MLP width at most 1048576 (4 x max_hidden)
  static constexpr int max_vocab = 1 << 24;       ///< vocabulary at most 16777216 tokens
  static constexpr int max_seq = 1 << 24;         ///< sequence length at most 16777216 tokens

  /// Key/value heads actually used: kv_heads, or heads when kv_heads is 0.
  int num_kv_heads() const { return kv_heads == 0 ? heads : kv_heads; }
  /// MLP width actually used: ffn, or 4 * hidden when ffn is 0.
  long long ffn_size() const { return ffn == 0 ? 4LL * hidden : ffn; }
  /// Size of one attention head, hidden / heads.
  int head_dim() const { return hidden / heads; }
  /// Width of the key (and of the value) projection, num_kv_heads() * head_dim().
  long long kv_dim() const { return static_cast<long long>(num_kv_heads()) * head_dim(); }

  /// Parameters of one transformer block: the QKV, output, and two MLP weights with their
  /// biases, and two LayerNorms (scale and shift). 12 h^2 + 13 h when ffn = 4h and kv = heads
  /// (Narayanan et al., SC 2021, Eq. 2).
  double layer_parameters() const {
    const double h = hidden, kv = static_cast<double>(kv_dim()), f = static_cast<double>(ffn_size());
    return h * (h + 2 * kv) + (h + 2 * kv)  // QKV weight and bias
           + h * h + h                      // output projection
           + 2 * h * f + f + h              // MLP
           + 4 * h;                         // two LayerNorms
  }
  /// Parameters of the input side: token embedding V h plus learned positions s h.
  double embedding_parameters() const { return (static_cast<double>(vocab) + seq) * hidden; }
  /// Parameters of the output side: final LayerNorm, plus V h when the head is not tied.
  double head_parameters() const { return 2.0 * hidden + (tied ? 0.0 : static_cast<double>(vocab) * hidden); }
  /// All parameters: layers * layer_parameters() + embedding and head.
  double parameters() const { return layers * layer_parameters() + embedding_parameters() + head_parameters(); }

  /// Throws Error naming the numbers when a size is < 1 or above its limit (max_layers,
  /// max_hidden, max_ffn -- also the default 4 x hidden --, max_vocab, max_seq), kv_heads does not
  /// divide heads, or heads does not divide hidden.
  void validate() const {
    TESSERA_EXPECTS(layers >= 1 && hidden >= 1 && heads >= 1 && vocab >= 1 && seq >= 1, "ModelSpec '", name,
                    "': layers, hidden, heads, vocab and seq must be >= 1, got ", layers, ", ", hidden, ", ", heads,
                    ", ", vocab, ", ", seq);
    const auto at_most = [&](const char* what, long long value, long long limit) {
      TESSERA_EXPECTS(value <= limit, "ModelSpec '", name, "': ", what, " ", value, " is above the planner's limit ",
                      limit, " (far above any published model; ModelSpec::max_*)");
    };
    at_most("layers", layers, max_layers);
    at_most("hidden", hidden, max_hidden);
    at_most("ffn", ffn_size(), max_ffn);
    at_most("vocab", vocab, max_vocab);
    at_most("seq", seq, max_seq);
    TESSERA_EXPECTS(hidden % heads == 0, "ModelSpec '", name, "': heads ", heads, " must divide hidden ", hidden);
    TESSERA_EXPECTS(kv_heads >= 0 && ffn >= 0, "ModelSpec '", name, "': kv_heads ", kv_heads, " and ffn ", ffn,
                    " must be >= 0 (0 = the default)");
    TESSERA_EXPECTS(heads % num_kv_heads() == 0, "ModelSpec '", name, "': kv_heads ", num_kv_heads(),
                    " must divide heads ", heads);
  }
};

}  // namespace tessera::plan
