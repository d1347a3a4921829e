// The Llama example's layers (examples/llama/llama_layers.hpp), serial, in double: each forward
// against a naive computation written here from the papers' formulas (not from the layer's code),
// each backward against central finite differences, at odd sizes (T = 5, 4 query heads on 2 KV
// heads of width 6, F = 7).

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "llama/llama_model.hpp"
#include "tessera/core/random.hpp"
#include "tessera/nn/core_attention.hpp"
#include "tessera/testing/compare.hpp"

namespace {

using tessera::Parameter;
using tessera::ParameterList;
using tessera::Shape;
using tessera::Tensor;
using tessera::testing::max_rel_error;
using tessera::testing::WorstError;

constexpr std::int64_t kB = 2, kT = 5;

Tensor<double> random_tensor(const Shape& shape, std::uint64_t seed, double std = 1.0) {
  Tensor<double> t = Tensor<double>::empty(shape);
  tessera::fill_normal(t, seed, "x", std);
  return t;
}

void randomize(const ParameterList<double>& ps, std::uint64_t seed, double std = 0.5) {
  for (Parameter<double>& p : ps) tessera::fill_normal(p.value, seed, p.name, std);
}

std::span<const double> span_of(const Tensor<double>& t) { return t.contiguous().span(); }

double rel(const Tensor<double>& a, const Tensor<double>& b) {
  if (a.shape() != b.shape()) return tessera::testing::infinite_error;
  return max_rel_error(span_of(a), span_of(b));
}

// ---- naive references, from the definitions ---------------------------------------------------

// x: (rows, d) as a flat row-major vector.
Tensor<double> rms_norm_ref(const Tensor<double>& x, const Tensor<double>& w, double eps) {
  const Tensor<double> xc = x.contiguous();
  Tensor<double> y(x.shape());
  const std::int64_t d = x.size(-1), rows = x.numel() / d;
  for (std::int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (std::int64_t j = 0; j < d; ++j) ss += xc.data()[r * d + j] * xc.data()[r * d + j];
    const double rms = std::sqrt(ss / static_cast<double>(d) + eps);
    for (std::int64_t j = 0; j < d; ++j) y.data()[r * d + j] = xc.data()[r * d + j] / rms * w.data()[j];
  }
  return y;
}

// y = x W with W [in, out]; x (..., in).
Tensor<double> matmul_ref(const Tensor<double>& x, const Tensor<double>& w) {
  const Tensor<double> xc = x.contiguous();
  const std::int64_t in = w.size(0), out = w.size(1), rows = x.numel() / in;
  Tensor<double> y(x.shape().with(-1, out));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < out; ++j) {
      double s = 0;
      for (std::int64_t i = 0; i < in; ++i) s += xc.data()[r * in + i] * w(i, j);
      y.data()[r * out + j] = s;
    }
  return y;
}

// silu(gate) * up for x = [gate | up].
Tensor<double> swiglu_ref(const Tensor<double>& x) {
  const Tensor<double> xc = x.contiguous();
  const std::int64_t f = x.size(-1) / 2, rows = x.numel() / (2 * f);
  Tensor<double> y(x.shape().with(-1, f));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < f; ++j) {
      const double g = xc.data()[r * 2 * f + j], u = xc.data()[r * 2 * f + f + j];
      y.data()[r * f + j] = g / (1 + std::exp(-g)) * u;
    }
  return y;
}

// Hugging Face Llama's apply_rotary_pos_emb on one head vector at position t:
// x * cos(emb) + rotate_half(x) * sin(emb), emb = cat(freqs, freqs), rotate_half = cat(-x2, x1).
std::vector<double> rope_ref(const std::vector<double>& x, std::int64_t t, double theta) {
  const std::size_t hd = x.size(), half = hd / 2;
  std::vector<double> emb(hd), rot(hd), out(hd);
  for (std::size_t i = 0; i < half; ++i) {
    const double freq = static_cast<double>(t) / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(hd));
    emb[i] = emb[i + half] = freq;
    rot[i] = -x[i + half];
    rot[i + half] = x[i];
  }
  for (std::size_t i = 0; i < hd; ++i) out[i] = x[i] * std::cos(emb[i]) + rot[i] * std::sin(emb[i]);
  return out;
}

