// The reference layers: backward against central finite differences in fp64, causal
// masking, cross-entropy, activation checkpointing, several micro-batches in flight, and
// errors on bad input.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "nn_test_util.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/nn/activation_checkpoint.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/core_attention.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/gelu.hpp"
#include "tessera/nn/gpt_embedding.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/nn/lm_head.hpp"
#include "tessera/nn/mlp.hpp"
#include "tessera/nn/self_attention.hpp"

using tessera::Shape;
using tessera::Tensor;
using namespace tessera::nn;
using nn_test::check_gradients;
using nn_test::contains;
using nn_test::error_of;
using nn_test::random_tensor;
using nn_test::randomize;

// Every reference layer meets the contract, in both scalar types.
static_assert(tessera::Layer<Linear<float>> && tessera::Layer<Linear<double>>);
static_assert(tessera::Layer<Embedding<float>> && tessera::Layer<LayerNorm<float>>);
static_assert(tessera::Layer<GELU<float>> && tessera::Layer<CoreAttention<float>>);
static_assert(tessera::Layer<SelfAttention<float>> && tessera::Layer<MLP<float>>);
static_assert(tessera::Layer<Block<float>> && tessera::Layer<Block<double>>);
static_assert(tessera::Layer<GPTEmbedding<float>> && tessera::Layer<LMHead<float>>);
static_assert(tessera::Layer<ActivationCheckpoint<Block<float>>>);
static_assert(std::same_as<tessera::LayerTraits<Embedding<double>>::InputGrad, tessera::NoGrad>);
static_assert(std::same_as<tessera::LayerTraits<Block<double>>::Scalar, double>);

TEST_CASE("Linear: backward matches central differences in fp64 (input, weight, bias)") {
  Linear<double> lin(5, 7);
  randomize(lin.parameters(), 11);
  check_gradients(lin, random_tensor(Shape{2, 3, 5}, 12), 13);
}

TEST_CASE("Linear: y = x W + b with W stored [in, out] (Hugging Face Conv1D)") {
  Linear<double> lin("c", Tensor<double>::from(Shape{2, 3}, {1, 2, 3, 4, 5, 6}),
                     Tensor<double>::from(Shape{3}, {0.5, -1, 2}));
  const Tensor<double> y = lin.forward(Tensor<double>::from(Shape{1, 2}, {10, 100})).output;
  CHECK(y(0, 0) == 10 * 1 + 100 * 4 + 0.5);
  CHECK(y(0, 1) == 10 * 2 + 100 * 5 - 1);
  CHECK(y(0, 2) == 10 * 3 + 100 * 6 + 2);
  CHECK(lin.weight().name == "c.weight");
  CHECK(lin.bias()->name == "c.bias");
  Linear<double> no_bias(4, 2, {}, false);
  CHECK(no_bias.parameters().size() == 1);
  CHECK(no_bias.bias() == nullptr);
}

TEST_CASE("Linear: a layer built from a column slice of the weight computes those columns of the output") {
  Linear<double> full(6, 12, LayerInit{.prefix = "h.0.mlp.c_fc", .seed = 5});
  const Tensor<double> x = random_tensor(Shape{3, 6}, 1);
  const Tensor<double> y = full.forward(x).output;
  Linear<double> shard("h.0.mlp.c_fc", full.weight().value.slice(1, 4, 8), full.bias()->value.slice(0, 4, 8));
  CHECK_FALSE(shard.weight().value.shares_storage_with(full.weight().value));
  const Tensor<double> ys = shard.forward(x).output;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) CHECK(ys(i, j) == doctest::Approx(y(i, 4 + j)).epsilon(1e-14));
}

TEST_CASE("Embedding: backward adds dy rows into the rows of repeated ids") {
  Embedding<double> emb(6, 3);
  randomize(emb.parameters(), 4);
  const Tensor<std::int32_t> ids = Tensor<std::int32_t>::from(Shape{2, 3}, {1, 4, 1, 0, 5, 1});
  auto [y, ctx] = emb.forward(ids);
  CHECK(y.shape() == Shape{2, 3, 3});
  CHECK(y(1, 1, 2) == emb.weight().value(5, 2));
  const Tensor<double> r = random_tensor(y.shape(), 9);
  emb.parameters().zero_grad();
  emb.backward(r, ctx);
  const auto loss = [&] { return nn_test::dot(emb.forward(ids).output, r); };
  CHECK(nn_test::relative_error(emb.weight().grad, nn_test::numeric_grad(emb.weight().value, loss)) < 1e-6);
  CHECK(emb.weight().grad(1, 0) == doctest::Approx(r(0, 0, 0) + r(0, 2, 0) + r(1, 2, 0)));
  CHECK(emb.weight().grad(2, 1) == 0.0);
}

