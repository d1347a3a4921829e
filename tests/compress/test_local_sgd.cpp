// LocalSGD (DiLoCo / local SGD) and ParameterAveraging (the same through the parameter
// server), on the threads backend, against data parallelism and direct computations.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "dp/dp_bodies.hpp"
#include "tessera/parallel/data/local_sgd.hpp"
#include "tessera/parallel/ps/parameter_averaging.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;
using namespace dp_bodies;
using testing::run_ranks;

namespace {

// One local step of the tiny GPT on this rank's batch of `step` (mean loss over its own valid
// targets: each replica trains on its own data), inner SGD `opt`.
void local_step(GPT<float>& model, optim::SGD<float>& opt, int step, int rank) {
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  const TokenBatch b = token_batch(step, 0, rank, 2);
  auto [logits, ctx] = model.forward(b.tokens);
  auto [loss, lctx] = ce.forward(logits, b.targets);
  model.backward(ce.backward(1.0f, lctx), ctx);
  opt.step();
  opt.zero_grad();
}

double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - b[i]));
    den = std::max(den, std::abs(double(b[i])));
  }
  return std::isfinite(num) ? num / std::max(den, 1e-30) : INFINITY;
}

const optim::SGDOptions inner{.lr = 0.3, .momentum = 0.9, .weight_decay = 0.01};

}  // namespace

TEST_CASE("LocalSGD with H = 1 and outer SGD at lr 1 without momentum is data parallelism") {
  // Each rank's loss is the mean over its own 2 rows: the same as DataParallel with
  // loss_scale over equal per-rank counts only when the counts are equal, so DataParallel here
  // averages per-rank means too (the 1/p of LocalSGD's mean pseudo-gradient).
  constexpr int world = 3, steps = 6;
  auto out = run_ranks(world, [&](Comm& c) {
    GPT<float> a(tiny_gpt(), model_seed + static_cast<std::uint64_t>(c.rank()));
    optim::SGD<float> opt_a(a.parameters(), inner);
    LocalSGD<float> local(a.parameters(), c, {.sync_every = 1, .outer_lr = 1.0, .outer_momentum = 0.0});
    DataParallel dp(GPT<float>(tiny_gpt(), model_seed), c);
    optim::SGD<float> opt_dp(dp.parameters(), inner);
    nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
    for (int step = 0; step < steps; ++step) {
      local_step(a, opt_a, step, c.rank());
      CHECK(local.step());
      const TokenBatch b = token_batch(step, 0, c.rank(), 2);
      auto [logits, ctx] = dp.forward(b.tokens);
      auto [loss, lctx] = ce.forward(logits, b.targets);
      dp.backward(ce.backward(static_cast<float>(1.0 / world), lctx), ctx);  // mean of the ranks' means
      opt_dp.step();
      dp.zero_grad();
    }
    return std::make_tuple(flatten(a.parameters()), flatten(dp.parameters()), local.syncs());
  });
  for (const auto& [local, dp, syncs] : out) {
    CHECK(local == std::get<0>(out[0]));  // replicas identical
    CHECK(max_rel(local, dp) < 2e-6);
    CHECK(syncs == steps);
  }
}

