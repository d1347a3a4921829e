#pragma once
/// @file
/// TensorParallelShard: how a layer is cut into its tp shard (by output columns, by input rows,
/// or by heads), the customization point through which ColumnParallel, RowParallel and
/// TensorParallel shard a user's layer type. Specialized here for nn::Linear and
/// nn::CoreAttention.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/core_attention.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/nn/lm_head.hpp"
#include "tessera/parallel/tensor/sharding.hpp"

namespace tessera {

/// A row-parallel shard: the layer holding rows [rank in / tp, (rank + 1) in / tp) of the
/// weight and no bias, and the full bias (replicated; RowParallel adds it once, after the
/// reduction).
template <class L, std::floating_point T>
struct RowShard {
  L layer;                             ///< the weight rows of this rank, no bias
  std::optional<Parameter<T>> bias;    ///< the replicated bias, if the layer has one
};

/// How to cut a layer of type `L` into its tp shards. Specialize it for a layer type to make it
/// usable in ColumnParallel (static `column(L& full, int blocks, int rank, int size) -> L`),
/// RowParallel (static `row(L& full, int rank, int size) -> RowShard<L, T>`) or a plan's
/// tp::heads step (static `heads(const L& full, int rank, int size) -> L`). Every function
/// returns new storage holding the slice of the full layer's values (never a view of it) with
/// each parameter's `layout` set, so the shard equals the serial init's slice whatever tp is.
template <class L>
struct TensorParallelShard {};

/// nn::Linear: weight [in, out], bias [out] (Hugging Face Conv1D layout).
template <std::floating_point T>
struct TensorParallelShard<nn::Linear<T>> {
  /// Columns of this rank: weight Shard(1, blocks), bias Shard(0, blocks). Throws
  /// tessera::Error naming the numbers unless blocks x size divides out.
  static nn::Linear<T> column(nn::Linear<T>& full, int blocks, int rank, int size) {
    const ParamLayout wl = ParamLayout::shard(1, blocks), bl = ParamLayout::shard(0, blocks);
    check(full, full.out_features(), blocks, size, "ColumnParallel", "output features");
    Tensor<T> w = shard_of(full.weight().value, wl, rank, size);
    Tensor<T> b = full.bias() ? shard_of(full.bias()->value, bl, rank, size) : Tensor<T>{};
    nn::Linear<T> shard(prefix(full), std::move(w), std::move(b));
    shard.weight().layout = wl;
    if (shard.bias()) shard.bias()->layout = bl;
    return shard;
  }
  /// Rows of this rank (weight Shard(0)), no bias; the bias replicated beside it. Throws
  /// tessera::Error naming the numbers unless size divides in.
  static RowShard<nn::Linear<T>, T> row(nn::Linear<T>& full, int rank, int size) {
    check(full, full.in_features(), 1, size, "RowParallel", "input features");
    const ParamLayout wl = ParamLayout::shard(0);
    nn::Linear<T> shard(prefix(full), shard_of(full.weight().value, wl, rank, size));
    shard.weight().layout = wl;
    std::optional<Parameter<T>> bias;
    if (full.bias()) bias.emplace(full.bias()->name, full.bias()->value.clone(), ParamLayout::replicate());
    return {std::move(shard), std::move(bias)};
  }

 private:
  static std::string prefix(nn::Linear<T>& full) {
    const std::string& n = full.weight().name;
    constexpr std::string_view suffix = ".weight";
    if (n == "weight") return "";
    return n.ends_with(suffix) ? n.substr(0, n.size() - suffix.size()) : n;
  }
  static void check(nn::Linear<T>& full, std::int64_t n, int blocks, int size, const char* who, const char* what) {
    TESSERA_EXPECTS(n % (static_cast<std::int64_t>(blocks) * size) == 0, who, " ", full.weight().name, ": ", n, " ",
                    what, " are not divisible into ", blocks, " block(s) x ", size, " tp ranks");
  }
};

/// nn::CoreAttention: a rank computes n_head / tp of the heads (its heads' q, k, v columns come
/// from a column-parallel c_attn with blocks = 3).
template <std::floating_point T>
struct TensorParallelShard<nn::CoreAttention<T>> {
  /// Attention over n_head / size heads. Throws tessera::Error naming both unless size divides
  /// n_head.
  static nn::CoreAttention<T> heads(const nn::CoreAttention<T>& full, int /*rank*/, int size) {
    TESSERA_EXPECTS(full.n_head() % size == 0, "TensorParallel: n_head ", full.n_head(),
                    " is not divisible by the tp size ", size);
    return nn::CoreAttention<T>(full.n_head() / size);
  }
};

/// nn::LMHead (logits = x W^T, W [V, d]): a column-parallel shard holds rows of W, this rank's
/// vocabulary range of the table padded to a multiple of tp (V_pad / tp rows; the rows past V are
/// zero), as VocabParallelEmbedding holds the embedding it is tied to: the same rows, the same
/// layout (Shard(0), with the unpadded extent V when tp does not divide it), so the two can be
/// one parameter. Its logits are this rank's vocabulary columns (VocabParallelCrossEntropy).
template <std::floating_point T>
struct TensorParallelShard<nn::LMHead<T>> {
  /// This rank's rows of the (padded) weight. Throws tessera::Error unless blocks is 1.
  static nn::LMHead<T> column(nn::LMHead<T>& full, int blocks, int rank, int size) {
    TESSERA_EXPECTS(blocks == 1, "ColumnParallel ", full.weight().name, ": an LM head's vocabulary is not split into ",
                    blocks, " blocks");
    const std::int64_t v = full.vocab_size(), d = full.dim();
    const std::int64_t rows = (v + size - 1) / size, start = rank * rows, end = std::min(v, start + rows);
    Tensor<T> w(Shape{rows, d});
    if (end > start) w.slice(0, 0, end - start).copy_from(full.weight().value.slice(0, start, end));
    const ParamLayout layout = rows * size == v ? ParamLayout::shard(0) : ParamLayout::padded_shard(0, v);
    const Parameter<T> shard(full.weight().name, std::move(w), layout);
    return nn::LMHead<T>(shard);  // shares the new tensors
  }
};

}  // namespace tessera