TEST_CASE("LayerNorm: backward matches central differences in fp64 (input, weight, bias)") {
  LayerNorm<double> ln(6);
  randomize(ln.parameters(), 21);
  check_gradients(ln, random_tensor(Shape{2, 3, 6}, 22, 2.0), 23);
}

TEST_CASE("LayerNorm: each output row has mean 0 and variance 1 before the affine part") {
  LayerNorm<double> ln(8);
  const Tensor<double> y = ln.forward(random_tensor(Shape{4, 8}, 3, 5.0)).output;
  for (int r = 0; r < 4; ++r) {
    double m = 0, v = 0;
    for (int j = 0; j < 8; ++j) m += y(r, j) / 8;
    for (int j = 0; j < 8; ++j) v += (y(r, j) - m) * (y(r, j) - m) / 8;
    CHECK(std::abs(m) < 1e-12);
    CHECK(v == doctest::Approx(1.0).epsilon(1e-4));  // eps = 1e-5 against variance ~25
  }
}

TEST_CASE("GELU: tanh approximation values and backward against central differences") {
  GELU<double> gelu;
  const Tensor<double> y = gelu.forward(Tensor<double>::from(Shape{3}, {-1.0, 0.0, 2.0})).output;
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), evaluated independently.
  const auto ref = [](double x) {
    return 0.5 * x * (1 + std::tanh(std::sqrt(2 / 3.141592653589793) * (x + 0.044715 * x * x * x)));
  };
  CHECK(y(0) == doctest::Approx(ref(-1.0)).epsilon(1e-15));
  CHECK(y(1) == 0.0);
  CHECK(y(2) == doctest::Approx(ref(2.0)).epsilon(1e-15));
  CHECK(ref(-1.0) == doctest::Approx(-0.158808).epsilon(1e-5));  // PyTorch gelu(-1, approximate="tanh")
  check_gradients(gelu, random_tensor(Shape{2, 3, 4}, 31, 2.0), 32);
}

TEST_CASE("CoreAttention: backward with causal masking matches central differences in fp64") {
  CoreAttention<double> core(2);
  check_gradients(core, random_tensor(Shape{2, 5, 3 * 2 * 3}, 41), 42);
}

TEST_CASE("CoreAttention: an output at position t does not depend on inputs after t") {
  CoreAttention<double> core(2);
  const Tensor<double> qkv = random_tensor(Shape{2, 6, 12}, 43);
  const Tensor<double> y0 = core.forward(qkv).output;
  const Tensor<double> changed = qkv.clone();
  changed.slice(1, 4, 6).add_(random_tensor(Shape{2, 2, 12}, 44));  // positions 4 and 5
  const Tensor<double> y1 = core.forward(changed).output;
  REQUIRE(nn_test::all_finite(y0));  // a NaN would make "changed" below true for nothing
  REQUIRE(nn_test::all_finite(y1));
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 6; ++t) {
      tessera::testing::WorstError diff;
      for (int c = 0; c < 4; ++c) diff.add(y1(b, t, c) - y0(b, t, c));
      if (t < 4)
        CHECK(diff.value() == 0.0);
      else
        CHECK(diff.value() > 1e-3);
    }
  // Position 0 attends only to itself: its output is its own v.
  for (int c = 0; c < 4; ++c) CHECK(y0(1, 0, c) == doctest::Approx(qkv(1, 0, 8 + c)).epsilon(1e-14));
}

TEST_CASE("SelfAttention: backward matches central differences in fp64 (input and all four parameters)") {
  SelfAttention<double> attn(8, 2, LayerInit{.prefix = "attn"});
  randomize(attn.parameters(), 51, 0.4);
  check_gradients(attn, random_tensor(Shape{2, 4, 8}, 52), 53);
}

TEST_CASE("MLP: backward matches central differences in fp64") {
  MLP<double> mlp(4, LayerInit{.prefix = "mlp"});
  randomize(mlp.parameters(), 61);
  check_gradients(mlp, random_tensor(Shape{2, 3, 4}, 62), 63);
}