// Causal GQA with RoPE on qkv (B, T, (nq + 2 nkv) hd) = [q heads | k heads | v heads]: query
// head h reads KV head h / (nq / nkv) (Hugging Face repeat_kv).
Tensor<double> attention_ref(const Tensor<double>& qkv, std::int64_t nq, std::int64_t nkv, std::int64_t hd,
                             double theta = 10000.0) {
  const std::int64_t B = qkv.size(0), Tn = qkv.size(1);
  Tensor<double> y(Shape{B, Tn, nq * hd});
  auto head = [&](std::int64_t b, std::int64_t t, std::int64_t col0) {
    std::vector<double> v(static_cast<std::size_t>(hd));
    for (std::int64_t i = 0; i < hd; ++i) v[static_cast<std::size_t>(i)] = qkv(b, t, col0 + i);
    return v;
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < nq; ++h) {
      const std::int64_t g = h / (nq / nkv);
      for (std::int64_t t = 0; t < Tn; ++t) {
        const std::vector<double> q = rope_ref(head(b, t, h * hd), t, theta);
        std::vector<double> s(static_cast<std::size_t>(t + 1));
        double mx = -1e300;
        for (std::int64_t j = 0; j <= t; ++j) {
          const std::vector<double> k = rope_ref(head(b, j, (nq + g) * hd), j, theta);
          double dot = 0;
          for (std::int64_t i = 0; i < hd; ++i) dot += q[static_cast<std::size_t>(i)] * k[static_cast<std::size_t>(i)];
          s[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[static_cast<std::size_t>(j)]);
        }
        double z = 0;
        for (double& e : s) z += (e = std::exp(e - mx));
        for (std::int64_t j = 0; j <= t; ++j) {
          const std::vector<double> v = head(b, j, (nq + nkv + g) * hd);
          for (std::int64_t i = 0; i < hd; ++i)
            y(b, t, h * hd + i) += s[static_cast<std::size_t>(j)] / z * v[static_cast<std::size_t>(i)];
        }
      }
    }
  return y;
}

// ---- finite differences ----------------------------------------------------------------------

// The largest relative difference between `analytic` (dL/dt) and central differences of
// L = loss() in every element of `t` (modified in place and restored).
double fd_error(const Tensor<double>& t, const Tensor<double>& analytic, const std::function<double()>& loss,
                double h = 1e-6) {
  REQUIRE(t.is_contiguous());
  Tensor<double> numeric(t.shape());
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const double keep = t.data()[i];
    t.data()[i] = keep + h;
    const double up = loss();
    t.data()[i] = keep - h;
    const double down = loss();
    t.data()[i] = keep;
    numeric.data()[i] = (up - down) / (2 * h);
  }
  return rel(analytic, numeric);
}

// sum(y * w): a loss whose output gradient is w.
double dot(const Tensor<double>& y, const Tensor<double>& w) {
  const Tensor<double> yc = y.contiguous(), wc = w.contiguous();
  REQUIRE(yc.shape() == wc.shape());
  double s = 0;
  for (std::int64_t i = 0; i < yc.numel(); ++i) s += yc.data()[i] * wc.data()[i];
  return s;
}

