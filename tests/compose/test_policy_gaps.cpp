// Gaps found when the policies were tried as a user would, closed: uneven data across Hybrid's
// dp replicas (skip_forward_backward, any_rank_has_data, agree_num_steps) and a second
// ZeroOptimizer over one DataParallel, parameter groups (no weight decay on biases) with and
// without ZeRO-1.

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "compose/compose_bodies.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/zero_optimizer.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace compose_test;

namespace {
// Global rows of step `step` when replica 0 has data for 3 steps and replica 1 for 2: steps 0
// and 1 use all 16 rows (replica 0 rows 0-7, replica 1 rows 8-15), step 2 only rows 0-7.
std::int64_t rows_of(int step) { return step < 2 ? 16 : 8; }

Reference uneven_reference(const TinyDecoder& d, const Setup& s) {
  SequentialModel<TinyDecoder> model(d);
  ParameterList<float> ps = model.parameters();
  optim::AdamW<float> opt(s.groups(ps));
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  Reference r;
  for (int step = 0; step < 3; ++step) {
    auto [x, y] = batch_of(d, s, step);
    const std::int64_t n = rows_of(step);
    ps.zero_grad();
    auto [logits, ctx] = model.forward(x.slice(0, 0, n).contiguous());
    auto [loss, lctx] = ce.forward(logits, y.slice(0, 0, n).contiguous());
    model.backward(ce.backward(1.0f, lctx), ctx);
    r.norms.push_back(optim::clip_grad_norm(ps, s.max_norm));
    opt.step();
    r.losses.push_back(static_cast<double>(loss));
  }
  for (Parameter<float>& p : ps) r.params.emplace(p.name, p.value.contiguous());
  return r;
}

struct UnevenOutcome {
  int steps = 0;
  std::int64_t agreed = 0;
  double worst_loss = 0, worst_param = 0;
};

UnevenOutcome uneven_body(Comm& world, const TinyDecoder& d, const Setup& s, const Variant& v, const Reference& ref) {
  Mesh mesh(world, v.shape);
  Hybrid<float> model = make_hybrid(mesh, d, v, s);
  DistributedOptimizer<optim::AdamW<float>> opt(model, s.groups(model.parameters()), v.zero1);
  const int replica = mesh.coord().dp;
  const int my_steps = replica == 0 ? 3 : 2;
  UnevenOutcome o;
  o.agreed = model.agree_num_steps(my_steps);
  testing::WorstError loss_err, param_err;
  int step = 0;
  while (model.any_rank_has_data(step < my_steps)) {
    auto [x, y] = batch_of(d, s, step);
    model.zero_grad();
    if (step < my_steps) {
      const std::int64_t lo = replica * 8;
      model.forward_backward(x.slice(0, lo, lo + 8).contiguous(), y.slice(0, lo, lo + 8).contiguous());
    } else {
      model.skip_forward_backward();
    }
    optim::clip_grad_norm(model.gradients(), s.max_norm);
    opt.step();
    loss_err.add(testing::rel_error(model.accumulated_loss(), ref.losses[static_cast<std::size_t>(step)]));
    ++step;
  }
  o.steps = step;
  const int tp = v.shape.tp, tr = mesh.coord().tp;
  for (const Parameter<float>& p : model.parameters()) {
    const Tensor<float> want = p.layout.is_shard() ? shard_of(ref.params.at(p.name), p.layout, tr, tp)
                                                   : ref.params.at(p.name);
    param_err.add(testing::norm_rel_error(p.value, want));
  }
  o.worst_loss = loss_err.value();
  o.worst_param = param_err.value();
  return o;
}
}  // namespace

