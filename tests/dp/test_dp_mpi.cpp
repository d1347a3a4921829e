// The DataParallel bodies of dp_bodies.hpp on real processes under mpirun (tests/dp/meson.build
// launches this program at -np 2, 3 and 4). Every rank runs every case and asserts on its own
// results; tests/mpi/mpi_test_main.cpp sums the failures of all ranks.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "dp_bodies.hpp"
#include "hybrid/hybrid_bodies.hpp"
#include "tessera/mpi.hpp"

using namespace tessera;
using namespace dp_bodies;

namespace {

constexpr double tol = 1e-5;

Comm world() { return mpi::world(); }

DataParallelOptions layout(int which, bool overlap) {
  switch (which) {
    case 0: return {.bucket_size = 0, .first_bucket_size = 0, .overlap_grad_reduce = overlap};
    case 1: return {.bucket_size = 1024, .first_bucket_size = 256, .overlap_grad_reduce = overlap};
    default: return {.bucket_size = std::size_t(-1), .first_bucket_size = std::size_t(-1), .overlap_grad_reduce = overlap};
  }
}

}  // namespace

TEST_CASE("DataParallel (MPI): 5 steps equal 5 serial steps on the global batch for every bucket layout, overlap on "
          "and off, k = 1 and 3; replicas bitwise identical after wrapping and every step") {
  Comm c = world();
  for (int which = 0; which < 3; ++which)
    for (bool overlap : {true, false})
      for (int k : {1, 3}) {
        CAPTURE(which);
        CAPTURE(overlap);
        CAPTURE(k);
        const EquivResult r = equivalence_body(c, {.dp = layout(which, overlap), .accumulation = k});
        CHECK(r.max_loss_rel < tol);
        CHECK(r.max_param_rel < tol);
        CHECK(r.identical_after_wrap);
        CHECK(r.identical_every_step);
        if (overlap) CHECK(r.early_launches == r.num_buckets - 1);
      }
}

TEST_CASE("DataParallel (MPI): unequal per-rank batch sizes equal the serial run; C9: bucket layouts agree within "
          "fp32 round-off") {
  Comm c = world();
  std::vector<std::vector<float>> finals;
  for (int which = 0; which < 3; ++which) {
    CAPTURE(which);
    const EquivResult r = equivalence_body(c, {.dp = layout(which, true), .accumulation = 3, .unequal = true});
    CHECK(r.max_loss_rel < tol);
    CHECK(r.max_param_rel < tol);
    CHECK(r.identical_every_step);
    finals.push_back(r.params);
  }
  for (const auto& f : finals) {
    REQUIRE(f.size() == finals.front().size());
    double num = 0, den = 0;
    for (std::size_t i = 0; i < f.size(); ++i) {
      num += (static_cast<double>(f[i]) - finals.front()[i]) * (static_cast<double>(f[i]) - finals.front()[i]);
      den += static_cast<double>(finals.front()[i]) * finals.front()[i];
    }
    CHECK(std::sqrt(num / den) < tol);
  }
}