// Checks a layer's input gradient and every parameter gradient against finite differences of
// L = sum(forward(x) * w).
template <class L>
void check_backward(L& layer, const Tensor<double>& x, double tol = 1e-6) {
  auto [y, ctx] = layer.forward(x);
  const Tensor<double> w = random_tensor(y.shape(), 99);
  layer.parameters().zero_grad();
  const Tensor<double> dx = layer.backward(w, ctx);
  auto loss = [&] { return dot(layer.forward(x).output, w); };
  CHECK(fd_error(x, dx, loss) < tol);
  for (Parameter<double>& p : layer.parameters()) {
    INFO("parameter ", p.name);
    CHECK(fd_error(p.value, p.grad.clone(), loss) < tol);
  }
}

llama::LlamaConfig small_config(std::int64_t nq = 4, std::int64_t nkv = 2) {
  return {.vocab_size = 11, .n_layer = 2, .n_head = nq, .n_kv_head = nkv, .d_model = nq * 6, .ffn_hidden = 7,
          .rope_theta = 10000.0, .norm_eps = 1e-5};
}

// ---- RMSNorm, SwiGLU, MultiLinear ------------------------------------------------------------

TEST_CASE("RMSNorm: forward equals x / sqrt(mean(x^2) + eps) * weight; backward equals finite differences") {
  llama::RMSNorm<double> norm(7, {.prefix = "n"}, 1e-5);
  CHECK(norm.parameters().size() == 1);
  CHECK(norm.weight().name == "n.weight");
  randomize(norm.parameters(), 3);
  const Tensor<double> x = random_tensor(Shape{kB, kT, 7}, 1);
  CHECK(rel(norm.forward(x).output, rms_norm_ref(x, norm.weight().value, 1e-5)) < 1e-14);
  check_backward(norm, x);
}

TEST_CASE("SwiGLU: forward equals silu(gate) * up of the halves; backward equals finite differences") {
  llama::SwiGLU<double> act;
  const Tensor<double> x = random_tensor(Shape{kB, kT, 14}, 2);  // F = 7
  const Tensor<double> y = act.forward(x).output;
  CHECK(y.shape() == Shape{kB, kT, 7});
  CHECK(rel(y, swiglu_ref(x)) < 1e-14);
  check_backward(act, x);
  // Any even width: a tensor-parallel rank's [gate shard | up shard] of 2 columns.
  CHECK(rel(act.forward(x.slice(2, 0, 2)).output, swiglu_ref(x.slice(2, 0, 2))) < 1e-14);
  CHECK_THROWS_WITH_AS(act.forward(random_tensor(Shape{2, 3}, 1)), doctest::Contains("(2, 3)"), tessera::Error);
}

TEST_CASE("MultiLinear: the concatenation of its linears, each under its own name; backward sums their dx") {
  llama::MultiLinear<double> ml(5, {{.name = "a", .out_features = 3}, {.name = "b", .out_features = 4}},
                                {.prefix = "m", .seed = 1});
  const ParameterList<double> ps = ml.parameters();
  REQUIRE(ps.size() == 2);
  CHECK(ps[0].name == "m.a.weight");
  CHECK(ps[1].name == "m.b.weight");
  CHECK(ps[0].value.shape() == Shape{5, 3});
  CHECK(ps[1].value.shape() == Shape{5, 4});
  randomize(ps, 4);
  const Tensor<double> x = random_tensor(Shape{kB, kT, 5}, 3);
  const Tensor<double> want = tessera::concat(std::vector<Tensor<double>>{matmul_ref(x, ps[0].value), matmul_ref(x, ps[1].value)}, -1);
  CHECK(rel(ml.forward(x).output, want) < 1e-14);
  check_backward(ml, x);
}

// ---- rotary attention ----------------------------------------------------------------------------