TEST_CASE("Hybrid with uneven data: a replica whose data ran out skips with zero contribution, and the run equals "
          "the serial run on the rows that exist") {
  const TinyDecoder d;
  const Setup s;
  const Reference ref = uneven_reference(d, s);
  for (const MeshShape shape : {MeshShape{.dp = 2}, MeshShape{.dp = 2, .pp = 2}, MeshShape{.dp = 2, .tp = 2}}) {
    Variant v;
    v.shape = shape;
    v.options.num_microbatches = shape.pp;
    for (bool zero1 : {false, true}) {
      v.zero1 = zero1;
      CAPTURE(v.describe());
      const auto out = tessera::testing::run_ranks(shape.dp * shape.pp * shape.tp,
                                                    [&](Comm& w) { return uneven_body(w, d, s, v, ref); });
      for (const UnevenOutcome& o : out) {
        CHECK(o.steps == 3);   // any_rank_has_data kept every rank in the loop for the longest replica
        CHECK(o.agreed == 2);  // agree_num_steps: the shortest replica's count
        CHECK(o.worst_loss < 1e-5);
        CHECK(o.worst_param < 1e-4);
      }
    }
  }
}

TEST_CASE("ZeroOptimizer: a second one over the same DataParallel is refused on every rank (it would update every "
          "parameter twice); after the first is gone a new one is accepted") {
  const auto out = tessera::testing::run_ranks(2, [](Comm& c) {
    tessera::DataParallel<nn::Linear<float>> dp(nn::Linear<float>(4, 3, nn::LayerInit{.prefix = "l", .seed = 1}), c);
    std::string second;
    {
      tessera::ZeroOptimizer<optim::SGD<float>> first(dp, optim::SGDOptions{.lr = 0.1});
      try {
        tessera::ZeroOptimizer<optim::SGD<float>> again(dp, optim::SGDOptions{.lr = 0.1});
      } catch (const tessera::Error& e) {
        second = e.what();
      }
    }
    std::string third = "accepted";
    try {
      tessera::ZeroOptimizer<optim::SGD<float>> after(dp, optim::SGDOptions{.lr = 0.1});
    } catch (const tessera::Error& e) {
      third = e.what();
    }
    return std::vector<std::string>{second, third};
  });
  for (const auto& r : out) {
    CHECK(r[0].find("already have a ZeroOptimizer") != std::string::npos);
    CHECK(r[1] == "accepted");
  }
}

namespace {
// Gradient of step `k` for parameter `p` (element i): a fixed pattern, exact in float.
float grad_value(int k, const std::string& p, std::int64_t i) {
  return static_cast<float>(((3 * i + 5 * k + static_cast<int>(p.size())) % 7) - 3) * 0.125f;
}
void set_grads(const ParameterList<float>& ps, int k, float scale) {
  for (Parameter<float>& p : ps) {
    Tensor<float> g = p.grad;
    for (std::int64_t i = 0; i < g.numel(); ++i) g.data()[i] = scale * grad_value(k, p.name, i);
  }
}
std::vector<std::vector<float>> values_of(const ParameterList<float>& ps) {
  std::vector<std::vector<float>> out;
  for (const Parameter<float>& p : ps) out.emplace_back(p.value.data(), p.value.data() + p.value.numel());
  return out;
}
}  // namespace

