// The arithmetic and index mapping of the Llama example's device kernels
// (examples/llama/device/llama_device_math.hpp), run on the host as the kernels run them (one
// element, or one row, at a time; the RoPE steps are the kernels' own functions) against the CPU layers of llama_layers.hpp in fp32: RMSNorm
// forward and backward, SwiGLU forward and backward, and the rotary embedding fused with GQA's
// head expansion (forward against RotaryAttentionCore's rotated q and k; backward as the exact
// adjoint of the forward, and through the attention against RotaryAttentionCore::backward). The
// kernels themselves run against the same layers on a GPU (tests/cuda/test_llama_kernels.cu).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "llama/device/flat_layer_layout.hpp"
#include "llama/device/llama_device_math.hpp"
#include "llama/llama_layers.hpp"
#include "llama/llama_model.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/nn/core_attention.hpp"

namespace {

using tessera::Shape;
using tessera::Tensor;
namespace dm = llama::device_math;

Tensor<float> randn(const Shape& s, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  Tensor<float> t(s);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = n(rng);
  return t;
}

// max |a - b| / max(1, max |b|) over the elements; NaN when either holds one (so a NaN never passes).
double worst(std::span<const float> a, std::span<const float> b) {
  REQUIRE(a.size() == b.size());
  double d = 0, m = 1;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return NAN;
    d = std::max(d, std::abs(static_cast<double>(a[i]) - b[i]));
    m = std::max(m, std::abs(static_cast<double>(b[i])));
  }
  return d / m;
}
std::span<const float> span(const Tensor<float>& t) { return {t.data(), static_cast<std::size_t>(t.numel())}; }

// The expanded (rows, 3 H hd) layout from a projection (rows, (H + 2 G) hd): every element by
// dm::rope_expand_value, the rope_expand kernel's own step.
std::vector<float> expand(const Tensor<float>& qkv, const dm::RopeShape& s, const std::vector<float>& cos,
                          const std::vector<float>& sin) {
  const std::int64_t rows = qkv.numel() / s.gqa_cols();
  std::vector<float> out(static_cast<std::size_t>(rows * s.mha_cols()));
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(out.size()); ++i)
    out[static_cast<std::size_t>(i)] = dm::rope_expand_value(qkv.data(), cos.data(), sin.data(), i, s);
  return out;
}

// The projection's gradient from the expanded one: every element by dm::rope_reduce_value, the
// rope_reduce kernel's own step.
std::vector<float> reduce(std::span<const float> dexp, const dm::RopeShape& s, const std::vector<float>& cos,
                          const std::vector<float>& sin) {
  const std::int64_t rows = static_cast<std::int64_t>(dexp.size()) / s.mha_cols();
  std::vector<float> out(static_cast<std::size_t>(rows * s.gqa_cols()));
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(out.size()); ++i)
    out[static_cast<std::size_t>(i)] = dm::rope_reduce_value(dexp.data(), cos.data(), sin.data(), i, s);
  return out;
}

}  // namespace

TEST_CASE("llama device math: RMSNorm row by row (rms_rstd, rms_norm_y, rms_norm_dx, rms_norm_dw_term) equals llama::RMSNorm forward and backward") {
  const std::int64_t rows = 7, C = 45;
  const Tensor<float> x = randn(Shape{rows, C}, 1), dy = randn(Shape{rows, C}, 2), w = randn(Shape{C}, 3);
  llama::RMSNorm<float> norm(C, {}, 1e-6f);
  norm.weight().value.copy_from(w);
  auto [y_ref, ctx] = norm.forward(x);
  const Tensor<float> dx_ref = norm.backward(dy, ctx);
  std::vector<float> y(static_cast<std::size_t>(rows * C)), dx(y.size()), dw(static_cast<std::size_t>(C), 0.f);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * C;
    const float* gr = dy.data() + r * C;
    float ss = 0.f;
    for (std::int64_t j = 0; j < C; ++j) ss += xr[j] * xr[j];
    const float rs = dm::rms_rstd(ss, C, 1e-6f);
    float s = 0.f;
    for (std::int64_t j = 0; j < C; ++j) {
      y[static_cast<std::size_t>(r * C + j)] = dm::rms_norm_y(xr[j], rs, w.data()[j]);
      s += gr[j] * w.data()[j] * xr[j] * rs;
      dw[static_cast<std::size_t>(j)] += dm::rms_norm_dw_term(gr[j], xr[j], rs);
    }
    for (std::int64_t j = 0; j < C; ++j)
      dx[static_cast<std::size_t>(r * C + j)] = dm::rms_norm_dx(gr[j], w.data()[j], xr[j] * rs, s / static_cast<float>(C), rs);
  }
  CHECK(worst(y, span(y_ref)) < 1e-6);
  CHECK(worst(dx, span(dx_ref)) < 1e-6);
  CHECK(worst(dw, span(norm.weight().grad)) < 1e-6);
}