TEST_CASE("RotaryAttentionCore: RoPE + causal GQA equals the naive computation; backward equals finite differences") {
  for (auto [nq, nkv] : {std::pair<std::int64_t, std::int64_t>{4, 2}, {4, 4}, {4, 1}, {6, 3}}) {
    CAPTURE(nq);
    CAPTURE(nkv);
    const std::int64_t hd = 6;
    llama::RotaryAttentionCore<double> core(nq, nkv, hd);
    CHECK(core.parameters().empty());
    // Large enough values that the rotation angles and the softmax both matter.
    const Tensor<double> qkv = random_tensor(Shape{kB, kT, (nq + 2 * nkv) * hd}, 5, 1.5);
    const Tensor<double> y = core.forward(qkv).output;
    CHECK(y.shape() == Shape{kB, kT, nq * hd});
    CHECK(rel(y, attention_ref(qkv, nq, nkv, hd)) < 1e-12);
    check_backward(core, qkv);
  }
}

TEST_CASE("RotaryAttentionCore: rope_theta is the RoPE base, and position 0 is not rotated") {
  const Tensor<double> qkv = random_tensor(Shape{1, kT, (2 + 2 * 1) * 4}, 6, 1.5);
  llama::RotaryAttentionCore<double> core(2, 1, 4, 500.0);
  CHECK(rel(core.forward(qkv).output, attention_ref(qkv, 2, 1, 4, 500.0)) < 1e-12);
  CHECK(rel(core.forward(qkv).output, attention_ref(qkv, 2, 1, 4, 10000.0)) > 1e-3);
  // T = 1: no rotation, one key: y = v.
  const Tensor<double> one = qkv.slice(1, 0, 1).contiguous();
  const Tensor<double> y1 = core.forward(one).output;
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t i = 0; i < 4; ++i) CHECK(y1(0, 0, h * 4 + i) == doctest::Approx(one(0, 0, (2 + 1) * 4 + i)));
}

// rope_ref on every head of q and k, for nkv == nq.
Tensor<double> rotate_qk_ref(const Tensor<double>& qkv, std::int64_t n_head, std::int64_t hd, double sign) {
  Tensor<double> out = qkv.clone();
  for (std::int64_t b = 0; b < qkv.size(0); ++b)
    for (std::int64_t t = 0; t < qkv.size(1); ++t)
      for (std::int64_t h = 0; h < 2 * n_head; ++h) {  // q heads, then k heads
        std::vector<double> v(static_cast<std::size_t>(hd));
        for (std::int64_t i = 0; i < hd; ++i) v[static_cast<std::size_t>(i)] = qkv(b, t, h * hd + i);
        // A rotation by -angle is the rotation at position -t.
        const std::vector<double> r = rope_ref(v, sign > 0 ? t : -t, 10000.0);
        for (std::int64_t i = 0; i < hd; ++i) out(b, t, h * hd + i) = r[static_cast<std::size_t>(i)];
      }
  return out;
}

TEST_CASE("RotaryAttentionCore: with n_kv_head == n_head it is tessera's multi-head CoreAttention on rotated q and k") {
  const std::int64_t nh = 3, hd = 4;
  const Tensor<double> qkv = random_tensor(Shape{kB, kT, 3 * nh * hd}, 7, 1.5);
  const Tensor<double> dy = random_tensor(Shape{kB, kT, nh * hd}, 8);
  llama::RotaryAttentionCore<double> rope(nh, nh, hd);
  tessera::nn::CoreAttention<double> mha(nh);
  auto [y, c] = rope.forward(qkv);
  auto [ym, cm] = mha.forward(rotate_qk_ref(qkv, nh, hd, 1));
  CHECK(rel(y, ym) < 1e-13);
  // d/dqkv = R^T (d/d rotated qkv): the rotation back.
  CHECK(rel(rope.backward(dy, c), rotate_qk_ref(mha.backward(dy, cm), nh, hd, -1)) < 1e-12);
}

