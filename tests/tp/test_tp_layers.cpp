// The tensor-parallel building blocks on the threads backend, one thread per tp rank: sharding
// and unsharding, the conjugate operators, ColumnParallel / RowParallel, VocabParallelEmbedding,
// the vocab-parallel cross-entropy (with label smoothing, CASES C11), Dropout, and the errors.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tessera/core/layer.hpp"
#include "tessera/testing/run_ranks.hpp"
#include "tp_bodies.hpp"
#include "tp_test_util.hpp"

using namespace tessera;
using tp_test::rel_err;

static_assert(Layer<ColumnParallel<nn::Linear<float>>> && Layer<RowParallel<nn::Linear<float>>>);
static_assert(Layer<CopyToTensorModelParallelRegion<float>> && Layer<ReduceScatterToSequenceParallelRegion<double>>);
static_assert(Layer<VocabParallelEmbedding<float>> && Layer<Dropout<float>>);
static_assert(Layer<TensorParallel<nn::Block<float>>> && Layer<SequenceParallel<nn::Block<double>>>);
static_assert(Layer<TensorParallelGPT<float>> && Layer<TensorParallelGPT<float, Shard<1>>>);
static_assert(std::same_as<ColumnParallel<nn::Linear<float>>::Output, Activation<Tensor<float>, Shard<-1>>>);
static_assert(std::same_as<RowParallel<nn::Linear<float>>::Input, Activation<Tensor<float>, Shard<-1>>>);
static_assert(std::same_as<RowParallel<nn::Linear<float>, RowParallelOptions{.sequence_parallel = true}>::Output,
                           Activation<Tensor<float>, Shard<1>>>);

namespace {

// An error message of `fn`, or "" when it does not throw.
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A plan that puts a layer with parameters (a LayerNorm over the hidden shard) where only
// parameter-free element-wise layers belong.
struct NormInsideRegion {
  nn::Linear<float> up{4, 6};
  nn::LayerNorm<float> norm{2, {.prefix = "norm"}};
  nn::Linear<float> down{6, 4};
  static constexpr auto tp_plan =
      tp::plan(tp::column(&NormInsideRegion::up), tp::elementwise(&NormInsideRegion::norm), tp::row(&NormInsideRegion::down));
  using Input = Tensor<float>;
  struct Context {};
  ForwardResult<Tensor<float>, Context> forward(const Tensor<float>& x) { return {x, {}}; }
  Tensor<float> backward(const Tensor<float>& dy, const Context&) { return dy; }
  ParameterList<float> parameters() { return {}; }
};

}  // namespace

TEST_CASE("shard_of / unshard: a fused [d, 3d] weight's shard holds its heads' q, k, v columns and reassembles bitwise at tp 1-4") {
  // CASES C8: the full matrix reassembled from any layout is the original, bit for bit.
  const Tensor<float> full = tp_test::random_tensor<float>(Shape{8, 24}, 3);
  const ParamLayout layout = ParamLayout::shard(1, 3);
  for (int tp : {1, 2, 4}) {
    const auto back = testing::run_ranks(tp, [&](Comm& comm) {
      const Tensor<float> local = shard_of(full, layout, comm.rank(), comm.size());
      const std::int64_t w = 8 / comm.size();
      bool heads = local.shape() == Shape{8, 3 * w};
      for (std::int64_t part = 0; part < 3; ++part)
        heads = heads && tp_test::bitwise_equal(local.slice(1, part * w, (part + 1) * w).contiguous(),
                                                full.slice(1, part * 8 + comm.rank() * w, part * 8 + (comm.rank() + 1) * w)
                                                    .contiguous());
      return std::pair{heads, unshard(comm, local, layout)};
    });
    for (const auto& [heads, whole] : back) {
      CHECK(heads);
      CHECK(tp_test::bitwise_equal(whole, full));
    }
  }
  CHECK(contains(error_of([&] { (void)shard_of(full, layout, 0, 3); }), "not divisible into 3 block(s) x 3 tp ranks"));
}

