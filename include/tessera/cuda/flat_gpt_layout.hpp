#pragma once
/// @file
/// FlatParameter and flat_gpt_layout: where each of the GPT's parameters lives in one flat
/// buffer (DeviceGPT's master weights, gradients and moments), in the CPU GPT's parameter order,
/// checked name by name and shape by shape; under tensor parallelism, each tp rank's shard of
/// it (gpt_tensor_parallel_layout: Megatron's column- and row-parallel blocks). Host code (no
/// CUDA needed).

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/parallel/tensor/sharding.hpp"

namespace tessera::cuda {

/// Each parameter starts at a multiple of this many elements (128: 512 bytes of fp32, 256 of
/// bf16), so a cuBLASLt operand or a vectorized load starting at a parameter is aligned.
inline constexpr std::int64_t flat_alignment = 128;

/// One parameter's place in a flat buffer.
struct FlatParameter {
  std::string name;         ///< the CPU model's name, e.g. "h.0.attn.c_attn.weight"
  Shape shape;              ///< its shape (this tp rank's shard's under tensor parallelism)
  std::int64_t offset = 0;  ///< first element in the flat buffer
  bool decay = false;       ///< in the weight-decay group (rank >= 2, as optim::weight_decay_groups)
  /// How the full parameter is split over tp (Replicate, or Shard(dim, blocks)); `shape` is
  /// the shard's. Replicate at tp 1.
  ParamLayout tp_layout{};
  Shape full{};  ///< the whole parameter's shape (the CPU model's; `shape` at tp 1)
};

/// The tp split of the GPT parameter `name` on a device (Megatron-LM's, and the CPU
/// TensorParallel plan's for a GPT block, tests/cuda checks the two agree): attn.c_attn
/// column-parallel with each rank's heads' q, k and v (weight Shard(1, blocks=3), bias
/// Shard(0, blocks=3)); mlp.c_fc column-parallel (Shard(1), bias Shard(0)); attn.c_proj and
/// mlp.c_proj row-parallel (weight Shard(0), bias replicated, added once after the sum); the
/// token embedding, tied to the LM head, split by vocabulary rows (Shard(0), padded to a multiple
/// of tp when tp does not divide `vocab_size`: padded_shard(0, vocab_size), as the CPU's
/// VocabParallelEmbedding); the LayerNorms and the position embedding replicated. At tp 1 every
/// parameter is replicated.
inline ParamLayout gpt_tensor_parallel_layout(const std::string& name, std::int64_t vocab_size, int tp_size) {
  if (tp_size <= 1) return ParamLayout::replicate();
  if (name == "wte.weight")
    return vocab_size % tp_size == 0 ? ParamLayout::shard(0) : ParamLayout::padded_shard(0, vocab_size);
  auto ends = [&](const char* suffix) { return name.ends_with(suffix); };
  if (ends(".attn.c_attn.weight")) return ParamLayout::shard(1, 3);
  if (ends(".attn.c_attn.bias")) return ParamLayout::shard(0, 3);
  if (ends(".mlp.c_fc.weight")) return ParamLayout::shard(1);
  if (ends(".mlp.c_fc.bias")) return ParamLayout::shard(0);
  if (ends(".attn.c_proj.weight") || ends(".mlp.c_proj.weight")) return ParamLayout::shard(0);
  return ParamLayout::replicate();
}

/// The GPT's parameters in order ("wte.weight" (V, d), "wpe.weight" (P, d), then per block
/// ln_1, attn.c_attn (d, 3d), attn.c_proj, ln_2, mlp.c_fc (d, 4d), mlp.c_proj (4d, d), weights
/// before biases, then ln_f), laid end to end, each at a multiple of flat_alignment elements
/// (the gaps hold zeros and are never updated). Throws tessera::Error naming the first parameter
/// of `params` whose name or shape is not the GPT's of `config`, or the counts when they differ.
///
/// With `tp_size` > 1 each entry is one tp rank's shard (gpt_tensor_parallel_layout: its
/// tp_layout and the shard's shape; the same on every rank), `params` still the full model's.
/// Throws tessera::Error naming the numbers unless tp_size divides n_head (and so d_model).
inline std::vector<FlatParameter> flat_gpt_layout(const GPTConfig& config, const ParameterList<float>& params,
                                                  int tp_size = 1) {
  TESSERA_EXPECTS(tp_size >= 1 && config.n_head % tp_size == 0 && config.d_model % config.n_head == 0,
                  "flat GPT layout: tp ", tp_size, " does not divide n_head ", config.n_head, " (d_model ",
                  config.d_model, ")");
  const std::int64_t V = config.vocab_size, P = config.n_positions, D = config.d_model;
  std::vector<std::pair<std::string, Shape>> expect = {{"wte.weight", Shape{V, D}}, {"wpe.weight", Shape{P, D}}};
  for (std::int64_t l = 0; l < config.n_layer; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    expect.insert(expect.end(), {{h + "ln_1.weight", Shape{D}},
                                 {h + "ln_1.bias", Shape{D}},
                                 {h + "attn.c_attn.weight", Shape{D, 3 * D}},
                                 {h + "attn.c_attn.bias", Shape{3 * D}},
                                 {h + "attn.c_proj.weight", Shape{D, D}},
                                 {h + "attn.c_proj.bias", Shape{D}},
                                 {h + "ln_2.weight", Shape{D}},
                                 {h + "ln_2.bias", Shape{D}},
                                 {h + "mlp.c_fc.weight", Shape{D, 4 * D}},
                                 {h + "mlp.c_fc.bias", Shape{4 * D}},
                                 {h + "mlp.c_proj.weight", Shape{4 * D, D}},
                                 {h + "mlp.c_proj.bias", Shape{D}}});
  }
  expect.insert(expect.end(), {{"ln_f.weight", Shape{D}}, {"ln_f.bias", Shape{D}}});
  TESSERA_EXPECTS(params.size() == expect.size(), "flat GPT layout: the model has ", params.size(),
                  " parameters, a GPT of ", config.n_layer, " layers has ", expect.size());
  std::vector<FlatParameter> flat;
  std::int64_t off = 0;
  std::size_t i = 0;
  for (Parameter<float>& p : params) {
    TESSERA_EXPECTS(p.name == expect[i].first && p.value.shape() == expect[i].second, "flat GPT layout: parameter ", i,
                    " is ", p.name, " of shape ", p.value.shape(), ", expected ", expect[i].first, " of shape ",
                    expect[i].second);
    const ParamLayout tl = gpt_tensor_parallel_layout(p.name, config.vocab_size, tp_size);
    const std::int64_t extent = tl.extent != 0 ? tl.extent : p.value.size(tl.dim);
    const Shape shape = tl.is_shard() ? p.value.shape().with(tl.dim, (extent + tp_size - 1) / tp_size) : p.value.shape();
    flat.push_back({p.name, shape, off, p.value.rank() >= 2, tl, p.value.shape()});
    off += (shape.numel() + flat_alignment - 1) / flat_alignment * flat_alignment;
    ++i;
  }
  return flat;
}

/// Rank `rank`'s shard (of `size` tp ranks) of the whole parameter `full` placed as `f` says
/// (f.tp_layout; a padded shard's rows past the extent are zero), contiguous, f.shape; `full`
/// itself when replicated. Throws tessera::Error naming the shapes when `full` is not f.full.
inline Tensor<float> gpt_tp_shard(const Tensor<float>& full, const FlatParameter& f, int rank, int size) {
  TESSERA_EXPECTS(full.shape() == f.full, "gpt_tp_shard: ", f.name, " of shape ", full.shape(), ", expected ", f.full);
  if (!f.tp_layout.is_shard() || size == 1) return full;
  if (f.tp_layout.extent == 0)
    return tessera::detail::tp::split_dim(full, f.tp_layout.dim, f.tp_layout.blocks, rank, size, "gpt_tp_shard");
  const std::int64_t rows = f.shape[0], lo = std::min(rank * rows, f.tp_layout.extent),
                     hi = std::min(lo + rows, f.tp_layout.extent);
  Tensor<float> out(f.shape);  // zeros: the padding
  if (hi > lo) out.slice(0, 0, hi - lo).copy_from(full.slice(0, lo, hi));
  return out;
}

/// The whole parameter `f` from every tp rank's flat buffer: `ranks` holds `size` buffers of
/// `stride` elements each, in rank order (an all-gather of the flat buffers), each with its
/// shard of `f` at f.offset; the inverse of gpt_tp_shard (padding dropped). Replicated: rank 0's.
inline Tensor<float> gpt_tp_whole(const float* ranks, std::int64_t stride, const FlatParameter& f, int size) {
  Tensor<float> out = Tensor<float>::empty(f.full);
  if (!f.tp_layout.is_shard() || size == 1) {
    std::copy_n(ranks + f.offset, f.full.numel(), out.data());
    return out;
  }
  if (f.tp_layout.extent == 0) {
    const tessera::detail::tp::SplitGeometry geo =
        tessera::detail::tp::split_geometry(f.full, f.tp_layout.dim, f.tp_layout.blocks, size, "gpt_tp_whole");
    for (int r = 0; r < size; ++r) tessera::detail::tp::scatter_pieces(ranks + r * stride + f.offset, out.data(), geo, r);
    return out;
  }
  const std::int64_t rows = f.shape[0], width = f.shape.numel() / rows;
  for (int r = 0; r < size; ++r) {
    const std::int64_t lo = std::min(r * rows, f.tp_layout.extent), hi = std::min(lo + rows, f.tp_layout.extent);
    std::copy_n(ranks + r * stride + f.offset, (hi - lo) * width, out.data() + lo * width);
  }
  return out;
}

/// A pipeline stage of the GPT: its pipeline layers [first, end) of gpt_pipeline_num_layers
/// (0 the embedding, 1..n_layer the blocks, n_layer + 1 the head: ln_f and the tied LM head), as
/// StagePartition cuts them (the CPU pipeline's stages). The default, end = -1, is every layer.
struct DeviceStage {
  int first = 0;  ///< first pipeline layer
  int end = -1;   ///< one past the last (-1: n_layer + 2, the whole model)
};

/// A pipeline stage's flat layout: flat_gpt_layout's entries of the stage's layers, laid out
/// again from offset 0 in the same order (wte and wpe on the first stage, the blocks', ln_f on
/// the last), and on a last stage without the embedding a copy of the tied "wte.weight" at the
/// end (its LM head's weight, as the CPU's PipelineParallel gives the last stage its own copy;
/// Megatron-LM's embedding group sums the two copies' gradients). Throws tessera::Error naming
/// the numbers when the range is empty or outside [0, n_layer + 2), and as flat_gpt_layout.
inline std::vector<FlatParameter> flat_gpt_stage_layout(const GPTConfig& config, const ParameterList<float>& params,
                                                         int tp_size, DeviceStage stage) {
  const int layers = static_cast<int>(config.n_layer) + 2;
  const int end = stage.end < 0 ? layers : stage.end;
  TESSERA_EXPECTS(stage.first >= 0 && stage.first < end && end <= layers, "flat GPT stage layout: pipeline layers [",
                  stage.first, ", ", end, ") of a GPT with ", layers, " (embedding, ", config.n_layer, " blocks, head)");
  const std::vector<FlatParameter> whole = flat_gpt_layout(config, params, tp_size);
  std::vector<FlatParameter> out;
  std::int64_t off = 0;
  auto take = [&](const FlatParameter& f) {
    FlatParameter g = f;
    g.offset = off;
    off += (f.shape.numel() + flat_alignment - 1) / flat_alignment * flat_alignment;
    out.push_back(std::move(g));
  };
  for (std::size_t i = 0; i < whole.size(); ++i) {
    const int layer = i < 2 ? 0 : i + 2 >= whole.size() ? layers - 1 : 1 + static_cast<int>((i - 2) / 12);
    if (layer >= stage.first && layer < end) take(whole[i]);
  }
  if (end == layers && stage.first > 0) take(whole[0]);  // the last stage's copy of the tied wte
  return out;
}

/// Where a stage's backward finishes its gradients (DeviceGPT::ready_offsets), descending,
/// ending with 0: ln_f's first element when the stage holds the head (with the copy of the tied
/// wte after it: final after the head too), each block's ln_1.weight from the last block down,
/// then 0 (the embeddings, or the stage's first block, which starts at 0). Throws tessera::Error
/// when `layout` (flat_gpt_stage_layout's) is empty.
inline std::vector<std::int64_t> gpt_stage_ready_offsets(const std::vector<FlatParameter>& layout) {
  TESSERA_EXPECTS(!layout.empty(), "gpt_stage_ready_offsets: an empty layout");
  std::vector<std::int64_t> out;
  for (const FlatParameter& f : layout)
    if (f.name == "ln_f.weight") out.push_back(f.offset);
  for (auto it = layout.rbegin(); it != layout.rend(); ++it)
    if (it->name.ends_with(".ln_1.weight") && it->name.starts_with("h.") && it->offset > 0) out.push_back(it->offset);
  if (out.empty() || out.back() != 0) out.push_back(0);  // (a head-only stage's ln_f starts at 0)
  return out;
}

/// Where the GPT's backward finishes the gradients of a flat `layout` (flat_gpt_layout's) of
/// `n_layer` blocks, in the order it does (DeviceGPT::ready_offsets): ln_f's first element (after
/// the head and ln_f), then each block's first element from the last block down, then 0 (after
/// the embeddings; the tied wte takes the head's gradient too, so it is final only then).
/// Descending, ending with 0. Throws tessera::Error when the layout does not hold the
/// 2 + 12 n_layer + 2 parameters of such a GPT.
inline std::vector<std::int64_t> gpt_ready_offsets(const std::vector<FlatParameter>& layout, std::int64_t n_layer) {
  TESSERA_EXPECTS(n_layer >= 0 && layout.size() == static_cast<std::size_t>(4 + 12 * n_layer), "gpt_ready_offsets: ",
                  layout.size(), " parameters, a GPT of ", n_layer, " layers has ", 4 + 12 * n_layer);
  std::vector<std::int64_t> out{layout[layout.size() - 2].offset};
  for (std::int64_t l = n_layer - 1; l >= 0; --l) out.push_back(layout[static_cast<std::size_t>(2 + 12 * l)].offset);
  out.push_back(0);
  return out;
}

}  // namespace tessera::cuda