TEST_CASE("ZeroOptimizer (MPI): ZeRO-1, ZeRO-2 and ZeRO-3 parameters after 5 steps equal plain DataParallel's "
          "within round-off, state is 1/dp per rank") {
  Comm c = world();
  for (bool adamw : {false, true})
  for (int stage : {1, 2, 3}) {
    CAPTURE(adamw);
    CAPTURE(stage);
    const EquivConfig plain{.dp = layout(1, true), .accumulation = 2, .unequal = true, .adamw = adamw};
    EquivConfig zero = plain;
    zero.zero = true;
    zero.zero2 = stage == 2;
    zero.zero3 = stage == 3;
    const EquivResult p = equivalence_body(c, plain);
    const EquivResult z = equivalence_body(c, zero);
    CHECK(z.identical_every_step);
    CHECK(z.max_loss_rel < tol);
    CHECK(z.max_param_rel < (adamw ? 1e-3 : tol));
    double num = 0, den = 0;
    for (std::size_t i = 0; i < z.params.size(); ++i) {
      num += (static_cast<double>(z.params[i]) - p.params[i]) * (static_cast<double>(z.params[i]) - p.params[i]);
      den += static_cast<double>(p.params[i]) * p.params[i];
    }
    CHECK(std::sqrt(num / den) < (adamw ? 1e-3 : tol));
    const std::size_t per_elem = (adamw ? 2 : 1) * sizeof(float);
    const std::size_t w = static_cast<std::size_t>(c.size());
    CHECK(z.state_bytes * w <= p.state_bytes + z.num_buckets * w * per_elem);
    double total = static_cast<double>(z.state_bytes);  // the ranks' parts add up to the whole
    c.iall_reduce(std::span<double>(&total, 1)).wait();
    CHECK(total == static_cast<double>(p.state_bytes));
  }
}

TEST_CASE("C4 (MPI): micro-batches of 3 and 7 valid tokens accumulate to the mean over all tokens") {
  Comm c = world();
  const C4Result r = c4_body(c);
  CHECK(r.dp_vs_global_mean < tol);
  CHECK(r.mean_of_means_vs_global > 0.05);
}

TEST_CASE("C1 (MPI): ranks taking different branches complete; unused parameters contribute zero") {
  Comm c = world();
  for (bool alternate : {false, true}) {
    CAPTURE(alternate);
    const C1Result r = c1_body(c, 4, alternate);
    CHECK(r.unused_branch_grad_was_zero_locally);
    CHECK(r.first_grad_rel < tol);
    CHECK(r.final_param_rel < tol);
    CHECK(r.identical_every_step);
    const C1Result o = c1_overlap_body(c, 5, alternate, layout(0, true));
    CHECK(o.first_grad_rel < tol);
    CHECK(o.final_param_rel < tol);
    CHECK(o.identical_every_step);
  }
}

TEST_CASE("C2 (MPI): differing parameter lists fail construction on every rank with the same message") {
  Comm c = world();
  for (int variant : {0, 1}) {
    const std::string m = c2_body(c, variant);
    CAPTURE(m);
    if (c.size() == 1) {
      CHECK(m.empty());
      continue;
    }
    CHECK(m.find("parameter lists differ") != std::string::npos);
    CHECK(m.find(variant == 0 ? "has no parameter 3" : "(4, 6) float32 Replicate on rank") != std::string::npos);
  }
}

TEST_CASE("C10 (MPI): a value only some ranks know is the same on every rank") {
  Comm c = world();
  const C10Result r = c10_body(c, 0.3);
  std::vector<double> all(static_cast<std::size_t>(c.size()));
  c.iall_gather(std::span<const double>(&r.mean, 1), all).wait();
  for (double v : all) CHECK(v == r.mean);
  CHECK(r.mean == doctest::Approx(r.serial).epsilon(1e-12));
}

TEST_CASE("DataParallel (MPI): ranks out of data join with zero contribution or agree on the step count") {
  Comm c = world();
  for (bool join : {true, false}) {
    const UnevenResult r = uneven_body(c, join);
    CHECK(r.param_rel < tol);
    CHECK(r.identical);
  }
}

TEST_CASE("DataParallel (MPI): one all-reduce per bucket after the last micro-batch; buckets start during backward") {
  Comm c = world();
  const CountResult r = count_body(c, layout(0, true), 3, false);
  CHECK(r.all_reduce_after_micro == std::vector<std::size_t>{1, 1, c.size() == 1 ? 1u : 9u});
  CHECK(r.launched_when_first_layer_starts == 6);
  const CountResult z = count_body(c, layout(0, true), 1, true);
  CHECK(z.reduce_scatter == (c.size() == 1 ? 0u : 8u));
  CHECK(z.all_gather == (c.size() == 1 ? 0u : 8u));
}