TEST_CASE("mappings: the seven conjugate operators equal their definitions forward and backward at tp 1-4") {
  for (int tp : {1, 2, 3, 4})
    for (double err : testing::run_ranks(tp, [](Comm& c) { return tp_bodies::mappings_body(c); })) CHECK(err == 0.0);
}

TEST_CASE("ColumnParallel + RowParallel: outputs and gradients equal two serial Linears (f/g, gather+scatter, sequence parallel) at tp 1-4") {
  for (int tp : {1, 2, 3, 4}) {
    INFO("tp = ", tp);
    for (double err : testing::run_ranks(tp, [](Comm& c) { return tp_bodies::column_row_body<double>(c); }))
      CHECK(err < 1e-12);
    for (double err : testing::run_ranks(tp, [](Comm& c) { return tp_bodies::column_row_body<float>(c); }))
      CHECK(err < 1e-5);
  }
}

TEST_CASE("RowParallel: the bias is added once, after the reduction, and its gradient is the full column sum") {
  testing::run_ranks(2, [](Comm& c) {
    nn::Linear<double> full("p", Tensor<double>(Shape{4, 3}), Tensor<double>::from(Shape{3}, {1.0, 2.0, 3.0}));
    RowParallel<nn::Linear<double>> row(full, c);
    auto [y, ctx] = row.forward(with_layout<Shard<-1>>(Tensor<double>::full(Shape{5, 2}, 1.0)));
    for (std::int64_t r = 0; r < 5; ++r) CHECK(y.value(r, 1) == 2.0);  // zero weight: y = bias, not 2 bias
    row.backward(with_layout<Replicate>(Tensor<double>::full(Shape{5, 3}, 1.0)), ctx);
    CHECK(row.bias()->grad(0) == 5.0);
    CHECK(row.bias()->layout == ParamLayout::replicate());
  });
}

TEST_CASE("VocabParallelEmbedding: vocabulary 50 padded over tp 1-4 equals nn::Embedding (init, output, gradient), also reduce-scattered") {
  for (int tp : {1, 2, 3, 4}) {
    INFO("tp = ", tp);
    for (double err : testing::run_ranks(tp, [](Comm& c) { return tp_bodies::vocab_embedding_body<Replicate>(c); }))
      CHECK(err < 1e-13);
    for (double err : testing::run_ranks(tp, [](Comm& c) { return tp_bodies::vocab_embedding_body<Shard<1>>(c); }))
      CHECK(err < 1e-13);
  }
}


TEST_CASE("VocabParallelCrossEntropy: tp = 2, vocab 8, 6 positions, label smoothing 0.1 equals tp = 1 and the reference to 1e-12 (C11)") {
  const Tensor<double> logits = tp_test::random_tensor<double>(Shape{6, 8}, 41, "logits", 2.0);
  const Tensor<std::int32_t> targets = Tensor<std::int32_t>::from(Shape{6}, {3, 0, 7, 4, 5, 1});
  const auto [ref_loss, ref_grad] = tp_test::smoothed_reference(logits, targets, 0.1);
  const auto one = testing::run_ranks(1, [&](Comm& c) { return tp_bodies::vocab_cross_entropy_body(c, 8, 6, 0.1, logits, targets); });
  const auto two = testing::run_ranks(2, [&](Comm& c) { return tp_bodies::vocab_cross_entropy_body(c, 8, 6, 0.1, logits, targets); });
  CHECK(std::abs(one[0].loss - ref_loss) < 1e-12);
  CHECK(rel_err(one[0].grad, ref_grad) < 1e-12);
  for (const auto& r : two) {
    CHECK(std::abs(r.loss - one[0].loss) < 1e-12);
    CHECK(rel_err(r.grad, one[0].grad) < 1e-12);
  }
}

