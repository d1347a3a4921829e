// LocalSGD (DiLoCo / local SGD) and ParameterAveraging (the same through the parameter
// server), on the threads backend, against data parallelism and direct computations.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "dp/dp_bodies.hpp"
#include "tessera/parallel/data/compression/all_reduce_hook.hpp"
#include "tessera/parallel/data/compression/half_precision_hook.hpp"
#include "tessera/parallel/data/compression/top_k_hook.hpp"
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

// This replica's distinct parameters in LocalSGD's anchor order (the tied head listed once).
std::vector<float> distinct_values(GPT<float>& m) {
  std::vector<float> mine;
  for (const Parameter<float>& p : m.parameters()) {
    if (p.name == "head.weight") continue;  // tied to wte.weight
    const Tensor<float> v = p.value.contiguous();
    mine.insert(mine.end(), v.data(), v.data() + v.numel());
  }
  return mine;
}

TEST_CASE("LocalSGD through a CommHook: AllReduceHook is the plain all-reduce bitwise; TopKHook compresses the updates with error feedback") {
  constexpr int world = 3, steps = 5;
  constexpr double fraction = 0.05;
  struct Out {
    std::vector<float> plain, hooked;          // AllReduceHook vs none, after all steps
    std::vector<std::vector<float>> before;    // top-k run: this replica's parameters before each sync
    std::vector<std::vector<float>> anchors;   // top-k run: the anchor at the start and after each sync
    std::int64_t bytes = 0;
  };
  auto outs = run_ranks(world, [&](Comm& c) {
    Out o;
    GPT<float> a(tiny_gpt(), model_seed + static_cast<std::uint64_t>(c.rank()));
    GPT<float> b(tiny_gpt(), model_seed + static_cast<std::uint64_t>(c.rank()));
    GPT<float> t(tiny_gpt(), model_seed + static_cast<std::uint64_t>(c.rank()));
    optim::SGD<float> opt_a(a.parameters(), inner), opt_b(b.parameters(), inner), opt_t(t.parameters(), inner);
    const LocalSGDOptions avg{.sync_every = 1, .outer_lr = 1.0, .outer_momentum = 0.0};
    LocalSGD<float> la(a.parameters(), c, {.sync_every = 2, .outer_lr = 0.7, .outer_momentum = 0.9});
    LocalSGD<float> lb(b.parameters(), c, {.sync_every = 2, .outer_lr = 0.7, .outer_momentum = 0.9});
    LocalSGD<float> lt(t.parameters(), c, avg);
    lb.set_comm_hook(std::make_shared<AllReduceHook<float>>());
    auto topk = std::make_shared<TopKHook<float>>(fraction);
    lt.set_comm_hook(topk);
    o.anchors.emplace_back(lt.anchor().begin(), lt.anchor().end());
    for (int step = 0; step < steps; ++step) {
      local_step(a, opt_a, step, c.rank());
      la.step();
      local_step(b, opt_b, step, c.rank());
      lb.step();
      local_step(t, opt_t, step, c.rank());
      o.before.push_back(distinct_values(t));
      CHECK(lt.step());
      o.anchors.emplace_back(lt.anchor().begin(), lt.anchor().end());
    }
    o.plain = flatten(a.parameters());
    o.hooked = flatten(b.parameters());
    o.bytes = topk->bytes_sent();
    return o;
  });
  const std::size_t n = outs[0].anchors[0].size();
  REQUIRE(outs[0].before[0].size() == n);
  const std::size_t k = static_cast<std::size_t>(std::ceil(fraction * static_cast<double>(n) - 1e-9));
  // Direct: each rank's residual + pseudo-gradient in float (as the hook adds), its k largest
  // magnitudes sent, the sum over ranks / p taken from the anchor; the rest kept as residual.
  std::vector<std::vector<float>> e(world, std::vector<float>(n, 0.0f));
  std::vector<double> anchor(outs[0].anchors[0].begin(), outs[0].anchors[0].end());
  for (int s = 0; s < steps; ++s) {
    std::vector<double> applied(n, 0.0);
    for (int w = 0; w < world; ++w) {
      std::vector<float>& m = e[static_cast<std::size_t>(w)];
      for (std::size_t i = 0; i < n; ++i) m[i] += outs[0].anchors[static_cast<std::size_t>(s)][i] - outs[w].before[static_cast<std::size_t>(s)][i];
      std::vector<std::size_t> order(n);
      for (std::size_t i = 0; i < n; ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return std::abs(m[x]) > std::abs(m[y]); });
      for (std::size_t j = 0; j < k; ++j) {
        applied[order[j]] += m[order[j]];
        m[order[j]] = 0.0f;
      }
    }
    double worst = 0, scale = 0;
    for (std::size_t i = 0; i < n; ++i) {
      anchor[i] -= applied[i] / world;
      worst = std::max(worst, std::abs(outs[0].anchors[static_cast<std::size_t>(s + 1)][i] - anchor[i]));
      scale = std::max(scale, std::abs(anchor[i]));
    }
    CAPTURE(s);
    CHECK(worst < 1e-6 * scale);
  }
  for (int w = 0; w < world; ++w) {
    CHECK(outs[w].hooked == outs[w].plain);  // AllReduceHook: bitwise the plain all-reduce
    CHECK(outs[w].anchors.back() == outs[0].anchors.back());
    CHECK(outs[w].bytes == static_cast<std::int64_t>(steps * k * 8 * (world - 1)));
  }
}

