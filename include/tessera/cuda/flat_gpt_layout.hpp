#pragma once
/// @file
/// FlatParameter and flat_gpt_layout: where each of the GPT's parameters lives in one flat
/// buffer (DeviceGPT's master weights, gradients and moments), in the CPU GPT's parameter order,
/// checked name by name and shape by shape. Host code (no CUDA needed).

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/models/gpt.hpp"

namespace tessera::cuda {

/// Each parameter starts at a multiple of this many elements (128: 512 bytes of fp32, 256 of
/// bf16), so a cuBLASLt operand or a vectorized load starting at a parameter is aligned.
inline constexpr std::int64_t flat_alignment = 128;

/// One parameter's place in a flat buffer.
struct FlatParameter {
  std::string name;         ///< the CPU model's name, e.g. "h.0.attn.c_attn.weight"
  Shape shape;              ///< its shape
  std::int64_t offset = 0;  ///< first element in the flat buffer
  bool decay = false;       ///< in the weight-decay group (rank >= 2, as optim::weight_decay_groups)
};

/// The GPT's parameters in order ("wte.weight" (V, d), "wpe.weight" (P, d), then per block
/// ln_1, attn.c_attn (d, 3d), attn.c_proj, ln_2, mlp.c_fc (d, 4d), mlp.c_proj (4d, d), weights
/// before biases, then ln_f), laid end to end, each at a multiple of flat_alignment elements
/// (the gaps hold zeros and are never updated). Throws tessera::Error naming the first parameter
/// of `params` whose name or shape is not the GPT's of `config`, or the counts when they differ.
inline std::vector<FlatParameter> flat_gpt_layout(const GPTConfig& config, const ParameterList<float>& params) {
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
    flat.push_back({p.name, p.value.shape(), off, p.value.rank() >= 2});
    off += (p.value.numel() + flat_alignment - 1) / flat_alignment * flat_alignment;
    ++i;
  }
  return flat;
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