TEST_CASE("RotaryAttentionCore: grouped-query attention equals multi-head attention on repeated KV heads") {
  // Hugging Face repeat_kv: KV head g serves query heads g * group .. (g + 1) * group - 1.
  for (std::int64_t nkv : {1, 2}) {
    CAPTURE(nkv);
    const std::int64_t nq = 4, hd = 6, group = nq / nkv;
    const Tensor<double> qkv = random_tensor(Shape{kB, kT, (nq + 2 * nkv) * hd}, 9, 1.5);
    Tensor<double> rep(Shape{kB, kT, 3 * nq * hd});
    rep.slice(2, 0, nq * hd).copy_from(qkv.slice(2, 0, nq * hd));
    for (std::int64_t h = 0; h < nq; ++h)
      for (std::int64_t part = 1; part <= 2; ++part) {  // k, then v
        const std::int64_t src = (nq + (part - 1) * nkv + h / group) * hd, dst = (part * nq + h) * hd;
        rep.slice(2, dst, dst + hd).copy_from(qkv.slice(2, src, src + hd));
      }
    llama::RotaryAttentionCore<double> gqa(nq, nkv, hd), mha(nq, nq, hd);
    auto [y, c] = gqa.forward(qkv);
    auto [ym, cm] = mha.forward(rep);
    CHECK(rel(y, ym) < 1e-13);
    // The gradient of a shared KV head is the sum over the query heads of its group.
    const Tensor<double> dy = random_tensor(y.shape(), 10);
    const Tensor<double> dx = gqa.backward(dy, c), dxm = mha.backward(dy, cm);
    Tensor<double> want(qkv.shape());
    want.slice(2, 0, nq * hd).copy_from(dxm.slice(2, 0, nq * hd));
    for (std::int64_t h = 0; h < nq; ++h)
      for (std::int64_t part = 1; part <= 2; ++part) {
        const std::int64_t dst = (nq + (part - 1) * nkv + h / group) * hd, src = (part * nq + h) * hd;
        want.slice(2, dst, dst + hd).add_(dxm.slice(2, src, src + hd));
      }
    CHECK(rel(dx, want) < 1e-12);
  }
}

TEST_CASE("RotaryAttentionCore: bad head counts and inputs are errors naming the numbers") {
  CHECK_THROWS_WITH_AS(llama::RotaryAttentionCore<double>(4, 3, 6), doctest::Contains("n_kv_head 3"), tessera::Error);
  CHECK_THROWS_WITH_AS(llama::RotaryAttentionCore<double>(4, 2, 5), doctest::Contains("head_dim 5"), tessera::Error);
  llama::RotaryAttentionCore<double> core(4, 2, 6);
  CHECK_THROWS_WITH_AS(core.forward(random_tensor(Shape{1, 3, 4 * 3 * 6}, 1)), doctest::Contains("(1, 3, 72)"),
                       tessera::Error);
  // Its tensor-parallel shard: whole query and KV heads per rank.
  const auto shard = tessera::TensorParallelShard<llama::RotaryAttentionCore<double>>::heads(core, 1, 2);
  CHECK(shard.n_head() == 2);
  CHECK(shard.n_kv_head() == 1);
  CHECK(shard.head_dim() == 6);
  CHECK_THROWS_WITH_AS(tessera::TensorParallelShard<llama::RotaryAttentionCore<double>>::heads(core, 0, 4),
                       doctest::Contains("n_head 4 and n_kv_head 2 must both be divisible by tp 4"), tessera::Error);
}

// ---- attention, MLP, decoder layer ----------------------------------------------------------------