TEST_CASE("VocabParallelCrossEntropy: equals nn::CrossEntropy (mean, ignore_index) with vocab 50 padded over tp 1-4, padding masked") {
  const Tensor<double> logits = tp_test::random_tensor<double>(Shape{10, 50}, 43, "logits", 3.0);
  Tensor<std::int32_t> targets = tp_test::random_tokens(1, 10, 50, 3).reshape(Shape{10});
  targets.data()[2] = -100;
  targets.data()[7] = -100;
  nn::CrossEntropy<double> serial;
  auto [loss, ctx] = serial.forward(logits, targets);
  const Tensor<double> grad = serial.backward(1.0, ctx);
  for (int tp : {1, 2, 3, 4}) {
    INFO("tp = ", tp);
    for (const auto& r : testing::run_ranks(tp, [&](Comm& c) { return tp_bodies::vocab_cross_entropy_body(c, 50, 10, 0.0, logits, targets); })) {
      CHECK(std::abs(r.loss - loss) < 1e-12 * std::abs(loss));
      CHECK(rel_err(r.grad, grad) < 1e-12);
    }
  }
  // The smoothed loss agrees with the reference when some rows are ignored too.
  const auto [sl, sg] = tp_test::smoothed_reference(logits, targets, 0.2);
  for (const auto& r : testing::run_ranks(3, [&](Comm& c) { return tp_bodies::vocab_cross_entropy_body(c, 50, 10, 0.2, logits, targets); })) {
    CHECK(std::abs(r.loss - sl) < 1e-12 * std::abs(sl));
    CHECK(rel_err(r.grad, sg) < 1e-12);
  }
}

TEST_CASE("VocabParallelCrossEntropy: 3 all-reduces of one value per row; a local width that is not the padded shard is an error") {
  const auto out = testing::run_ranks(2, [](Comm& c) {
    auto counters = std::make_shared<testing::CommCounters>();
    VocabParallelCrossEntropy<float> ce(testing::instrument(c, counters), 50);
    const Tensor<float> local = tp_test::random_tensor<float>(Shape{3, 4, 25}, 1);
    auto [loss, ctx] = ce.forward(with_layout<Shard<-1>>(local), tp_test::random_tokens(3, 4, 50, 2));
    (void)ce.backward(loss, ctx);
    const std::string bad = error_of([&] { ce.forward(with_layout<Shard<-1>>(local.slice(2, 0, 24)), tp_test::random_tokens(3, 4, 50, 2)); });
    return std::tuple{counters->calls(testing::CallKind::all_reduce), counters->elements(testing::CallKind::all_reduce), bad};
  });
  for (const auto& [calls, elems, bad] : out) {
    CHECK(calls == 3);
    CHECK(elems == 3 * 12);
    CHECK(contains(bad, "local logits of width 24 are not a 1/2 shard of the vocabulary of 50"));
  }
}

TEST_CASE("Dropout: p = 0 is the identity; p = 0.3 drops about 30%, scales kept values by 1/0.7, and backward applies the mask") {
  const Tensor<double> x = tp_test::random_tensor<double>(Shape{4, 50, 50}, 1);
  Dropout<double> none;
  CHECK(none.forward(x).output.shares_storage_with(x));
  Dropout<double> drop(0.3, {.prefix = "drop", .seed = 2});
  auto [y, ctx] = drop.forward(x);
  std::int64_t zeros = 0;
  bool scaled = true;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    if (y.data()[i] == 0.0) ++zeros;
    else scaled = scaled && std::abs(y.data()[i] - x.data()[i] / 0.7) < 1e-12;
  }
  CHECK(scaled);
  CHECK(std::abs(static_cast<double>(zeros) / static_cast<double>(x.numel()) - 0.3) < 0.02);
  const Tensor<double> dx = drop.backward(Tensor<double>::full(x.shape(), 1.0), ctx);
  CHECK(tp_test::bitwise_equal(dx, ctx.mask));
  // The same iteration draws the same mask; another iteration another one.
  CHECK(tp_test::bitwise_equal(drop.forward(x).output, y));
  drop.set_iteration(1);
  CHECK_FALSE(tp_test::bitwise_equal(drop.forward(x).output, y));
  CHECK(contains(error_of([] { Dropout<float>(1.0); }), "p 1 is outside [0, 1)"));
}