TEST_CASE("LocalSGD with H = 4: replicas drift between synchronizations; a sync averages them (lr 1) or takes the Nesterov step") {
  constexpr int world = 3, H = 4, steps = 8;
  for (double mu : {0.0, 0.9}) {
    CAPTURE(mu);
    const double outer_lr = mu == 0 ? 1.0 : 0.7;
    struct Out {
      std::vector<std::vector<float>> before;  // this replica's parameters before each sync
      std::vector<float> after1, after2;       // after the first and second sync
      std::vector<float> mid;                  // after step 6 (between syncs)
      std::int64_t syncs = 0;
    };
    auto outs = run_ranks(world, [&](Comm& c) {
      GPT<float> m(tiny_gpt(), model_seed + static_cast<std::uint64_t>(c.rank()));
      optim::SGD<float> opt(m.parameters(), inner);
      LocalSGD<float> local(m.parameters(), c, {.sync_every = H, .outer_lr = outer_lr, .outer_momentum = mu});
      Out o;
      o.before.push_back(std::vector<float>(local.anchor().begin(), local.anchor().end()));  // the start
      for (int step = 0; step < steps; ++step) {
        local_step(m, opt, step, c.rank());
        if ((step + 1) % H == 0) {
          // This replica's distinct parameters, in the anchor's order (wte listed once).
          std::vector<float> mine;
          for (const Parameter<float>& p : m.parameters()) {
            if (p.name == "head.weight") continue;  // tied to wte.weight
            const Tensor<float> v = p.value.contiguous();
            mine.insert(mine.end(), v.data(), v.data() + v.numel());
          }
          o.before.push_back(std::move(mine));
        }
        const bool synced = local.step();
        CHECK(synced == ((step + 1) % H == 0));
        if (step + 1 == H) o.after1 = std::vector<float>(local.anchor().begin(), local.anchor().end());
        if (step + 1 == 2 * H) o.after2 = std::vector<float>(local.anchor().begin(), local.anchor().end());
        if (step == 5) o.mid = flatten(m.parameters());
      }
      o.syncs = local.syncs();
      return o;
    });
    REQUIRE(outs[0].before[1].size() == outs[0].after1.size());  // the parameter order assumption holds
    // Direct outer step in double from the replicas' parameters before each sync.
    const std::size_t n = outs[0].after1.size();
    std::vector<double> anchor(outs[0].before[0].begin(), outs[0].before[0].end()), b(n, 0.0);
    for (int s = 1; s <= 2; ++s) {
      for (std::size_t i = 0; i < n; ++i) {
        double d = 0;
        for (int w = 0; w < world; ++w) d += anchor[i] - outs[w].before[s][i];
        d /= world;
        b[i] = s == 1 ? d : mu * b[i] + d;
        anchor[i] -= outer_lr * (mu > 0 ? d + mu * b[i] : d);
      }
      const std::vector<float>& got = s == 1 ? outs[0].after1 : outs[0].after2;
      double worst = 0, scale = 0;
      for (std::size_t i = 0; i < n; ++i) {
        worst = std::max(worst, std::abs(got[i] - anchor[i]));
        scale = std::max(scale, std::abs(anchor[i]));
      }
      CHECK(worst < 1e-5 * scale);
    }
    for (int w = 0; w < world; ++w) {
      CHECK(outs[w].after2 == outs[0].after2);  // identical after a sync
      CHECK(outs[w].syncs == steps / H);
    }
    CHECK(outs[1].mid != outs[0].mid);  // drift between syncs
  }
}

TEST_CASE("LocalSGD refuses bad options, naming them") {
  run_ranks(1, [](Comm& c) {
    GPT<float> m(tiny_gpt(), model_seed);
    CHECK_THROWS_WITH_AS(LocalSGD<float>(m.parameters(), c, {.sync_every = 0}), doctest::Contains("sync_every 0"), Error);
    CHECK_THROWS_WITH_AS(LocalSGD<float>(m.parameters(), c, {.outer_lr = -1}), doctest::Contains("outer_lr -1"), Error);
    CHECK_THROWS_WITH_AS(LocalSGD<float>(m.parameters(), c, {.outer_momentum = 1.0}),
                         doctest::Contains("outer_momentum 1"), Error);
  });
}

TEST_CASE("Parameter averaging every H steps through the parameter server equals LocalSGD's all-reduce") {
  // World 4: workers 0-2, server 3. The workers also form a dp communicator for LocalSGD.
  constexpr int H = 3, steps = 9;
  auto out = run_ranks(4, [&](Comm& world) {
    const bool server = world.rank() == 3;
    Comm workers = world.split(server ? 1 : 0, world.rank());
    GPT<float> via_ps(tiny_gpt(), model_seed + static_cast<std::uint64_t>(world.rank()));
    ParameterServer<float> ps(world, via_ps.parameters(), {.num_servers = 1});
    if (server) {
      optim::SGD<float> outer(ps.shard_parameters(), {.lr = 1.0});
      ps.serve(outer);
      return std::make_tuple(std::vector<float>{}, std::vector<float>{}, std::int64_t{0}, std::int64_t{0});
    }
    GPT<float> via_ar(tiny_gpt(), model_seed);  // rank 0's start is broadcast by both routes
    optim::SGD<float> opt_ps(via_ps.parameters(), inner), opt_ar(via_ar.parameters(), inner);
    ParameterAveraging<float> avg(ps, via_ps.parameters(), H);
    LocalSGD<float> local(via_ar.parameters(), workers, {.sync_every = H, .outer_lr = 1.0, .outer_momentum = 0.0});
    for (int step = 0; step < steps; ++step) {
      local_step(via_ps, opt_ps, step, world.rank());
      avg.step();
      opt_ps.zero_grad();
      local_step(via_ar, opt_ar, step, world.rank());
      local.step();
    }
    ps.finish();
    return std::make_tuple(flatten(via_ps.parameters()), flatten(via_ar.parameters()), avg.syncs(), local.syncs());
  });
  for (int w = 0; w < 3; ++w) {
    const auto& [ps_params, ar_params, ps_syncs, ar_syncs] = out[static_cast<std::size_t>(w)];
    CHECK(ps_syncs == steps / H);
    CHECK(ar_syncs == steps / H);
    CHECK(ps_params == std::get<0>(out[0]));
    CHECK(max_rel(ps_params, ar_params) < 1e-6);
  }
}