TEST_CASE("Parameter groups: ZeroOptimizer with weight_decay_groups over 2 dp ranks gives AdamW's parameters with the "
          "same groups bitwise; the bias is not decayed, and without the groups it is") {
  const optim::AdamWOptions o{.lr = 0.1, .weight_decay = 0.5};
  auto serial = [&](bool grouped) {
    nn::Linear<float> l(5, 3, nn::LayerInit{.prefix = "l", .seed = 4});
    const ParameterList<float> ps = l.parameters();
    optim::AdamW<float> opt = grouped ? optim::AdamW<float>(optim::weight_decay_groups(ps, o)) : optim::AdamW<float>(ps, o);
    for (int k = 0; k < 3; ++k) {
      set_grads(ps, k, 1.0f);
      opt.step();
    }
    return values_of(ps);
  };
  const auto grouped = serial(true), single = serial(false);
  REQUIRE(grouped.size() == 2);  // weight, bias
  CHECK(grouped[0] == single[0]);  // the weight decays in both
  CHECK(grouped[1] != single[1]);  // the bias only without the groups
  // The bias with groups equals AdamW with weight_decay 0 on it.
  {
    nn::Linear<float> l(5, 3, nn::LayerInit{.prefix = "l", .seed = 4});
    ParameterList<float> bias;
    bias.push_back(l.parameters()[1]);
    optim::AdamW<float> opt(bias, optim::AdamWOptions{.lr = 0.1, .weight_decay = 0});
    for (int k = 0; k < 3; ++k) {
      set_grads(bias, k, 1.0f);
      opt.step();
    }
    CHECK(values_of(bias)[0] == grouped[1]);
  }
  // ZeRO-1 over 2 ranks, bucket_size 0 (one bucket per parameter) and one bucket for all: the
  // blocks cut through parameters of both groups.
  for (std::size_t bucket : {std::size_t{0}, std::size_t{1} << 20}) {
    CAPTURE(bucket);
    const auto out = tessera::testing::run_ranks(2, [&](Comm& c) {
      tessera::DataParallel<nn::Linear<float>> dp(nn::Linear<float>(5, 3, nn::LayerInit{.prefix = "l", .seed = 4}), c,
                                                   {.bucket_size = bucket, .first_bucket_size = bucket});
      tessera::ZeroOptimizer<optim::AdamW<float>> zero(dp, optim::weight_decay_groups(dp.parameters(), o));
      for (int k = 0; k < 3; ++k) {
        set_grads(dp.parameters(), k, 0.5f);  // each rank half: the sum over 2 ranks is the serial gradient
        dp.reduce_grads();
        zero.step();
      }
      return values_of(dp.parameters());
    });
    for (const auto& v : out) CHECK(v == grouped);
  }
}

TEST_CASE("HybridGPT with embedding dropout: evaluation and sampling draw no mask (the logits equal the model "
          "without dropout), training does") {
  const GPTConfig cfg{.vocab_size = 50, .n_positions = 8, .n_layer = 2, .n_head = 4, .d_model = 16, .embd_pdrop = 0.5};
  GPTConfig plain = cfg;
  plain.embd_pdrop = 0;
  const auto out = tessera::testing::run_ranks(4, [&](Comm& w) {
    Mesh mesh(w, MeshShape{.pp = 2, .tp = 2});
    HybridGPT<float> drop(mesh, cfg, 3, {.num_microbatches = 2});
    HybridGPT<float> none(mesh, plain, 3, {.num_microbatches = 2});
    Tensor<std::int32_t> x(Shape{2, 8}), y(Shape{2, 8});
    for (std::int64_t i = 0; i < 16; ++i) {
      x.data()[i] = static_cast<std::int32_t>((7 * i + 1) % 50);
      y.data()[i] = static_cast<std::int32_t>((7 * i + 8) % 50);
    }
    const std::vector<float> a = drop.next_token_logits(x.slice(0, 0, 1).contiguous());
    const std::vector<float> b = none.next_token_logits(x.slice(0, 0, 1).contiguous());
    const double eval_a = drop.evaluate(x, y), eval_b = none.evaluate(x, y);
    drop.zero_grad();
    none.zero_grad();
    const double train_a = drop.forward_backward(x, y), train_b = none.forward_backward(x, y);
    return std::vector<double>{testing::max_rel_error(std::span<const float>(a), std::span<const float>(b)),
                               testing::rel_error(eval_a, eval_b), testing::rel_error(train_a, train_b)};
  });
  for (const auto& r : out) {
    CHECK(r[0] < 1e-6);
    CHECK(r[1] < 1e-6);
    CHECK(r[2] > 1e-4);  // measured 9.8e-4 (small weights at init: a small change of the loss); round-off is 1e-7
  }
}

