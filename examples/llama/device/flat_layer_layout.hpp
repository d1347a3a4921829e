#pragma once
/// @file
/// The device Llama decoder layer's flat parameter layout (device_decoder_layer.cuh), and the
/// host conversions between it and the CPU llama::DecoderLayer: the device keeps each layer's
/// weights end to end in one buffer, with q_proj | k_proj | v_proj fused into one [d, (H + 2G) hd]
/// matrix and gate_proj | up_proj into one [d, 2F] (one GEMM each, the column order that
/// llama::MultiLinear's output and the device kernels expect). Host code, checked in tests/llama.

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "llama/llama_layers.hpp"
#include "llama/llama_model.hpp"
#include "tessera/core/error.hpp"

namespace llama::device {

/// The six tensors of a device decoder layer, in forward order.
enum class LayerTensor : int {
  input_norm = 0,  ///< input_layernorm.weight [d]
  qkv = 1,         ///< [q_proj | k_proj | v_proj] [d, (H + 2 G) hd]
  o_proj = 2,      ///< o_proj.weight [H hd, d]
  post_norm = 3,   ///< post_attention_layernorm.weight [d]
  gate_up = 4,     ///< [gate_proj | up_proj] [d, 2F]
  down_proj = 5,   ///< down_proj.weight [F, d]
};

/// Offsets and sizes of a layer's tensors in its flat buffer.
struct FlatLayerLayout {
  std::array<std::int64_t, 6> offset{};  ///< first element of each LayerTensor
  std::array<std::int64_t, 6> rows{};    ///< rows (1 for the norms)
  std::array<std::int64_t, 6> cols{};    ///< columns
  std::int64_t total = 0;                ///< elements in all
  int tp = 1;                            ///< tensor-parallel ranks the layout is one shard of

