// The state of the project's ZeroOptimizer (ZeRO-1 over DataParallel's buckets) through
// zero_adamw_state: saved at dp 2, loaded at dp 3 with ZeRO and at dp 1 without, training
// resumes bitwise where an uninterrupted serial run is.

#include <doctest/doctest.h>

#include "ckpt_test_util.hpp"
#include "tessera/checkpoint/zero_state.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/zero_optimizer.hpp"

using namespace ckpt_test;
using namespace tessera::checkpoint;

namespace {

using Zero = tessera::ZeroOptimizer<tessera::optim::AdamW<double>>;

// A GPT under DataParallel with ZeRO-1 AdamW, its values set to `full`; small buckets so that
// parameters straddle the dp blocks.
struct ZeroRun {
  tessera::DataParallel<tessera::GPT<double>> dp;
  Zero zero;
  ZeroRun(tessera::Comm& c, const FullModel& full)
      : dp(tessera::GPT<double>(tiny_config(), 1), c, {.bucket_size = 6000, .first_bucket_size = 2000}),
        zero(dp, tessera::optim::AdamWOptions{.lr = 0.01, .weight_decay = 0.1}) {
    for (Parameter<double>& p : dp.parameters())
      p.value.copy_from(std::find_if(full.begin(), full.end(), [&](const auto& e) { return e.first == p.name; })->second);
  }
  // The gradient of the serial reference (ckpt_test::Rank::step), given by rank 0 only, so the
  // reduce-scatter sum is exact.
  void step(int rank) {
    const auto t = static_cast<double>(zero.inner().steps());
    dp.zero_grad();
    if (rank == 0)
      for (Parameter<double>& p : dp.parameters())
        for (std::int64_t e = 0; e < p.value.numel(); ++e)
          p.grad.data()[e] = std::sin(0.37 * static_cast<double>(e) + 0.11 * static_cast<double>(tessera::stream_id(p.name) % 5) + t) +
                             0.5 * p.value.data()[e];
    dp.buckets().reduce();
    zero.step();
  }
};

}  // namespace

TEST_CASE("zero_adamw_state: ZeroOptimizer state saved at dp 2 resumes at dp 3 (ZeRO) and dp 1 (plain AdamW) bitwise") {
  const FullModel full = full_gpt(31);
  Serial serial(full);
  serial.run(5);
  TempDir d;
  tessera::testing::run_ranks(2, [&](tessera::Comm& world) {
    ZeroRun run(world, full);
    REQUIRE(run.dp.buckets().buckets().size() > 2);
    for (int s = 0; s < 2; ++s) run.step(world.rank());
    const OptimizerState<double> st = zero_adamw_state(run.zero, run.dp.buckets());
    const Placement w{tessera::MeshShape{.dp = 2}, tessera::MeshCoord{.dp = world.rank()}};
    save_checkpoint(d / "c", world, w, run.dp.parameters(), &st, CheckpointMeta{.config = gpt2_config_json(tiny_config()), .step = 2});
  });
  const auto results = tessera::testing::run_ranks(3, [&](tessera::Comm& world) {
    ZeroRun run(world, full_gpt(77));
    OptimizerState<double> st = zero_adamw_state(run.zero, run.dp.buckets());
    const Placement w{tessera::MeshShape{.dp = 3}, tessera::MeshCoord{.dp = world.rank()}};
    load_checkpoint(d / "c", world, w, run.dp.parameters(), &st, gpt2_config_json(tiny_config()));
    run.zero.inner().set_steps(st.step);
    for (int s = 0; s < 3; ++s) run.step(world.rank());
    std::map<std::string, Tensor<double>> out;
    for (const Parameter<double>& p : run.dp.parameters()) out[p.name] = p.value.clone();
    return out;
  });
  for (const auto& got : results)
    for (const Parameter<double>& p : serial.rank.params) {
      CAPTURE(p.name);
      CHECK(same_bits(got.at(p.name), p.value));
    }
  // dp 1 without ZeRO: the moments gathered from both dp ranks' pieces.
  Rank one(full_gpt(78), Placement{}, false);
  OptimizerState<double> st = one.state();
  tessera::testing::run_ranks(1, [&](tessera::Comm& world) {
    load_checkpoint(d / "c", world, Placement{}, one.list, &st, gpt2_config_json(tiny_config()));
  });
  one.opt->set_steps(st.step);
  tessera::Comm none;
  for (int s = 0; s < 3; ++s) one.step(none);
  for (std::size_t i = 0; i < one.params.size(); ++i) {
    CAPTURE(one.params[i].name);
    CHECK(same_bits(one.params[i].value, serial.rank.params[i].value));
  }
}