TEST_CASE("llama device math: SwiGLU element by element (swiglu_columns, swiglu, swiglu_backward) equals llama::SwiGLU") {
  const std::int64_t rows = 6, F = 11;
  const Tensor<float> x = randn(Shape{2, rows / 2, 2 * F}, 4), dy = randn(Shape{2, rows / 2, F}, 5);
  llama::SwiGLU<float> act;
  auto [y_ref, ctx] = act.forward(x);
  const Tensor<float> dx_ref = act.backward(dy, ctx);
  std::vector<float> y(static_cast<std::size_t>(rows * F)), dx(static_cast<std::size_t>(rows * 2 * F), NAN);
  for (std::int64_t i = 0; i < rows * F; ++i) {
    const dm::SwiGLUColumns c = dm::swiglu_columns(i, F);
    y[static_cast<std::size_t>(i)] = dm::swiglu(x.data()[c.gate], x.data()[c.up]);
    const dm::SwiGLUGrad g = dm::swiglu_backward(x.data()[c.gate], x.data()[c.up], dy.data()[i]);
    dx[static_cast<std::size_t>(c.gate)] = g.gate;
    dx[static_cast<std::size_t>(c.up)] = g.up;
  }
  CHECK(worst(y, span(y_ref)) < 1e-6);
  CHECK(worst(dx, span(dx_ref)) < 1e-6);  // every element written once (a NaN left would fail)
}