  /// Offset of tensor `t`.
  std::int64_t at(LayerTensor t) const { return offset[static_cast<std::size_t>(t)]; }
  /// Elements of tensor `t`.
  std::int64_t size(LayerTensor t) const { return rows[static_cast<std::size_t>(t)] * cols[static_cast<std::size_t>(t)]; }
};

/// The layout of a layer of `c` (validated: throws tessera::Error as llama::validated), or of
/// one tensor-parallel rank's shard of it at `tp` > 1 (Megatron-LM's layout, as the layer's
/// tp_plan): the rank's H / tp query heads and G / tp KV heads of q|k|v and its F / tp columns
/// of gate|up (column-parallel), the matching rows of o_proj and down_proj (row-parallel), the
/// norms whole (replicated). Throws tessera::Error naming the numbers when tp does not divide
/// the heads, the KV heads or F.
inline FlatLayerLayout flat_layer_layout(const LlamaConfig& config, int tp = 1) {
  const LlamaConfig c = validated(config);
  TESSERA_EXPECTS(tp >= 1 && c.n_head % tp == 0 && c.n_kv_head % tp == 0 && c.ffn_hidden % tp == 0,
                  "llama flat_layer_layout: tp ", tp, " must divide n_head ", c.n_head, ", n_kv_head ", c.n_kv_head,
                  " and ffn_hidden ", c.ffn_hidden);
  const std::int64_t d = c.d_model, hd = c.head_dim(), F = c.ffn_hidden / tp, H = c.n_head / tp, G = c.n_kv_head / tp;
  FlatLayerLayout l;
  l.tp = tp;
  const std::array<std::array<std::int64_t, 2>, 6> shapes{{{1, d},
                                                            {d, (H + 2 * G) * hd},
                                                            {H * hd, d},
                                                            {1, d},
                                                            {d, 2 * F},
                                                            {F, d}}};
  for (std::size_t i = 0; i < 6; ++i) {
    l.offset[i] = l.total;
    l.rows[i] = shapes[i][0];
    l.cols[i] = shapes[i][1];
    l.total += shapes[i][0] * shapes[i][1];
  }
  return l;
}

namespace detail {
// The CPU tensors behind each LayerTensor, in column order ({q, k, v}, {gate, up}, or one).
template <class GetT, class Layer>
std::vector<GetT*> parts(Layer& layer, LayerTensor t) {
  switch (t) {
    case LayerTensor::input_norm: return {&layer.input_layernorm().weight()};
    case LayerTensor::qkv: {
      std::vector<GetT*> out;
      for (auto& l : layer.self_attn().qkv().linears()) out.push_back(&l.weight());
      return out;
    }
    case LayerTensor::o_proj: return {&layer.self_attn().o_proj().weight()};
    case LayerTensor::post_norm: return {&layer.post_attention_layernorm().weight()};
    case LayerTensor::gate_up: {
      std::vector<GetT*> out;
      for (auto& l : layer.mlp().gate_up().linears()) out.push_back(&l.weight());
      return out;
    }
    case LayerTensor::down_proj: return {&layer.mlp().down_proj().weight()};
  }
  return {};
}
}  // namespace detail

/// The flat buffer of `layer` (values when `grads` is false, gradients when true): each row of a
/// fused matrix is [row of q | row of k | row of v] ([gate | up]). With a layout of tp > 1, tp
/// rank `rank`'s shard (flat_layer_layout's comment): of each of q, k, v, gate and up its
/// columns [rank c / tp, (rank + 1) c / tp), of o_proj and down_proj its rows. Throws
/// tessera::Error naming the tensor when a parameter's shape is not the layout's.
inline std::vector<float> pack_layer(DecoderLayer<float>& layer, const FlatLayerLayout& l, bool grads = false,
                                     int rank = 0) {
  TESSERA_EXPECTS(rank >= 0 && rank < l.tp, "llama pack_layer: rank ", rank, " of a layout of tp ", l.tp);
  std::vector<float> flat(static_cast<std::size_t>(l.total));
  for (int t = 0; t < 6; ++t) {
    const auto tt = static_cast<LayerTensor>(t);
    const auto parts = detail::parts<tessera::Parameter<float>>(layer, tt);
    const std::int64_t rows = l.rows[static_cast<std::size_t>(t)], cols = l.cols[static_cast<std::size_t>(t)];
    const std::int64_t off = l.offset[static_cast<std::size_t>(t)];
    if (tt == LayerTensor::o_proj || tt == LayerTensor::down_proj) {  // row-parallel: this rank's rows
      const tessera::Tensor<float>& v = grads ? parts[0]->grad : parts[0]->value;
      TESSERA_EXPECTS(v.numel() == rows * l.tp * cols, "llama pack_layer: ", parts[0]->name, " of shape ", v.shape(),
                      " is not ", rows * l.tp, " x ", cols);
      std::copy(v.data() + rank * rows * cols, v.data() + (rank + 1) * rows * cols, flat.begin() + off);
      continue;
    }
    std::int64_t col0 = 0;
    for (tessera::Parameter<float>* p : parts) {
      const tessera::Tensor<float>& v = grads ? p->grad : p->value;
      const std::int64_t full = v.numel() / rows;                       // the parameter's columns
      const std::int64_t pc = t == 0 || t == 3 ? full : full / l.tp;   // this rank's (norms whole)
      const std::int64_t c0 = t == 0 || t == 3 ? 0 : rank * pc;
      TESSERA_EXPECTS(v.numel() == rows * full && col0 + pc <= cols, "llama pack_layer: ", p->name, " of shape ",
                      v.shape(), " does not fit the flat layout's ", rows, " x ", cols, " (tp ", l.tp, ")");
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < pc; ++c)
          flat[static_cast<std::size_t>(off + r * cols + col0 + c)] = v.data()[r * full + c0 + c];
      col0 += pc;
    }
    TESSERA_EXPECTS(col0 == cols, "llama pack_layer: tensor ", t, " has ", col0, " columns, the layout ", cols);
  }
  return flat;
}

