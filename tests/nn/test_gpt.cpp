// The GPT-2 model: Hugging Face names and shapes, GPT-2 initialization, the loss against an
// independent loop-based fp64 reference, the full backward against finite differences, and
// errors on bad tokens and sequences.

#include <doctest/doctest.h>

#include <cmath>
#include <numbers>
#include <cstdint>
#include <string>
#include <vector>

#include "nn_test_util.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/models/gpt.hpp"

using tessera::Shape;
using tessera::Tensor;
using namespace tessera::nn;
using tessera::GPT;
using tessera::GPTConfig;
using nn_test::contains;
using nn_test::error_of;

static_assert(tessera::Layer<GPT<float>> && tessera::Layer<GPT<double>>);

namespace {

const GPTConfig tiny{.vocab_size = 11, .n_positions = 8, .n_layer = 2, .n_head = 2, .d_model = 8};

// Fixed weights, independent of the library's initializer: parameter k, element i gets
// 0.3 sin(0.7 i + k) (LayerNorm weights 1 + that), so every parameter is distinct and O(0.3).
template <class T>
void set_fixed_weights(GPT<T>& model) {
  int k = 0;
  for (tessera::Parameter<T>& p : model.parameters()) {
    const bool ln_weight = p.name.find("ln_") != std::string::npos && p.name.ends_with(".weight");
    for (std::int64_t i = 0; i < p.value.numel(); ++i)
      p.value.data()[i] = static_cast<T>((ln_weight ? 1.0 : 0.0) + 0.3 * std::sin(0.7 * static_cast<double>(i) + k));
    ++k;
  }
}

// ---- A direct fp64 reference of GPT-2's forward and mean cross-entropy: plain loops over
// ---- std::vector, reading the weights by their Hugging Face names.
using Mat = std::vector<std::vector<double>>;  // [rows][cols]

struct Ref {
  const tessera::ParameterList<double>& ps;
  double w(const std::string& name, std::int64_t i, std::int64_t j) const {
    const Tensor<double>& v = ps.at(name).value;
    return v.data()[i * v.size(1) + j];
  }
  double b(const std::string& name, std::int64_t i) const { return ps.at(name).value.data()[i]; }