TEST_CASE("llama device math: RoPE + GQA expansion equals RotaryAttentionCore's rotated q, k and v; its reduction is the exact adjoint") {
  // B = 2, T = 5, 4 query heads on 2 KV heads of width 6, and multi-query (1 KV head), and MHA.
  for (const auto& hg : {std::pair<std::int64_t, std::int64_t>{4, 2}, {4, 1}, {3, 3}}) {
    const std::int64_t H = hg.first, G = hg.second;  // query heads, KV heads
    CAPTURE(H);
    CAPTURE(G);
    const std::int64_t B = 2, Tn = 5, hd = 6;
    const dm::RopeShape s{.seq = Tn, .heads = H, .kv_heads = G, .head_dim = hd};
    std::vector<float> cos, sin;
    dm::rope_table(Tn, hd, 10000.0, cos, sin);
    const Tensor<float> qkv = randn(Shape{B, Tn, s.gqa_cols()}, 6);
    llama::RotaryAttentionCore<float> core(H, G, hd, 10000.0);
    auto [y_ref, ctx] = core.forward(qkv);
    const std::vector<float> out = expand(qkv, s, cos, sin);
    // q: ctx.q (rotated); k and v of query head h: KV head h / (H / G) of ctx.k (rotated) and ctx.v.
    const std::int64_t C = H * hd, Ckv = G * hd;
    double dq = 0, dk = 0, dv = 0;
    for (std::int64_t r = 0; r < B * Tn; ++r)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t j = 0; j < hd; ++j) {
          const std::int64_t g = h / (H / G);
          const float* o = out.data() + r * 3 * C;
          dq = std::max(dq, std::abs(static_cast<double>(o[h * hd + j]) - ctx.q.data()[r * C + h * hd + j]));
          dk = std::max(dk, std::abs(static_cast<double>(o[C + h * hd + j]) - ctx.k.data()[r * Ckv + g * hd + j]));
          dv = std::max(dv, std::abs(static_cast<double>(o[2 * C + h * hd + j]) - ctx.v.data()[r * Ckv + g * hd + j]));
        }
    CHECK(dq < 1e-6);
    CHECK(dk < 1e-6);
    CHECK(dv == 0);
    // Adjoint: <expand(x), d> == <x, reduce(d)> for any x, d (the backward of a linear map).
    const Tensor<float> d = randn(Shape{B, Tn, s.mha_cols()}, 7);
    const std::vector<float> rd = reduce(span(d), s, cos, sin);
    double lhs = 0, rhs = 0, scale = 0;
    for (std::size_t i = 0; i < out.size(); ++i) lhs += static_cast<double>(out[i]) * d.data()[i], scale += std::abs(out[i] * d.data()[i]);
    for (std::size_t i = 0; i < rd.size(); ++i) rhs += static_cast<double>(qkv.data()[i]) * rd[i];
    CHECK(std::abs(lhs - rhs) < 1e-5 * scale);
    // Through the attention: reduce(MHA backward of the expanded input) == RotaryAttentionCore::backward.
    const Tensor<float> dy = randn(Shape{B, Tn, C}, 8);
    const Tensor<float> dqkv_ref = core.backward(dy, ctx);
    tessera::nn::CoreAttention<float> mha(H);
    auto [y_mha, mctx] = mha.forward(Tensor<float>::from(Shape{B, Tn, s.mha_cols()}, std::span<const float>(out)));
    CHECK(worst(span(y_mha), span(y_ref)) < 1e-5);
    const Tensor<float> dexp = mha.backward(dy, mctx);
    CHECK(worst(reduce(span(dexp), s, cos, sin), span(dqkv_ref)) < 1e-5);
  }
}

TEST_CASE("llama device layout: a decoder layer's flat buffer holds every parameter once, q|k|v and gate|up fused by rows, and unpack inverts pack") {
  const llama::LlamaConfig config{.vocab_size = 64, .n_layer = 2, .n_head = 4, .n_kv_head = 2, .d_model = 24,
                                  .ffn_hidden = 20};
  llama::DecoderLayer<float> layer = llama::decoder_layer<float>(config, 1, 7);
  const llama::device::FlatLayerLayout l = llama::device::flat_layer_layout(config);
  std::int64_t params = 0;
  for (const tessera::Parameter<float>& p : layer.parameters()) params += p.value.numel();
  CHECK(l.total == params);
  using llama::device::LayerTensor;
  CHECK(l.size(LayerTensor::qkv) == 24 * (4 + 2 * 2) * 6);
  CHECK(l.at(LayerTensor::o_proj) == l.at(LayerTensor::qkv) + l.size(LayerTensor::qkv));
  const std::vector<float> flat = llama::device::pack_layer(layer, l);
  // Row 5 of the fused qkv: q_proj's row 5, then k_proj's, then v_proj's.
  auto& lin = layer.self_attn().qkv().linears();
  const std::int64_t cols = l.cols[1], off = l.at(LayerTensor::qkv) + 5 * cols;
  CHECK(flat[static_cast<std::size_t>(off)] == lin[0].weight().value.data()[5 * 24]);
  CHECK(flat[static_cast<std::size_t>(off + 24)] == lin[1].weight().value.data()[5 * 12]);
  CHECK(flat[static_cast<std::size_t>(off + 24 + 12 + 3)] == lin[2].weight().value.data()[5 * 12 + 3]);
  // gate | up: column F + j of row r is up_proj's (r, j).
  auto& gu = layer.mlp().gate_up().linears();
  CHECK(flat[static_cast<std::size_t>(l.at(LayerTensor::gate_up) + 2 * 40 + 20 + 4)] == gu[1].weight().value.data()[2 * 20 + 4]);
  // unpack(pack) into another layer reproduces every parameter bitwise.
  llama::DecoderLayer<float> other = llama::decoder_layer<float>(config, 0, 99);
  llama::device::unpack_layer(flat, other, l);
  auto a = layer.parameters(), b = other.parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CAPTURE(a[i].name);
    CHECK(std::equal(a[i].value.data(), a[i].value.data() + a[i].value.numel(), b[i].value.data()));
  }
  CHECK_THROWS_WITH_AS(llama::device::unpack_layer(std::vector<float>(3), other, l), doctest::Contains("3 values"),
                       tessera::Error);
}