/// The inverse of pack_layer (at tp 1): writes `flat` into the layer's values (or gradients). Throws
/// tessera::Error naming the sizes when `flat` is not the layout's size.
inline void unpack_layer(const std::vector<float>& flat, DecoderLayer<float>& layer, const FlatLayerLayout& l,
                         bool grads = false) {
  TESSERA_EXPECTS(l.tp == 1, "llama unpack_layer: a layout of tp ", l.tp, " holds one rank's shard, not the layer");
  TESSERA_EXPECTS(static_cast<std::int64_t>(flat.size()) == l.total, "llama unpack_layer: ", flat.size(),
                  " values for a layout of ", l.total);
  for (int t = 0; t < 6; ++t) {
    const auto parts = detail::parts<tessera::Parameter<float>>(layer, static_cast<LayerTensor>(t));
    const std::int64_t rows = l.rows[static_cast<std::size_t>(t)], cols = l.cols[static_cast<std::size_t>(t)];
    std::int64_t col0 = 0;
    for (tessera::Parameter<float>* p : parts) {
      tessera::Tensor<float>& v = grads ? p->grad : p->value;
      const std::int64_t pc = v.numel() / rows;
      TESSERA_EXPECTS(v.numel() == rows * pc && col0 + pc <= cols, "llama unpack_layer: ", p->name, " of shape ",
                      v.shape(), " does not fit the flat layout's ", rows, " x ", cols);
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < pc; ++c)
          v.data()[r * pc + c] = flat[static_cast<std::size_t>(l.offset[static_cast<std::size_t>(t)] + r * cols + col0 + c)];
      col0 += pc;
    }
    TESSERA_EXPECTS(col0 == cols, "llama unpack_layer: tensor ", t, " has ", col0, " columns, the layout ", cols);
  }
}

}  // namespace llama::device