TEST_CASE("HybridGPT with sequence parallelism: next-token logits of a prompt whose length tp does not divide equal "
          "the model without it (the prompt padded at the end, which the causal mask keeps out)") {
  const GPTConfig cfg{.vocab_size = 50, .n_positions = 8, .n_layer = 2, .n_head = 4, .d_model = 16};
  const auto out = tessera::testing::run_ranks(4, [&](Comm& w) {
    Mesh mesh(w, MeshShape{.pp = 2, .tp = 2});
    HybridGPT<float> sp(mesh, cfg, 3, {.num_microbatches = 1}, std::nullopt, {.sequence_parallel = true});
    HybridGPT<float> plain(mesh, cfg, 3, {.num_microbatches = 1});
    Tensor<std::int32_t> prompt(Shape{1, 5});
    for (std::int64_t t = 0; t < 5; ++t) prompt(0, t) = static_cast<std::int32_t>(7 * t + 1);
    const std::vector<float> a = sp.next_token_logits(prompt), b = plain.next_token_logits(prompt);
    return std::pair<double, std::size_t>(testing::max_rel_error(std::span<const float>(a), std::span<const float>(b)),
                                          a.size());
  });
  for (const auto& [err, n] : out) {
    CHECK(n == 50);
    CHECK(err < 1e-5);
  }
}

TEST_CASE("Hybrid refuses, on every rank, a model cut into more stages than pp x virtual_stages (it would train a "
          "model without its last layers)") {
  const TinyDecoder d;
  const auto msgs = tessera::testing::run_ranks(2, [&](Comm& w) {
    return own_error([&] {
      Mesh mesh(w, MeshShape{.pp = 2});
      const StagePartition three = StagePartition::even(d.num_blocks() + 2, 3);  // 3 stages, pp 2
      Hybrid<float> model(mesh, sequential_stages(d, three), [&](Comm tp) {
        return sequential_loss<TinyDecoder>(VocabParallelCrossEntropy<float>(tp, d.vocab, {.reduction = nn::Reduction::sum}));
      });
    });
  });
  for (const std::string& m : msgs) {
    CAPTURE(m);
    CHECK(m.find("the last of its 2 stages (pp_size 2 x virtual_stages 1) does not hold the model's last layer") !=
          std::string::npos);
  }
}

TEST_CASE("Hybrid wraps each stage in a DataParallelStage: dp replicas whose stages differ are refused on every rank, "
          "naming the stage and the parameter") {
  const auto out = tessera::testing::run_ranks(4, [&](Comm& w) {
    return own_error([&] {
      Mesh mesh(w, MeshShape{.dp = 2, .pp = 2});
      TinyDecoder d;
      if (w.rank() == 3) d.d = 32;  // (pp 1, dp 1): stage 1's second replica is wider
      const StagePartition cut = StagePartition::even(d.num_blocks() + 2, 2);
      Hybrid<float> model(mesh, sequential_stages(d, cut), [&](Comm tp) {
        return sequential_loss<TinyDecoder>(VocabParallelCrossEntropy<float>(tp, d.vocab, {.reduction = nn::Reduction::sum}));
      });
    });
  });
  // World rank = pp * 2 + dp: stage 1's dp replicas are ranks 2 and 3, and they differ in width.
  for (int r : {2, 3}) {
    CAPTURE(r);
    CAPTURE(out[static_cast<std::size_t>(r)]);
    CHECK(out[static_cast<std::size_t>(r)].find("Hybrid stage 'layers 4-7 (block 3 .. last)' on threads:world/dp[pp=1,tp=0]") != std::string::npos);
    CHECK(out[static_cast<std::size_t>(r)].find("\"h.3.ln_1.weight\" (16) float32 Replicate on rank 0 but \"h.3.ln_1.weight\" (32)") != std::string::npos);
    CHECK(out[static_cast<std::size_t>(r)].find("the replicas' parameter lists differ") != std::string::npos);
  }
}