TEST_CASE("llama device layout: the whole model's flat buffer (embedding, layers, norm, lm_head) round-trips, and AdamW's decay groups are weight_decay_groups'") {
  const llama::LlamaConfig config{.vocab_size = 40, .n_layer = 3, .n_head = 4, .n_kv_head = 1, .d_model = 16,
                                  .ffn_hidden = 12};
  llama::Llama<float> model(config, 3), other(config, 4);
  const llama::device::FlatModelLayout m = llama::device::flat_model_layout(config);
  tessera::ParameterList<float> ps = model.parameters();
  std::int64_t params = 0;
  for (const tessera::Parameter<float>& p : ps) params += p.value.numel();
  CHECK(m.total == params);
  CHECK(m.layer_at(2) == 40 * 16 + 2 * m.layer.total);
  CHECK(m.head == m.total - 16 * 40);
  const std::vector<float> flat = llama::device::pack_model(model, m);
  CHECK(flat[static_cast<std::size_t>(m.head + 7)] == model.last().lm_head.weight().value.data()[7]);
  llama::device::unpack_model(flat, other, m);
  tessera::ParameterList<float> qs = other.parameters();
  for (std::size_t i = 0; i < ps.size(); ++i) {
    CAPTURE(ps[i].name);
    CHECK(std::equal(ps[i].value.data(), ps[i].value.data() + ps[i].value.numel(), qs[i].value.data()));
  }
  // The segments cover the buffer once, in order; group 1 (no decay) holds exactly the elements
  // of the parameters optim::weight_decay_groups puts in its no-decay group (the norms).
  const std::vector<llama::device::FlatGroup> segs = llama::device::adamw_segments(m);
  std::int64_t at = 0, no_decay = 0, want_no_decay = 0;
  for (const llama::device::FlatGroup& g : segs) {
    CHECK(g.offset == at);
    at += g.numel;
    if (g.group == 1) no_decay += g.numel;
  }
  CHECK(at == m.total);
  const auto groups = tessera::optim::weight_decay_groups(ps, tessera::optim::AdamWOptions{.weight_decay = 0.1});
  REQUIRE(groups.size() == 2);
  for (const tessera::Parameter<float>& p : groups[1].params) want_no_decay += p.value.numel();
  CHECK(no_decay == want_no_decay);
  CHECK(no_decay == (2 * 3 + 1) * 16);
  // A model of another config is refused, naming the parameter.
  const llama::LlamaConfig wider{.vocab_size = 40, .n_layer = 3, .n_head = 4, .n_kv_head = 1, .d_model = 16,
                                 .ffn_hidden = 14};
  llama::Llama<float> wrong(wider, 5);
  CHECK_THROWS_WITH_AS(llama::device::unpack_model(flat, wrong, m), doctest::Contains("up_proj.weight of shape (16, 14) does not fit"), tessera::Error);
  CHECK_THROWS_WITH_AS(llama::device::pack_model(wrong, m), doctest::Contains("up_proj.weight of shape (16, 14) does not fit"), tessera::Error);
}