TEST_CASE("replica_grad_norm: each replica's own gradient norm (replica 0's counted pieces scaled every replica before)") {
  // World 4 = 2 replicas x 2 model-parallel ranks; rank w is replica w / 2, shard w % 2. Each
  // rank holds a counted piece and a piece counted elsewhere (a copy, as a tp-replicated bias).
  constexpr int world = 4, replicas = 2;
  const auto value = [](int rank, int piece, int i) { return static_cast<float>((rank + 1) * (piece + 2)) * 0.25f * (i - 1.5f); };
  const auto out = run_ranks(world, [&](Comm& c) {
    const int replica = c.rank() / 2;
    std::vector<Tensor<float>> t;
    optim::Gradients<float> g{{}, c};
    for (int piece = 0; piece < 2; ++piece) {
      t.emplace_back(Shape{4});
      for (int i = 0; i < 4; ++i) t.back().data()[i] = value(c.rank(), piece, i);
      g.pieces.push_back({t.back(), piece == 0});
    }
    // The norm synchronous data parallelism took: replica 0's pieces only, over the world.
    optim::Gradients<float> old = g;
    if (replica != 0)
      for (auto& p : old.pieces) p.counted = false;
    return std::vector<double>{replica_grad_norm(g, replica, replicas), optim::grad_norm(old)};
  });
  for (int w = 0; w < world; ++w) {
    double s = 0;  // direct: the counted pieces of this replica's two ranks
    for (int r = 2 * (w / 2); r < 2 * (w / 2) + 2; ++r)
      for (int i = 0; i < 4; ++i) s += static_cast<double>(value(r, 0, i)) * value(r, 0, i);
    CAPTURE(w);
    CHECK(out[w][0] == doctest::Approx(std::sqrt(s)).epsilon(1e-12));
    if (w >= 2) CHECK(out[w][0] > 1.5 * out[w][1]);  // replica 1's norm is not replica 0's
  }
  CHECK(out[0][0] == out[1][0]);  // the same on the ranks of a replica
  CHECK(out[2][0] == out[3][0]);
  optim::Gradients<float> alone;
  Tensor<float> x(Shape{2});
  x.data()[0] = 3;
  x.data()[1] = 4;
  alone.pieces.push_back({x, true});
  CHECK(replica_grad_norm(alone, 0, 1) == 5.0);
  CHECK_THROWS_WITH_AS(replica_grad_norm(alone, 2, 2), doctest::Contains("replica 2 is not in [0, 2)"), Error);
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

TEST_CASE("The parameter server's push through a CommHook: bf16 on the link, summed in fp32 on the server") {
  // World 3: workers 0-1, server 2; two parameters split over one server. Each worker's
  // gradient is known; the server (SGD, lr 1) must apply -(1/N) * (bf16(g_0) + bf16(g_1)).
  constexpr int workers = 2;
  constexpr std::int64_t count = 3;  // samples per worker
  const auto g_of = [](int w, std::size_t i) { return static_cast<float>(0.37 * std::sin(1.3 * i + w) + 1e-3 * w); };
  for (const char* spec : {"bf16", "none"}) {
    CAPTURE(spec);
    auto out = run_ranks(workers + 1, [&](Comm& world) {
      Parameter<float> a("a", Tensor<float>::full(Shape{5, 7}, 0.5f)), b("b", Tensor<float>::full(Shape{9}, -0.25f));
      ParameterList<float> params{&a, &b};
      ParameterServer<float> ps(world, params, {.num_servers = 1});
      std::shared_ptr<CommHook<float>> hook;
      if (std::string(spec) == "bf16") hook = std::make_shared<HalfPrecisionHook<float>>(HalfFormat::bf16);
      else hook = std::make_shared<AllReduceHook<float>>();
      ps.set_push_hook(hook);
      if (ps.is_server()) {
        optim::SGD<float> sgd(ps.shard_parameters(), {.lr = 1.0});
        ps.serve(sgd);
        return std::make_pair(std::vector<float>{}, std::int64_t{0});
      }
      std::size_t k = 0;
      for (Parameter<float>* p : {&a, &b})
        for (float& x : p->grad.span()) x = g_of(world.rank(), k++);
      ps.step(params, count);
      ps.finish();
      return std::make_pair(flatten(params), hook->bytes_sent());
    });
    const std::size_t n = 5 * 7 + 9;
    const float scale = static_cast<float>(1.0 / (workers * count));
    int bad = 0;
    for (std::size_t i = 0; i < n; ++i) {
      float sum = 0;
      for (int w = 0; w < workers; ++w) {
        const float g = g_of(w, i);
        sum += std::string(spec) == "bf16" ? bf16_to_float(float_to_bf16(g)) : g;
      }
      const float expect = (i < 35 ? 0.5f : -0.25f) - 1.0f * (sum * scale);
      bad += std::abs(out[0].first[i] - expect) > 1e-7f;
    }
    CHECK(bad == 0);
    CHECK(out[1].first == out[0].first);
    // bf16: 44 values in 22 floats (88 bytes) per push; none: no bytes counted (a plain copy).
    CHECK(out[0].second == (std::string(spec) == "bf16" ? 88 : 0));
  }
  run_ranks(2, [](Comm& world) {  // a hook without a point-to-point form is refused
    Parameter<float> a("a", Tensor<float>::full(Shape{4, 4}, 1.0f));
    ParameterList<float> params{&a};
    ParameterServer<float> ps(world, params, {.num_servers = 1});
    CHECK_THROWS_WITH_AS(ps.set_push_hook(std::make_shared<TopKHook<float>>(0.5)),
                         doctest::Contains("has no point-to-point form"), Error);
    ps.set_push_hook(nullptr);
    if (ps.is_server()) {
      optim::SGD<float> sgd(ps.shard_parameters(), {.lr = 1.0});
      ps.serve(sgd);
    } else {
      ps.finish();
    }
  });
}