TEST_CASE("Attention, MLP and DecoderLayer: forward equals the naive composition; backward equals finite differences") {
  const llama::LlamaConfig c = small_config();  // d = 24, 4 query heads on 2 KV heads of 6, F = 7
  llama::DecoderLayer<double> layer(c, {.prefix = "model.layers.0", .seed = 1});
  randomize(layer.parameters(), 11);
  const ParameterList<double> ps = layer.parameters();
  const Tensor<double> x = random_tensor(Shape{kB, kT, c.d_model}, 12);

  // The reference, from the parameters by name.
  auto w = [&](const std::string& name) { return ps.at("model.layers.0." + name).value; };
  const Tensor<double> h1 = rms_norm_ref(x, w("input_layernorm.weight"), c.norm_eps);
  const Tensor<double> qkv = tessera::concat(
      std::vector<Tensor<double>>{matmul_ref(h1, w("self_attn.q_proj.weight")), matmul_ref(h1, w("self_attn.k_proj.weight")),
                                  matmul_ref(h1, w("self_attn.v_proj.weight"))},
      -1);
  Tensor<double> x1 = matmul_ref(attention_ref(qkv, c.n_head, c.n_kv_head, c.head_dim()), w("self_attn.o_proj.weight"));
  x1.add_(x);
  const Tensor<double> h2 = rms_norm_ref(x1, w("post_attention_layernorm.weight"), c.norm_eps);
  const Tensor<double> gu = tessera::concat(
      std::vector<Tensor<double>>{matmul_ref(h2, w("mlp.gate_proj.weight")), matmul_ref(h2, w("mlp.up_proj.weight"))}, -1);
  Tensor<double> y = matmul_ref(swiglu_ref(gu), w("mlp.down_proj.weight"));
  y.add_(x1);

  CHECK(rel(layer.self_attn().forward(h1).output, matmul_ref(attention_ref(qkv, c.n_head, c.n_kv_head, c.head_dim()),
                                                             w("self_attn.o_proj.weight"))) < 1e-12);
  CHECK(rel(layer.mlp().forward(h2).output, matmul_ref(swiglu_ref(gu), w("mlp.down_proj.weight"))) < 1e-12);
  CHECK(rel(layer.forward(x).output, y) < 1e-12);
  check_backward(layer.self_attn(), h1);
  check_backward(layer.mlp(), h2);
  check_backward(layer, x);
}

// ---- configuration and the whole model ------------------------------------------------------------

TEST_CASE("LlamaConfig::validated: each bad configuration is an error naming the numbers") {
  CHECK_NOTHROW(llama::validated(small_config()));
  auto bad = [](llama::LlamaConfig c, const char* what) {
    CHECK_THROWS_WITH_AS(llama::validated(c), doctest::Contains(what), tessera::Error);
  };
  llama::LlamaConfig c = small_config();
  c.n_kv_head = 3;
  bad(c, "n_kv_head 3 does not divide n_head 4");
  c = small_config();
  c.d_model = 26;
  bad(c, "n_head 4 does not divide d_model 26");
  c = small_config();
  c.d_model = 20;  // head_dim 5
  bad(c, "head_dim 5");
  c = small_config();
  c.ffn_hidden = 0;
  bad(c, "ffn_hidden=0");
  CHECK_THROWS_WITH_AS(llama::Llama<double>(llama::LlamaConfig{.n_head = 6, .n_kv_head = 4, .d_model = 24}),
                       doctest::Contains("n_kv_head 4 does not divide n_head 6"), tessera::Error);
}