  Mat layer_norm(const Mat& x, const std::string& pre) const {
    Mat y = x;
    for (std::size_t r = 0; r < x.size(); ++r) {
      const double n = static_cast<double>(x[r].size());
      double mean = 0, var = 0;
      for (double v : x[r]) mean += v / n;
      for (double v : x[r]) var += (v - mean) * (v - mean) / n;
      for (std::size_t j = 0; j < x[r].size(); ++j)
        y[r][j] = (x[r][j] - mean) / std::sqrt(var + 1e-5) * b(pre + ".weight", static_cast<std::int64_t>(j)) +
                  b(pre + ".bias", static_cast<std::int64_t>(j));
    }
    return y;
  }
  Mat linear(const Mat& x, const std::string& pre, std::int64_t out) const {
    Mat y(x.size(), std::vector<double>(static_cast<std::size_t>(out)));
    for (std::size_t r = 0; r < x.size(); ++r)
      for (std::int64_t j = 0; j < out; ++j) {
        double s = b(pre + ".bias", j);
        for (std::size_t c = 0; c < x[r].size(); ++c) s += x[r][c] * w(pre + ".weight", static_cast<std::int64_t>(c), j);
        y[r][static_cast<std::size_t>(j)] = s;
      }
    return y;
  }
};

double reference_loss(GPT<double>& model, const std::vector<std::vector<int>>& tokens,
                      const std::vector<std::vector<int>>& targets) {
  const GPTConfig& c = model.config();
  const tessera::ParameterList<double> ps = model.parameters();
  const Ref ref{ps};
  const std::int64_t d = c.d_model, H = c.n_head, hd = d / H;
  double total = 0;
  int valid = 0;
  for (std::size_t bi = 0; bi < tokens.size(); ++bi) {  // each sequence on its own
    const std::size_t T = tokens[bi].size();
    Mat x(T, std::vector<double>(static_cast<std::size_t>(d)));
    for (std::size_t t = 0; t < T; ++t)
      for (std::int64_t j = 0; j < d; ++j)
        x[t][static_cast<std::size_t>(j)] = ref.w("wte.weight", tokens[bi][t], j) + ref.w("wpe.weight", static_cast<std::int64_t>(t), j);
    for (std::int64_t l = 0; l < c.n_layer; ++l) {
      const std::string h = "h." + std::to_string(l);
      const Mat qkv = ref.linear(ref.layer_norm(x, h + ".ln_1"), h + ".attn.c_attn", 3 * d);
      Mat att(T, std::vector<double>(static_cast<std::size_t>(d)));
      for (std::int64_t head = 0; head < H; ++head)
        for (std::size_t t = 0; t < T; ++t) {
          std::vector<double> s(t + 1);
          double mx = -1e300;
          for (std::size_t u = 0; u <= t; ++u) {
            double dotp = 0;
            for (std::int64_t i = 0; i < hd; ++i)
              dotp += qkv[t][static_cast<std::size_t>(head * hd + i)] * qkv[u][static_cast<std::size_t>(d + head * hd + i)];
            s[u] = dotp / std::sqrt(static_cast<double>(hd));
            mx = std::max(mx, s[u]);
          }
          double z = 0;
          for (double& v : s) z += (v = std::exp(v - mx));
          for (std::int64_t i = 0; i < hd; ++i) {
            double o = 0;
            for (std::size_t u = 0; u <= t; ++u) o += s[u] / z * qkv[u][static_cast<std::size_t>(2 * d + head * hd + i)];
            att[t][static_cast<std::size_t>(head * hd + i)] = o;
          }
        }
      const Mat a = ref.linear(att, h + ".attn.c_proj", d);
      for (std::size_t t = 0; t < T; ++t)
        for (std::size_t j = 0; j < static_cast<std::size_t>(d); ++j) x[t][j] += a[t][j];
      Mat f = ref.linear(ref.layer_norm(x, h + ".ln_2"), h + ".mlp.c_fc", 4 * d);
      for (auto& row : f)
        for (double& v : row) v = 0.5 * v * (1 + std::tanh(std::sqrt(2 / std::numbers::pi) * (v + 0.044715 * v * v * v)));
      const Mat m = ref.linear(f, h + ".mlp.c_proj", d);
      for (std::size_t t = 0; t < T; ++t)
        for (std::size_t j = 0; j < static_cast<std::size_t>(d); ++j) x[t][j] += m[t][j];
    }
    const Mat xf = ref.layer_norm(x, "ln_f");
    for (std::size_t t = 0; t < T; ++t) {
      if (targets[bi][t] == -100) continue;
      std::vector<double> logits(static_cast<std::size_t>(c.vocab_size));
      for (std::int64_t v = 0; v < c.vocab_size; ++v)
        for (std::int64_t j = 0; j < d; ++j) logits[static_cast<std::size_t>(v)] += xf[t][static_cast<std::size_t>(j)] * ref.w("wte.weight", v, j);
      double z = 0;
      for (double v : logits) z += std::exp(v);
      total += std::log(z) - logits[static_cast<std::size_t>(targets[bi][t])];
      ++valid;
    }
  }
  return total / valid;
}

Tensor<std::int32_t> to_tensor(const std::vector<std::vector<int>>& rows) {
  Tensor<std::int32_t> t(Shape{static_cast<std::int64_t>(rows.size()), static_cast<std::int64_t>(rows[0].size())});
  for (std::size_t b = 0; b < rows.size(); ++b)
    for (std::size_t i = 0; i < rows[b].size(); ++i) t(b, i) = rows[b][i];
  return t;
}

const std::vector<std::vector<int>> tokens_a{{3, 1, 4, 1, 5}, {9, 2, 6, 5, 3}};
const std::vector<std::vector<int>> targets_a{{1, 4, 1, 5, 9}, {2, -100, 5, 3, -100}};

}  // namespace