TEST_CASE("llama device layout under tp: each rank's shard holds its heads' q|k|v and gate|up columns and o_proj/down rows, the norms whole; the shards cover the layer once") {
  // 4 query heads on 2 KV heads (one KV head per rank at tp 2), and 8 on 4 (two per rank: the
  // KV heads are split in contiguous blocks, as each linear's columns).
  for (const auto& hg : {std::pair<std::int64_t, std::int64_t>{4, 2}, {8, 4}}) {
    const std::int64_t H = hg.first, G = hg.second, d = 48, hd = d / H, F = 20;
    CAPTURE(H);
    const llama::LlamaConfig config{.vocab_size = 64, .n_layer = 1, .n_head = H, .n_kv_head = G, .d_model = d,
                                    .ffn_hidden = F};
    llama::DecoderLayer<float> layer = llama::decoder_layer<float>(config, 0, 11);
    using llama::device::LayerTensor;
    const llama::device::FlatLayerLayout full = llama::device::flat_layer_layout(config);
    const std::vector<float> whole = llama::device::pack_layer(layer, full);
    const int tp = 2;
    const std::int64_t Hl = H / tp * hd, Gl = G / tp * hd, Fl = F / tp;  // a rank's columns of q, of k (v), of gate (up)
    const llama::device::FlatLayerLayout l = llama::device::flat_layer_layout(config, tp);
    CHECK(l.cols[1] == Hl + 2 * Gl);
    CHECK(l.rows[2] == Hl);
    CHECK(l.cols[4] == 2 * Fl);
    CHECK(l.rows[5] == Fl);
    std::vector<int> seen_q(static_cast<std::size_t>(H * hd), 0);  // which rank holds each column of q
    for (int r = 0; r < tp; ++r) {
      CAPTURE(r);
      const std::vector<float> shard = llama::device::pack_layer(layer, l, false, r);
      auto& lin = layer.self_attn().qkv().linears();
      // Every element of row 3 of the shard's q|k|v: q columns [Hl r, Hl (r + 1)), then k's
      // [Gl r, Gl (r + 1)), then v's.
      const std::int64_t row = l.at(LayerTensor::qkv) + 3 * l.cols[1];
      for (std::int64_t c = 0; c < Hl; ++c) {
        CHECK(shard[static_cast<std::size_t>(row + c)] == lin[0].weight().value.data()[3 * H * hd + Hl * r + c]);
        ++seen_q[static_cast<std::size_t>(Hl * r + c)];
      }
      for (std::int64_t c = 0; c < Gl; ++c) {
        CHECK(shard[static_cast<std::size_t>(row + Hl + c)] == lin[1].weight().value.data()[3 * G * hd + Gl * r + c]);
        CHECK(shard[static_cast<std::size_t>(row + Hl + Gl + c)] == lin[2].weight().value.data()[3 * G * hd + Gl * r + c]);
      }
      // gate | up: the rank's Fl columns of each.
      auto& gu = layer.mlp().gate_up().linears();
      const std::int64_t grow = l.at(LayerTensor::gate_up) + 7 * l.cols[4];
      CHECK(shard[static_cast<std::size_t>(grow + 2)] == gu[0].weight().value.data()[7 * F + Fl * r + 2]);
      CHECK(shard[static_cast<std::size_t>(grow + Fl + 9)] == gu[1].weight().value.data()[7 * F + Fl * r + 9]);
      // o_proj and down_proj: the rank's rows, whole.
      CHECK(shard[static_cast<std::size_t>(l.at(LayerTensor::o_proj) + 5 * d + 3)] ==
            layer.self_attn().o_proj().weight().value.data()[(Hl * r + 5) * d + 3]);
      CHECK(shard[static_cast<std::size_t>(l.at(LayerTensor::down_proj) + 9 * d)] ==
            layer.mlp().down_proj().weight().value.data()[(Fl * r + 9) * d]);
      // The norms whole, equal to the unsharded layout's.
      for (LayerTensor t : {LayerTensor::input_norm, LayerTensor::post_norm})
        CHECK(std::equal(shard.begin() + l.at(t), shard.begin() + l.at(t) + l.size(t), whole.begin() + full.at(t)));
    }
    CHECK(std::ranges::all_of(seen_q, [](int n) { return n == 1; }));  // every column of q on exactly one rank
    CHECK(2 * l.total - l.size(LayerTensor::input_norm) - l.size(LayerTensor::post_norm) == full.total);
    CHECK_THROWS_WITH_AS(llama::device::flat_layer_layout(config, 3), doctest::Contains("tp 3 must divide"),
                         tessera::Error);
    CHECK_THROWS_WITH_AS(llama::device::pack_layer(layer, full, false, 1), doctest::Contains("rank 1 of a layout of tp 1"),
                         tessera::Error);
  }
}