TEST_CASE("Llama: Hugging Face parameter names and shapes, untied head, deterministic per-layer init") {
  const llama::LlamaConfig c = small_config();
  llama::Llama<double> model(c, 7);
  std::vector<std::string> want{"model.embed_tokens.weight"};
  for (int i = 0; i < 2; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    for (const char* n : {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                          "mlp.down_proj"})
      want.push_back(p + n + ".weight");
  }
  want.push_back("model.norm.weight");
  want.push_back("lm_head.weight");
  const ParameterList<double> ps = model.parameters();
  REQUIRE(ps.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) CHECK(ps[i].name == want[i]);
  const std::int64_t d = c.d_model, hd = c.head_dim();
  CHECK(ps.at("model.embed_tokens.weight").value.shape() == Shape{c.vocab_size, d});
  CHECK(ps.at("model.layers.1.self_attn.q_proj.weight").value.shape() == Shape{d, c.n_head * hd});
  CHECK(ps.at("model.layers.1.self_attn.k_proj.weight").value.shape() == Shape{d, c.n_kv_head * hd});
  CHECK(ps.at("model.layers.1.self_attn.v_proj.weight").value.shape() == Shape{d, c.n_kv_head * hd});
  CHECK(ps.at("model.layers.1.self_attn.o_proj.weight").value.shape() == Shape{c.n_head * hd, d});
  CHECK(ps.at("model.layers.1.mlp.gate_proj.weight").value.shape() == Shape{d, c.ffn_hidden});
  CHECK(ps.at("model.layers.1.mlp.down_proj.weight").value.shape() == Shape{c.ffn_hidden, d});
  CHECK(ps.at("lm_head.weight").value.shape() == Shape{d, c.vocab_size});
  CHECK(ps.at("model.norm.weight").value(0) == 1.0);
  // Untied: the head's storage is not the embedding's.
  CHECK(!ps.at("lm_head.weight").value.shares_storage_with(ps.at("model.embed_tokens.weight").value));

  // The same (config, seed): the same values; layer 1 built alone equals the model's layer 1.
  llama::Llama<double> again(c, 7), other(c, 8);
  const ParameterList<double> pa = again.parameters(), po = other.parameters();
  llama::DecoderLayer<double> alone = llama::decoder_layer<double>(c, 1, 7);
  for (std::size_t i = 0; i < ps.size(); ++i) {
    CHECK(tessera::testing::bitwise_equal_finite(span_of(ps[i].value), span_of(pa[i].value)));
    if (ps[i].name != "model.norm.weight" && ps[i].name.find("layernorm") == std::string::npos)
      CHECK(!tessera::testing::bitwise_equal_finite(span_of(ps[i].value), span_of(po[i].value)));
  }
  for (Parameter<double>& p : alone.parameters())
    CHECK(tessera::testing::bitwise_equal_finite(span_of(p.value), span_of(ps.at(p.name).value)));
}

TEST_CASE("Llama: logits equal the layers run in order; backward equals finite differences") {
  const llama::LlamaConfig c = small_config(4, 1);  // multi-query attention
  llama::Llama<double> model(c, 3);
  randomize(model.parameters(), 13, 0.4);
  Tensor<std::int32_t> tokens = Tensor<std::int32_t>::empty(Shape{kB, kT});
  for (std::int64_t i = 0; i < tokens.numel(); ++i) tokens.data()[i] = static_cast<std::int32_t>((7 * i + 3) % c.vocab_size);
  auto [logits, ctx] = model.forward(tokens);
  CHECK(logits.shape() == Shape{kB, kT, c.vocab_size});

  // Reference: embedding rows, the two layers' own forwards, norm, head.
  const ParameterList<double> ps = model.parameters();
  Tensor<double> x(Shape{kB, kT, c.d_model});
  for (std::int64_t b = 0; b < kB; ++b)
    for (std::int64_t t = 0; t < kT; ++t)
      for (std::int64_t j = 0; j < c.d_model; ++j) x(b, t, j) = ps.at("model.embed_tokens.weight").value(tokens(b, t), j);
  for (auto& layer : model.layers()) x = layer.forward(x).output;
  const Tensor<double> want = matmul_ref(rms_norm_ref(x, ps.at("model.norm.weight").value, c.norm_eps),
                                         ps.at("lm_head.weight").value);
  CHECK(rel(logits, want) < 1e-12);

  const Tensor<double> w = random_tensor(logits.shape(), 14);
  ps.zero_grad();
  model.backward(w, ctx);
  auto loss = [&] { return dot(model.forward(tokens).output, w); };
  for (const char* name : {"model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                           "model.layers.1.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight",
                           "model.norm.weight", "lm_head.weight"}) {
    INFO("parameter ", name);
    Parameter<double>& p = ps.at(name);
    CHECK(fd_error(p.value, p.grad.clone(), loss) < 1e-6);
  }
}

}  // namespace