TEST_CASE("GPT: parameter names, order and shapes are Hugging Face GPT-2's") {
  GPT<float> model(tiny);
  std::vector<std::string> want{"wte.weight", "wpe.weight"};
  std::vector<Shape> shapes{Shape{11, 8}, Shape{8, 8}};
  for (int i = 0; i < 2; ++i) {
    const std::string h = "h." + std::to_string(i) + ".";
    for (auto [name, shape] : std::vector<std::pair<std::string, Shape>>{
             {"ln_1.weight", Shape{8}}, {"ln_1.bias", Shape{8}},
             {"attn.c_attn.weight", Shape{8, 24}}, {"attn.c_attn.bias", Shape{24}},
             {"attn.c_proj.weight", Shape{8, 8}}, {"attn.c_proj.bias", Shape{8}},
             {"ln_2.weight", Shape{8}}, {"ln_2.bias", Shape{8}},
             {"mlp.c_fc.weight", Shape{8, 32}}, {"mlp.c_fc.bias", Shape{32}},
             {"mlp.c_proj.weight", Shape{32, 8}}, {"mlp.c_proj.bias", Shape{8}}}) {
      want.push_back(h + name);
      shapes.push_back(shape);
    }
  }
  want.insert(want.end(), {"ln_f.weight", "ln_f.bias"});
  shapes.insert(shapes.end(), {Shape{8}, Shape{8}});
  const auto ps = model.parameters();
  REQUIRE(ps.size() == want.size());
  for (std::size_t i = 0; i < ps.size(); ++i) {
    CHECK(ps[i].name == want[i]);
    CHECK(ps[i].value.shape() == shapes[i]);
    CHECK(ps[i].grad.shape() == shapes[i]);
    CHECK(ps[i].layout == tessera::ParamLayout::replicate());
  }
  // The count is Hugging Face's: V d + P d + L (12 d^2 + 13 d) + 2 d (the tied head adds none),
  // which for GPT-2 small is the published 124,439,808.
  const auto count = [](const GPTConfig& c) {
    const std::int64_t d = c.d_model;
    return c.vocab_size * d + c.n_positions * d + c.n_layer * (12 * d * d + 13 * d) + 2 * d;
  };
  CHECK(count(GPTConfig{}) == 124439808);
  CHECK(ps.numel() == count(tiny));
  CHECK(model.lm_head().weight().value.shares_storage_with(ps.at("wte.weight").value));
}

TEST_CASE("GPT: initialization is GPT-2's (std 0.02, c_proj 0.02/sqrt(2 n_layer), biases 0, LayerNorm 1/0)") {
  const GPTConfig cfg{.vocab_size = 512, .n_positions = 64, .n_layer = 4, .n_head = 4, .d_model = 64};
  GPT<double> model(cfg, 1234);
  for (tessera::Parameter<double>& p : model.parameters()) {
    INFO(p.name);
    double s = 0, s2 = 0;
    const double n = static_cast<double>(p.value.numel());
    for (std::int64_t i = 0; i < p.value.numel(); ++i) {
      s += p.value.data()[i];
      s2 += p.value.data()[i] * p.value.data()[i];
    }
    const double mean = s / n, sd = std::sqrt(s2 / n - mean * mean);
    if (p.name.ends_with(".bias")) {
      CHECK(s2 == 0.0);
    } else if (p.name.find("ln_") != std::string::npos) {
      CHECK(mean == 1.0);
      CHECK(sd == 0.0);
    } else {
      const double want = p.name.ends_with("c_proj.weight") ? 0.02 / std::sqrt(8.0) : 0.02;
      CHECK(sd == doctest::Approx(want).epsilon(0.08));
      CHECK(std::abs(mean) < 4 * want / std::sqrt(n));
    }
  }
}

TEST_CASE("GPT: the same seed gives bitwise the same model, another seed another model") {
  GPT<float> a(tiny, 42), b(tiny, 42), c(tiny, 43);
  const auto pa = a.parameters(), pb = b.parameters(), pc = c.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i].name);
    CHECK(nn_test::bitwise_equal(pa[i].value, pb[i].value));
    CHECK(nn_test::all_finite(pc[i].value));  // else the "another model" check below passes on a NaN
    if (!pa[i].name.ends_with(".bias") && pa[i].name.find("ln_") == std::string::npos)
      CHECK(nn_test::relative_error(pa[i].value.cast<double>(), pc[i].value.cast<double>()) > 0.1);
  }
}