TEST_CASE("Dropout: a sequence shard draws its slice of the unsharded mask; the tp region draws a stream per rank; the replicated region the same on all") {
  Dropout<double> drop(0.5, {.prefix = "drop", .seed = 4});
  const Tensor<double> x = Tensor<double>::full(Shape{2, 12, 8}, 1.0);
  const Tensor<double> whole = drop.forward(x).output;
  const auto out = testing::run_ranks(3, [&](Comm& c) {
    const ShardInfo seq{.region = ShardInfo::Region::sequence_parallel, .rank = c.rank(), .size = c.size()};
    const ShardInfo tpr{.region = ShardInfo::Region::tensor_parallel, .rank = c.rank(), .size = c.size()};
    const ShardInfo rep{.region = ShardInfo::Region::replicated, .rank = c.rank(), .size = c.size()};
    const Tensor<double> local = drop.forward(x.slice(1, 4 * c.rank(), 4 * c.rank() + 4), seq).output;
    return std::tuple{tp_test::bitwise_equal(local, whole.slice(1, 4 * c.rank(), 4 * c.rank() + 4).contiguous()),
                      tp_test::same_on_every_rank(c, drop.forward(x, tpr).output),
                      tp_test::same_on_every_rank(c, drop.forward(x, rep).output),
                      tp_test::bitwise_equal(drop.forward(x, rep).output, whole)};
  });
  for (const auto& [seq_slice, tp_same, rep_same, rep_serial] : out) {
    CHECK(seq_slice);
    CHECK_FALSE(tp_same);
    CHECK(rep_same);
    CHECK(rep_serial);
  }
}

TEST_CASE("errors: tp not dividing the output features, the input features, the heads or the sequence names the numbers; parameters inside the tp region") {
  const auto msgs = testing::run_ranks(3, [](Comm& c) {
    nn::Linear<float> lin(4, 8, {.prefix = "h.0.mlp.c_fc"});
    std::vector<std::string> m;
    m.push_back(error_of([&] { ColumnParallel<nn::Linear<float>> col(lin, c); }));
    m.push_back(error_of([&] { RowParallel<nn::Linear<float>> row(lin, c); }));
    m.push_back(error_of([&] { TensorParallel<nn::SelfAttention<float>> a(nn::SelfAttention<float>(12, 4), c); }));
    m.push_back(error_of([&] { TensorParallelGPT<float> g(GPTDescription<float>(GPTConfig{.vocab_size = 10, .n_positions = 8, .n_layer = 1, .n_head = 2, .d_model = 4}), c); }));
    m.push_back(error_of([&] { ScatterToSequenceParallelRegion<float>(c).forward({Tensor<float>(Shape{1, 4, 6})}); }));
    m.push_back(error_of([&] { TensorParallel<NormInsideRegion> bad(NormInsideRegion{}, c); }));
    return m;
  });
  for (const auto& m : msgs) {
    CHECK(contains(m[0], "ColumnParallel h.0.mlp.c_fc.weight: 8 output features are not divisible into 1 block(s) x 3 tp ranks"));
    CHECK(contains(m[1], "RowParallel h.0.mlp.c_fc.weight: 4 input features are not divisible into 1 block(s) x 3 tp ranks"));
    CHECK(contains(m[2], "n_head 4 is not divisible by the tp size 3"));
    CHECK(contains(m[3], "n_head 2 is not divisible by the tp size 3"));
    CHECK(contains(m[4], "dim 1 of shape (1, 4, 6) (4) is not divisible into 1 block(s) x 3 tp ranks"));
    CHECK(contains(m[5], "parameter \"norm.weight\" runs on a tensor-parallel shard (Shard<-1>)"));
  }
}