namespace llama::device {

/// The device Llama's flat buffer: embed_tokens [V, d], then each decoder layer's
/// flat_layer_layout end to end, then model.norm [d] and lm_head [d, V] (the CPU Llama's
/// parameter order, each layer's q|k|v and gate|up fused). At tp > 1 one tensor-parallel rank's
/// shard (Megatron-LM's vocab-parallel embedding and head): embed_tokens' rows and lm_head's
/// columns of its vocabulary [rank V / tp, (rank + 1) V / tp), each layer's shard
/// (flat_layer_layout), model.norm whole.
struct FlatModelLayout {
  FlatLayerLayout layer;        ///< one layer's layout (every layer's is the same)
  std::int64_t embed = 0;       ///< offset of embed_tokens (0)
  std::int64_t first_layer = 0; ///< offset of layer 0 (vocab_rows d)
  std::int64_t norm = 0;        ///< offset of model.norm
  std::int64_t head = 0;        ///< offset of lm_head
  std::int64_t total = 0;       ///< elements in all
  std::int64_t n_layer = 0;     ///< layers
  std::int64_t vocab_rows = 0;  ///< vocabulary entries of this layout (V / tp)
  int tp = 1;                   ///< tensor-parallel ranks the layout is one shard of
  /// Offset of layer i.
  std::int64_t layer_at(std::int64_t i) const { return first_layer + i * layer.total; }
};

/// The layout of a Llama of `config` (validated: throws tessera::Error as llama::validated), or
/// of one of `tp` tensor-parallel ranks' shards of it (FlatModelLayout's comment). Throws
/// tessera::Error naming the numbers when tp does not divide the vocabulary, the heads, the KV
/// heads or F.
inline FlatModelLayout flat_model_layout(const LlamaConfig& config, int tp = 1) {
  FlatModelLayout m;
  m.layer = flat_layer_layout(config, tp);
  TESSERA_EXPECTS(config.vocab_size % tp == 0, "llama flat_model_layout: tp ", tp, " must divide vocab_size ",
                  config.vocab_size, " (each rank holds V / tp rows of embed_tokens and columns of lm_head)");
  m.tp = tp;
  m.vocab_rows = config.vocab_size / tp;
  m.n_layer = config.n_layer;
  m.first_layer = m.vocab_rows * config.d_model;
  m.norm = m.first_layer + config.n_layer * m.layer.total;
  m.head = m.norm + config.d_model;
  m.total = m.head + config.d_model * m.vocab_rows;
  return m;
}

/// Whether the flat element range of tensor `t` of a layer is a matrix (weight decay) or a norm's
/// weight (none), as optim::weight_decay_groups splits the CPU Llama's parameters.
inline bool decays(LayerTensor t) { return t != LayerTensor::input_norm && t != LayerTensor::post_norm; }

/// The flat buffer of the whole `model` (values, or gradients with `grads`); with a layout of
/// tp > 1, tp rank `rank`'s shard (FlatModelLayout's comment). Throws tessera::Error naming a
/// parameter whose shape is not the layout's, or the rank.
inline std::vector<float> pack_model(Llama<float>& model, const FlatModelLayout& m, bool grads = false, int rank = 0) {
  TESSERA_EXPECTS(rank >= 0 && rank < m.tp, "llama pack_model: rank ", rank, " of a layout of tp ", m.tp);
  std::vector<float> flat(static_cast<std::size_t>(m.total));
  const LlamaConfig& c = model.config();
  const std::int64_t V = c.vocab_size, d = c.d_model, Vl = m.vocab_rows, lo = rank * Vl;
  const auto value = [&](tessera::Parameter<float>& p, std::int64_t n) -> const tessera::Tensor<float>& {
    const tessera::Tensor<float>& v = grads ? p.grad : p.value;
    TESSERA_EXPECTS(v.numel() == n, "llama pack_model: ", p.name, " of shape ", v.shape(), " is not ", n, " elements");
    return v;
  };
  TESSERA_EXPECTS(V == Vl * m.tp && c.n_layer == m.n_layer, "llama pack_model: a model of vocabulary ", V, " and ",
                  c.n_layer, " layers, the layout ", Vl * m.tp, " and ", m.n_layer);
  const tessera::Tensor<float>& embed = value(model.first().weight(), V * d);  // [V, d]: rows [lo, lo + Vl)
  std::copy(embed.data() + lo * d, embed.data() + (lo + Vl) * d, flat.begin() + m.embed);
  for (std::int64_t i = 0; i < m.n_layer; ++i) {
    const std::vector<float> l = pack_layer(model.layers()[static_cast<std::size_t>(i)], m.layer, grads, rank);
    std::copy(l.begin(), l.end(), flat.begin() + m.layer_at(i));
  }
  const tessera::Tensor<float>& norm = value(model.last().norm.weight(), d);
  std::copy(norm.data(), norm.data() + d, flat.begin() + m.norm);
  const tessera::Tensor<float>& head = value(model.last().lm_head.weight(), d * V);  // [d, V]: columns [lo, lo + Vl)
  for (std::int64_t r = 0; r < d; ++r)
    std::copy(head.data() + r * V + lo, head.data() + r * V + lo + Vl, flat.begin() + m.head + r * Vl);
  return flat;
}

/// The inverse of pack_model (at tp 1): writes `flat` into the model's values (or gradients). Throws
/// tessera::Error naming the sizes when `flat` is not the layout's size.
inline void unpack_model(const std::vector<float>& flat, Llama<float>& model, const FlatModelLayout& m, bool grads = false) {
  TESSERA_EXPECTS(m.tp == 1, "llama unpack_model: a layout of tp ", m.tp, " holds one rank's shard, not the model");
  TESSERA_EXPECTS(static_cast<std::int64_t>(flat.size()) == m.total, "llama unpack_model: ", flat.size(),
                  " values for a layout of ", m.total);
  const auto get = [&](tessera::Parameter<float>& p, std::int64_t offset, std::int64_t n) {
    tessera::Tensor<float>& v = grads ? p.grad : p.value;
    TESSERA_EXPECTS(v.numel() == n, "llama unpack_model: ", p.name, " of shape ", v.shape(), " is not ", n, " elements");
    std::copy(flat.begin() + offset, flat.begin() + offset + v.numel(), v.data());
  };
  const LlamaConfig& c = model.config();
  TESSERA_EXPECTS(c.n_layer == m.n_layer, "llama unpack_model: a model of ", c.n_layer, " layers, the layout ", m.n_layer);
  get(model.first().weight(), m.embed, c.vocab_size * c.d_model);
  for (std::int64_t i = 0; i < m.n_layer; ++i) {
    const std::vector<float> l(flat.begin() + m.layer_at(i), flat.begin() + m.layer_at(i) + m.layer.total);
    unpack_layer(l, model.layers()[static_cast<std::size_t>(i)], m.layer, grads);
  }
  get(model.last().norm.weight(), m.norm, c.d_model);
  get(model.last().lm_head.weight(), m.head, c.d_model * c.vocab_size);
}

/// A range of the flat buffer and its AdamW group: 0 decays (the embedding, every matrix,
/// lm_head), 1 does not (the norms), as optim::weight_decay_groups splits the CPU model. Under
/// tensor parallelism the groups are also the split of the gradient norm: group 0 is sharded
/// over the tp ranks, group 1 (the norms) replicated on each.
struct FlatGroup {
  std::int64_t offset = 0;  ///< first element
  std::int64_t numel = 0;   ///< elements
  int group = 0;            ///< 0: weight decay, 1: none
};

/// Every tensor of the layout in buffer order with its group (DeviceLlama's AdamW chunks).
inline std::vector<FlatGroup> adamw_segments(const FlatModelLayout& m) {
  std::vector<FlatGroup> out{{.offset = m.embed, .numel = m.first_layer - m.embed, .group = 0}};
  for (std::int64_t i = 0; i < m.n_layer; ++i)
    for (int t = 0; t < 6; ++t) {
      const auto tt = static_cast<LayerTensor>(t);
      out.push_back({.offset = m.layer_at(i) + m.layer.at(tt), .numel = m.layer.size(tt), .group = decays(tt) ? 0 : 1});
    }
  out.push_back({.offset = m.norm, .numel = m.head - m.norm, .group = 1});
  out.push_back({.offset = m.head, .numel = m.total - m.head, .group = 0});
  return out;
}

}  // namespace llama::device