TEST_CASE("GPT: a tp shard initialized from the seed holds exactly its heads' q, k, v columns of the serial c_attn") {
  const GPTConfig cfg{.vocab_size = 16, .n_positions = 8, .n_layer = 1, .n_head = 4, .d_model = 8};
  GPT<float> serial(cfg, 7);
  const tessera::Parameter<float>& full = serial.parameters().at("h.0.attn.c_attn.weight");  // [8, 24]
  const std::int64_t d = 8, tp = 2, local = d / tp;
  for (std::int64_t rank = 0; rank < tp; ++rank) {
    // The shard generates only its own columns: q, k and v of heads [2 rank, 2 rank + 2).
    const Tensor<float> shard(Shape{d, 3 * local});
    for (std::int64_t part = 0; part < 3; ++part)
      tessera::fill_normal(shard.slice(1, part * local, (part + 1) * local), 7, full.name, 0.02, full.value.shape(),
                           tessera::Index{0, part * d + rank * local});
    for (std::int64_t part = 0; part < 3; ++part)
      for (std::int64_t i = 0; i < d; ++i)
        for (std::int64_t j = 0; j < local; ++j)
          CHECK(shard(i, part * local + j) == full.value(i, part * d + rank * local + j));
  }
}

TEST_CASE("GPT: forward loss on fixed weights equals a direct loop-based fp64 reference") {
  GPT<double> model(tiny);
  set_fixed_weights(model);
  const CrossEntropy<double> ce;
  auto [logits, ctx] = model.forward(to_tensor(tokens_a));
  CHECK(logits.shape() == Shape{2, 5, 11});
  const double loss = ce.forward(logits, to_tensor(targets_a)).output;
  const double want = reference_loss(model, tokens_a, targets_a);
  CHECK(loss == doctest::Approx(want).epsilon(1e-12));
  CHECK(want > 1.0);  // not a degenerate value
  // fp32, the training type, on the same weights.
  GPT<float> model32(tiny);
  set_fixed_weights(model32);
  const float loss32 = CrossEntropy<float>().forward(model32.forward(to_tensor(tokens_a)).output, to_tensor(targets_a)).output;
  CHECK(static_cast<double>(loss32) == doctest::Approx(want).epsilon(1e-5));
}

TEST_CASE("GPT: backward of the mean cross-entropy matches central differences in fp64 for every parameter") {
  GPT<double> model(tiny, 5);
  nn_test::randomize(model.parameters(), 6, 0.3);
  const CrossEntropy<double> ce;
  const Tensor<std::int32_t> tokens = to_tensor(tokens_a), targets = to_tensor(targets_a);
  auto [logits, ctx] = model.forward(tokens);
  auto [loss, lctx] = ce.forward(logits, targets);
  model.parameters().zero_grad();
  model.backward(ce.backward(1.0, lctx), ctx);
  const auto f = [&] { return ce.forward(model.forward(tokens).output, targets).output; };
  for (tessera::Parameter<double>& p : model.parameters()) {
    INFO(p.name);
    const Tensor<double> num = nn_test::numeric_grad(p.value, f);
    CHECK(nn_test::norm(num) > 1e-6);
    CHECK(nn_test::relative_error(p.grad, num) < 1e-6);
  }
}

TEST_CASE("GPT: a token id outside the vocabulary and a sequence longer than n_positions throw with the numbers") {
  GPT<float> model(tiny);
  const std::string m1 = error_of([&] { (void)model.forward(to_tensor({{1, 2, 57}})); });
  CHECK(contains(m1, "id 57"));
  CHECK(contains(m1, "size 11"));
  CHECK(contains(error_of([&] { (void)model.forward(to_tensor({{-3, 2}})); }), "id -3"));
  const std::string m2 = error_of([&] { (void)model.forward(to_tensor({{1, 2, 3, 4, 5, 6, 7, 8, 9}})); });
  CHECK(contains(m2, "sequence length 9"));
  CHECK(contains(m2, "n_positions=8"));
  CHECK(contains(error_of([&] { (void)model.forward(Tensor<std::int32_t>(Shape{2, 3, 1})); }), "(2, 3, 1)"));
  CHECK(contains(error_of([] { GPT<float> bad(GPTConfig{.n_head = 5}); }), "n_head 5 does not divide d_model 768"));
}