TEST_CASE("DataParallel (MPI): reuse within the learned marks and an undeclared tie train like the serial model") {
  Comm c = world();
  const ReuseResult r = reuse_body(c, {2, 1, 2, 2}, layout(0, true));
  CHECK(r.error.empty());
  CHECK(r.param_rel < tol);
  const TieResult t = undeclared_tie_body(c, 4);
  CHECK(t.copied);
  CHECK(t.param_rel < tol);
  CHECK(t.identical);
}

namespace {

// 4 AdamW steps (clipping at 0.5, 2 accumulation steps) of hybrid_test::Setup's 6-block tied GPT
// as a Hybrid at dp = np, pp 1, tp 1 with ZeRO stage `stage` in units of `unit_layers` layers:
// the losses and the final values by name. Collective over `c`.
std::pair<std::vector<double>, std::map<std::string, std::vector<float>>> hybrid_unit_run(Comm& c, ZeroStage stage,
                                                                                       int unit_layers) {
  hybrid_test::Setup s;
  s.batch = 12;  // 6 or 4 rows per rank at np 2 or 3, in 2 micro-batches
  Mesh mesh(c, {.dp = c.size(), .pp = 1, .tp = 1});
  HybridOptions ho;
  ho.accumulation_steps = 2;
  ho.num_microbatches = 2;
  ho.unit_layers = unit_layers;
  HybridGPT<float> model(mesh, s.config, s.seed, ho);
  DistributedOptimizer<optim::AdamW<float>> opt(model, s.groups(model.parameters()), stage);
  const std::int64_t rows = s.batch / c.size(), r0 = c.rank() * rows, chunk = rows / 2;
  std::vector<double> losses;
  for (int step = 0; step < 4; ++step) {
    auto [x, y] = hybrid_test::batch_of(s, step);
    model.zero_grad();
    for (int k = 0; k < 2; ++k) {
      const std::int64_t lo = r0 + k * chunk;
      model.forward_backward(x.slice(0, lo, lo + chunk).contiguous(), y.slice(0, lo, lo + chunk).contiguous());
    }
    optim::clip_grad_norm(model.gradients(), s.max_norm);
    opt.step();
    losses.push_back(model.accumulated_loss());
  }
  std::map<std::string, std::vector<float>> params;
  opt.gather_full_parameters();
  for (const Parameter<float>& p : model.parameters()) {
    const Tensor<float> v = p.value.contiguous();
    params[p.name].assign(v.data(), v.data() + v.numel());
  }
  opt.release_full_parameters(false);
  return {losses, params};
}

}  // namespace

TEST_CASE("ZeRO-3 per-layer units (MPI): Hybrid at dp = np with unit_layers 1 (the tied LM head using the embedding's "
          "unit) equals plain DP after 4 AdamW steps") {
  Comm c = world();
  if (c.size() > 3) return;  // np 2 and 3
  const auto [zl, zp] = hybrid_unit_run(c, ZeroStage::parameters, 1);
  const auto [pl, pp] = hybrid_unit_run(c, ZeroStage::none, 0);
  REQUIRE(zl.size() == pl.size());
  for (std::size_t i = 0; i < zl.size(); ++i) CHECK(std::abs(zl[i] - pl[i]) <= tol * std::abs(pl[i]));
  REQUIRE(zp.size() == pp.size());
  for (const auto& [name, want] : pp) {
    CAPTURE(name);
    const std::vector<float>& got = zp.at(name);
    REQUIRE(got.size() == want.size());
    // Within 1e-4 of the tensor's largest element, as the threads cases (tests/zero): per-unit
    // clipping norm sums and per-micro-batch reduce-scatters change the round-off only.
    double scale = 0, worst = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      scale = std::max(scale, std::abs(static_cast<double>(want[i])));
      worst = std::max(worst, std::abs(static_cast<double>(got[i]) - want[i]));
    }
    CHECK(worst <= 1e-4 * scale);
  }
}