TEST_CASE("Block: backward matches central differences in fp64 (all twelve parameters)") {
  Block<double> block(8, 2, LayerInit{.prefix = "h.0"});
  randomize(block.parameters(), 71, 0.4);
  CHECK(block.parameters().size() == 12);
  check_gradients(block, random_tensor(Shape{2, 4, 8}, 72), 73);
}

TEST_CASE("GPTEmbedding and LMHead: backward matches central differences in fp64") {
  GPTEmbedding<double> emb(7, 6, 4);
  randomize(emb.parameters(), 81);
  const Tensor<std::int32_t> tokens = Tensor<std::int32_t>::from(Shape{2, 5}, {0, 3, 6, 3, 2, 1, 1, 5, 4, 0});
  auto [x, ctx] = emb.forward(tokens);
  CHECK(x(1, 2, 3) == emb.wte().weight().value(5, 3) + emb.wpe().weight().value(2, 3));
  const Tensor<double> r = random_tensor(x.shape(), 82);
  emb.parameters().zero_grad();
  emb.backward(r, ctx);
  const auto loss = [&] { return nn_test::dot(emb.forward(tokens).output, r); };
  for (tessera::Parameter<double>& p : emb.parameters()) {
    INFO(p.name);
    CHECK(nn_test::relative_error(p.grad, nn_test::numeric_grad(p.value, loss)) < 1e-6);
  }
  LMHead<double> head(emb.wte().weight());
  CHECK(head.weight().value.shares_storage_with(emb.wte().weight().value));
  check_gradients(head, random_tensor(Shape{2, 3, 4}, 83), 84);
}

TEST_CASE("CrossEntropy: loss and gradient with ignored targets, sum and mean, against a direct computation") {
  const Tensor<double> logits = random_tensor(Shape{2, 3, 5}, 91, 2.0);
  const Tensor<std::int32_t> targets = Tensor<std::int32_t>::from(Shape{2, 3}, {4, -100, 0, 2, 3, -100});
  // Direct: -log softmax(logits[r])[target[r]] summed over the 4 valid rows.
  double direct = 0;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 3; ++t) {
      const int tg = targets(b, t);
      if (tg == -100) continue;
      double z = 0;
      for (int j = 0; j < 5; ++j) z += std::exp(logits(b, t, j));
      direct += std::log(z) - logits(b, t, tg);
    }
  for (Reduction red : {Reduction::sum, Reduction::mean}) {
    CAPTURE(static_cast<int>(red));
    const CrossEntropy<double> ce({.reduction = red});
    auto [loss, ctx] = ce.forward(logits, targets);
    CHECK(ctx.num_valid == 4);
    CHECK(ce.count_valid(targets) == 4);
    CHECK(loss == doctest::Approx(red == Reduction::sum ? direct : direct / 4).epsilon(1e-14));
    const Tensor<double> dlogits = ce.backward(1.0, ctx);
    const auto f = [&] { return ce.forward(logits, targets).output; };
    CHECK(nn_test::relative_error(dlogits, nn_test::numeric_grad(logits, f)) < 1e-6);
    for (int j = 0; j < 5; ++j) {  // ignored rows get no gradient
      CHECK(dlogits(0, 1, j) == 0.0);
      CHECK(dlogits(1, 2, j) == 0.0);
    }
  }
  // A custom ignore index; every target ignored gives loss 0 under mean.
  const CrossEntropy<double> ce0({.ignore_index = 0});
  CHECK(ce0.count_valid(targets) == 5);
  const Tensor<std::int32_t> none = Tensor<std::int32_t>::full(Shape{2, 3}, -100);
  CHECK(CrossEntropy<double>().forward(logits, none).output == 0.0);
}