namespace llama::device {

/// The pipeline layers of a Llama of `config` (the unit of a pipeline stage's cut, as the CPU
/// Llama's SequentialModel): 0 the embedding, 1..n_layer the decoder layers, n_layer + 1 the
/// final norm with lm_head.
inline std::int64_t pipeline_num_layers(const LlamaConfig& config) { return config.n_layer + 2; }

/// Offset in `m` of pipeline layer `p` (0: embed_tokens, 1..n_layer: decoder layer p - 1,
/// n_layer + 1: model.norm), and m.total for p = n_layer + 2: the flat buffer is in pipeline
/// order, so a stage's weights are one contiguous range. Throws tessera::Error naming p
/// outside [0, n_layer + 2].
inline std::int64_t pipeline_layer_offset(const FlatModelLayout& m, std::int64_t p) {
  TESSERA_EXPECTS(p >= 0 && p <= m.n_layer + 2, "llama pipeline_layer_offset: pipeline layer ", p, " of a model of ",
                  m.n_layer + 2);
  if (p == 0) return m.embed;
  if (p <= m.n_layer) return m.layer_at(p - 1);
  return p == m.n_layer + 1 ? m.norm : m.total;
}

/// A range [lo, hi) of a flat buffer.
struct FlatRange {
  std::int64_t lo = 0;  ///< first element
  std::int64_t hi = 0;  ///< one past the last
};
/// The flat range of `m` that a pipeline stage of layers [first, end) holds. Throws
/// tessera::Error naming the numbers when the range is empty or outside [0, n_layer + 2).
inline FlatRange stage_range(const FlatModelLayout& m, std::int64_t first, std::int64_t end) {
  TESSERA_EXPECTS(first >= 0 && first < end && end <= m.n_layer + 2, "llama stage_range: pipeline layers [", first,
                  ", ", end, ") of a model of ", m.n_layer + 2);
  return {pipeline_layer_offset(m, first), pipeline_layer_offset(m, end)};
}

/// adamw_segments' entries inside stage_range(m, first, end), their offsets from its lo (a
/// stage's AdamW chunks and gradient-norm groups).
inline std::vector<FlatGroup> stage_segments(const FlatModelLayout& m, std::int64_t first, std::int64_t end) {
  const FlatRange r = stage_range(m, first, end);
  std::vector<FlatGroup> out;
  for (FlatGroup g : adamw_segments(m))
    if (g.offset >= r.lo && g.offset + g.numel <= r.hi) {
      g.offset -= r.lo;
      out.push_back(g);
    }
  return out;
}

}  // namespace llama::device