TEST_CASE("llama device layout of the whole model under tp: each rank's shard holds its vocabulary rows of embed_tokens and columns of lm_head, its layers' shards, the norm whole") {
  const llama::LlamaConfig config{.vocab_size = 40, .n_layer = 2, .n_head = 4, .n_kv_head = 2, .d_model = 16,
                                  .ffn_hidden = 12};
  const int tp = 2;
  const std::int64_t V = 40, Vl = 20, d = 16;
  llama::Llama<float> model(config, 3);
  tessera::ParameterList<float> ps = model.parameters();
  for (tessera::Parameter<float>& p : ps) {  // gradients: twice the values
    REQUIRE(p.grad.numel() == p.value.numel());
    for (std::int64_t i = 0; i < p.value.numel(); ++i) p.grad.data()[i] = 2 * p.value.data()[i];
  }
  const llama::device::FlatModelLayout m = llama::device::flat_model_layout(config, tp);
  const llama::device::FlatLayerLayout l = llama::device::flat_layer_layout(config, tp);
  CHECK(m.tp == tp);
  CHECK(m.vocab_rows == Vl);
  CHECK(m.layer.total == l.total);
  CHECK(m.first_layer == Vl * d);
  CHECK(m.norm == m.layer_at(2));
  CHECK(m.head == m.norm + d);
  CHECK(m.total == m.head + d * Vl);
  const tessera::Tensor<float>& embed = model.first().weight().value;     // [V, d]
  const tessera::Tensor<float>& head = model.last().lm_head.weight().value;  // [d, V]
  const tessera::Tensor<float>& norm = model.last().norm.weight().value;
  std::int64_t sharded = 0, replicated = 0;
  for (int r = 0; r < tp; ++r) {
    CAPTURE(r);
    const std::vector<float> shard = llama::device::pack_model(model, m, false, r),
                             grads = llama::device::pack_model(model, m, true, r);
    REQUIRE(static_cast<std::int64_t>(shard.size()) == m.total);
    int wrong = 0;
    for (std::int64_t i = 0; i < Vl; ++i)
      for (std::int64_t j = 0; j < d; ++j)
        wrong += shard[static_cast<std::size_t>(m.embed + i * d + j)] != embed.data()[(r * Vl + i) * d + j];
    for (std::int64_t i = 0; i < d; ++i)
      for (std::int64_t j = 0; j < Vl; ++j)
        wrong += shard[static_cast<std::size_t>(m.head + i * Vl + j)] != head.data()[i * V + r * Vl + j];
    for (std::int64_t j = 0; j < d; ++j) wrong += shard[static_cast<std::size_t>(m.norm + j)] != norm.data()[j];
    for (std::int64_t k = 0; k < 2; ++k) {
      const std::vector<float> layer = llama::device::pack_layer(model.layers()[static_cast<std::size_t>(k)], l, false, r);
      wrong += !std::equal(layer.begin(), layer.end(), shard.begin() + m.layer_at(k));
    }
    CHECK(wrong == 0);
    for (std::size_t i = 0; i < shard.size(); ++i) wrong += grads[i] != 2 * shard[i];
    CHECK(wrong == 0);
    for (const llama::device::FlatGroup& g : llama::device::adamw_segments(m)) (g.group == 0 ? sharded : replicated) += g.numel;
  }
  // Over the ranks the sharded groups cover the whole model once; the norms are on every rank.
  const llama::device::FlatModelLayout whole = llama::device::flat_model_layout(config);
  std::int64_t whole_sharded = 0, whole_replicated = 0;
  for (const llama::device::FlatGroup& g : llama::device::adamw_segments(whole))
    (g.group == 0 ? whole_sharded : whole_replicated) += g.numel;
  CHECK(sharded == whole_sharded);
  CHECK(replicated == tp * whole_replicated);
  CHECK(whole_replicated == (2 * 2 + 1) * d);
  // Bad input, named.
  llama::LlamaConfig odd = config;
  odd.vocab_size = 41;
  CHECK_THROWS_WITH_AS(llama::device::flat_model_layout(odd, tp), doctest::Contains("tp 2 must divide vocab_size 41"),
                       tessera::Error);
  CHECK_THROWS_WITH_AS(llama::device::pack_model(model, m, false, 2), doctest::Contains("rank 2 of a layout of tp 2"),
                       tessera::Error);
  const std::vector<float> shard = llama::device::pack_model(model, m, false, 0);
  CHECK_THROWS_WITH_AS(llama::device::unpack_model(shard, model, m), doctest::Contains("holds one rank's shard"),
                       tessera::Error);
  llama::Llama<float> other_vocab(odd, 3);
  CHECK_THROWS_WITH_AS(llama::device::pack_model(other_vocab, whole), doctest::Contains("a model of vocabulary 41"),
                       tessera::Error);
}