TEST_CASE("ActivationCheckpoint: output and all gradients equal the plain block's bitwise; the context holds only the input") {
  Block<double> plain(8, 2, LayerInit{.prefix = "h.0", .seed = 3});
  ActivationCheckpoint<Block<double>> ckpt(Block<double>(8, 2, LayerInit{.prefix = "h.0", .seed = 3}));
  const Tensor<double> x = random_tensor(Shape{2, 4, 8}, 101);
  const Tensor<double> dy = random_tensor(Shape{2, 4, 8}, 102);
  auto [y1, c1] = plain.forward(x);
  auto [y2, c2] = ckpt.forward(x);
  static_assert(std::same_as<decltype(c2), ActivationCheckpoint<Block<double>>::Context>);
  CHECK(c2.x.shares_storage_with(x));
  const Tensor<double> dx1 = plain.backward(dy, c1);
  const Tensor<double> dx2 = ckpt.backward(dy, c2);
  CHECK(nn_test::relative_error(y1, y2) == 0.0);
  CHECK(nn_test::relative_error(dx1, dx2) == 0.0);
  const auto p1 = plain.parameters(), p2 = ckpt.parameters();
  REQUIRE(p1.size() == p2.size());
  for (std::size_t i = 0; i < p1.size(); ++i) {
    INFO(p1[i].name);
    CHECK(p1[i].name == p2[i].name);
    CHECK(nn_test::relative_error(p1[i].grad, p2[i].grad) == 0.0);
  }
}

TEST_CASE("Block: two micro-batches in flight (F0 F1 B1 B0) give the gradients of F0 B0 F1 B1") {
  Block<double> a(8, 2, LayerInit{.seed = 9}), b(8, 2, LayerInit{.seed = 9});
  const Tensor<double> x0 = random_tensor(Shape{1, 4, 8}, 111), x1 = random_tensor(Shape{1, 4, 8}, 112);
  const Tensor<double> d0 = random_tensor(Shape{1, 4, 8}, 113), d1 = random_tensor(Shape{1, 4, 8}, 114);
  auto f0 = a.forward(x0);
  auto f1 = a.forward(x1);
  const Tensor<double> dx1 = a.backward(d1, f1.ctx);
  const Tensor<double> dx0 = a.backward(d0, f0.ctx);
  auto g0 = b.forward(x0);
  const Tensor<double> ex0 = b.backward(d0, g0.ctx);
  auto g1 = b.forward(x1);
  const Tensor<double> ex1 = b.backward(d1, g1.ctx);
  CHECK(nn_test::relative_error(dx0, ex0) == 0.0);
  CHECK(nn_test::relative_error(dx1, ex1) == 0.0);
  const auto pa = a.parameters(), pb = b.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i)
    CHECK(nn_test::relative_error(pa[i].grad, pb[i].grad) < 1e-15);  // sums in another order
}

TEST_CASE("Layers: shape mismatches throw naming both shapes") {
  Linear<float> lin(8, 16, LayerInit{.prefix = "h.0.mlp.c_fc"});
  const std::string m1 = error_of([&] { (void)lin.forward(Tensor<float>(Shape{2, 5, 7})); });
  CHECK(contains(m1, "(2, 5, 7)"));
  CHECK(contains(m1, "(8, 16)"));
  CHECK(contains(m1, "h.0.mlp.c_fc.weight"));
  const auto fl = lin.forward(Tensor<float>(Shape{2, 5, 8}));
  const std::string m2 = error_of([&] { (void)lin.backward(Tensor<float>(Shape{2, 5, 15}), fl.ctx); });
  CHECK(contains(m2, "(2, 5, 15)"));
  CHECK(contains(m2, "(2, 5, 16)"));
  LayerNorm<float> ln(6);
  const std::string m3 = error_of([&] { (void)ln.forward(Tensor<float>(Shape{3, 5})); });
  CHECK(contains(m3, "(3, 5)"));
  CHECK(contains(m3, "(6)"));
  Block<float> block(8, 2);
  auto fb = block.forward(Tensor<float>(Shape{1, 3, 8}));
  const std::string m4 = error_of([&] { (void)block.backward(Tensor<float>(Shape{1, 4, 8}), fb.ctx); });
  CHECK(contains(m4, "(1, 4, 8)"));
  CHECK(contains(m4, "(1, 3, 8)"));
  const std::string m5 = error_of([] {
    (void)CrossEntropy<float>().forward(Tensor<float>(Shape{2, 5, 11}), Tensor<std::int32_t>(Shape{2, 4}));
  });
  CHECK(contains(m5, "(2, 4)"));
  CHECK(contains(m5, "(2, 5, 11)"));
  CHECK(contains(error_of([] { SelfAttention<float> bad(10, 4); }), "n_head 4 does not divide d_model 10"));
  const std::string m6 = error_of([] {
    (void)CrossEntropy<float>().forward(Tensor<float>(Shape{2, 5}), Tensor<std::int32_t>::from(Shape{2}, {1, 5}));
  });
  CHECK(contains(m6, "target 5"));
  CHECK(contains(m6, "size 5"));
}