TEST_CASE("llama device layout of pipeline stages: a stage's weights are one range of the flat buffer, and its AdamW segments are the whole model's inside it") {
  const llama::LlamaConfig config{.vocab_size = 40, .n_layer = 4, .n_head = 4, .n_kv_head = 2, .d_model = 16,
                                  .ffn_hidden = 12};
  for (const int tp : {1, 2}) {
    CAPTURE(tp);
    const llama::device::FlatModelLayout m = llama::device::flat_model_layout(config, tp);
    CHECK(llama::device::pipeline_num_layers(config) == 6);
    CHECK(llama::device::pipeline_layer_offset(m, 0) == 0);
    CHECK(llama::device::pipeline_layer_offset(m, 1) == m.first_layer);
    CHECK(llama::device::pipeline_layer_offset(m, 3) == m.layer_at(2));
    CHECK(llama::device::pipeline_layer_offset(m, 5) == m.norm);
    CHECK(llama::device::pipeline_layer_offset(m, 6) == m.total);
    // The stages of a cut cover the buffer once, in order; their segments are the whole's.
    const std::vector<llama::device::FlatGroup> whole = llama::device::adamw_segments(m);
    for (const std::vector<int>& bounds : {std::vector<int>{0, 3, 6}, {0, 2, 4, 5, 6}, {0, 1, 5, 6}}) {
      std::int64_t at = 0;
      std::size_t seg = 0;
      for (std::size_t s = 0; s + 1 < bounds.size(); ++s) {
        const llama::device::FlatRange r = llama::device::stage_range(m, bounds[s], bounds[s + 1]);
        CHECK(r.lo == at);
        at = r.hi;
        std::int64_t covered = 0;
        for (const llama::device::FlatGroup& g : llama::device::stage_segments(m, bounds[s], bounds[s + 1])) {
          REQUIRE(seg < whole.size());
          CHECK(g.offset + r.lo == whole[seg].offset);
          CHECK(g.numel == whole[seg].numel);
          CHECK(g.group == whole[seg].group);
          CHECK(g.offset == covered);
          covered += g.numel;
          ++seg;
        }
        CHECK(covered == r.hi - r.lo);
      }
      CHECK(at == m.total);
      CHECK(seg == whole.size());
    }
  }
  const llama::device::FlatModelLayout m = llama::device::flat_model_layout(config);
  CHECK_THROWS_WITH_AS(llama::device::stage_range(m, 3, 3), doctest::Contains("pipeline layers [3, 3) of a model of 6"),
                       tessera::Error);
  CHECK_THROWS_WITH_AS(llama::device::stage_range(m, 2, 7), doctest::Contains("pipeline layers [2, 7) of a model of 6"),
                       tessera::Error);
  CHECK_THROWS_WITH_AS(llama::device::pipeline_layer_offset(m, -1), doctest::Contains("pipeline layer -1 of a model of 6"),
                       tessera::Error);
}
