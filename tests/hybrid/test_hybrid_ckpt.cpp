// Hybrid checkpoints on the threads backend: a run saved at one (dp, pp, tp) layout and resumed
// at another continues exactly as the single-rank run (world 2 -> 4 and 4 -> 1, with ZeRO-1
// state resharded), and a checkpoint of another configuration or a truncated file is an error
// on every rank (each rank's own, never an AbortedError) that changes nothing.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include "hybrid_bodies.hpp"
#include "rank_errors.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/testing/compare.hpp"

using namespace tessera;
using namespace hybrid_test;
namespace fs = std::filesystem;

namespace {
Setup short_setup() {
  Setup s;
  s.steps = 10;
  return s;
}
const Reference& short_reference() {
  static const Reference r = serial_reference(short_setup());
  return r;
}
fs::path scratch(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("tessera_hybrid_ckpt_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  return p;
}
Variant layout(int dp, int pp, int tp, bool zero1, PipelineScheduleKind kind = PipelineScheduleKind::one_f_one_b) {
  Variant v;
  v.shape = MeshShape{.dp = dp, .pp = pp, .tp = tp};
  v.options.schedule = kind;
  v.options.num_microbatches = 2;
  v.zero1 = zero1;
  return v;
}
void check(const std::vector<Outcome>& outcomes, bool final_params) {
  for (const Outcome& o : outcomes) {
    CHECK(o.worst_loss < 1e-5);
    CHECK(o.worst_norm < 1e-4);
    if (final_params) {
      CHECK(o.worst_param < 2e-4);
      CHECK(o.copies_equal);
    }
  }
}
void round_trip(const Variant& a, const Variant& b) {
  const Setup s = short_setup();
  const fs::path dir = scratch("rt");
  CAPTURE(a.describe());
  CAPTURE(b.describe());
  const int wa = a.shape.dp * a.shape.pp * a.shape.tp, wb = b.shape.dp * b.shape.pp * b.shape.tp;
  check(threads::run(wa, [&](Comm& w) { return run_segment(w, s, a, short_reference(), 0, 5, "", dir.string()); }), false);
  REQUIRE(fs::exists(dir / "index.json"));
  // The original layout continued, and the other layout resumed: both equal the serial run.
  check(threads::run(wa, [&](Comm& w) { return run_segment(w, s, a, short_reference(), 5, s.steps, dir.string()); }), true);
  check(threads::run(wb, [&](Comm& w) { return run_segment(w, s, b, short_reference(), 5, s.steps, dir.string()); }), true);
  fs::remove_all(dir);
}
}  // namespace

TEST_CASE("Hybrid checkpoint: saved at world 2 (pp 2), resumed at world 4 (dp 2 x tp 2, ZeRO-1)") {
  round_trip(layout(1, 2, 1, false), layout(2, 1, 2, true));
}

TEST_CASE("Hybrid checkpoint: saved at world 4 (dp 2 x pp 2, ZeRO-1), resumed at world 1") {
  round_trip(layout(2, 2, 1, true, PipelineScheduleKind::gpipe), layout(1, 1, 1, false));
}

TEST_CASE("Hybrid checkpoint: a padded vocabulary (50 over tp 4) saves the [50, d] table and resumes at tp 2 and at dp 2 x tp 4 with ZeRO-1") {
  round_trip(layout(1, 1, 4, false), layout(1, 1, 2, false));
  round_trip(layout(1, 1, 4, false), layout(2, 1, 4, true, PipelineScheduleKind::gpipe));
}

TEST_CASE("Hybrid checkpoint: another configuration or a truncated file fails on every rank, naming it") {
  const Setup s = short_setup();
  const fs::path dir = scratch("err");
  const Variant v = layout(1, 2, 2, false);
  const threads::RunOptions quick{.timeout = std::chrono::seconds(10)};  // a rank left waiting fails fast
  threads::run(4, [&](Comm& w) { return run_segment(w, s, v, short_reference(), 0, 1, "", dir.string()); });
  // Another configuration (one layer more): every rank reads the index and finds it itself,
  // so each rank's own error names the field and both values.
  Setup deeper = s;
  deeper.config.n_layer = 7;
  const std::vector<RankError> config_errors = threads::run(
      4,
      [&](Comm& w) {
        Mesh mesh(w, v.shape);
        HybridGPT<float> model(mesh, deeper.config, deeper.seed, v.options);
        DistributedOptimizer<optim::AdamW<float>> opt(model, deeper.groups(model.parameters()), v.zero1);
        return rank_error(
            [&] { checkpoint::load_hybrid_checkpoint(dir, model, opt, checkpoint::gpt2_config_json(deeper.config)); });
      },
      quick);
  check_own_errors(config_errors, {"another model configuration: n_layer is 6 in the checkpoint and 7 in this model"});
  // A truncated rank file: the ranks that read it throw their own error naming it, every
  // other rank throws the agreed error naming the lowest of those ranks and the file (not an
  // AbortedError), and no rank's parameters changed.
  const fs::path victim = dir / "model-rank00001.safetensors";
  REQUIRE(fs::exists(victim));
  fs::resize_file(victim, fs::file_size(victim) / 2);
  struct Truncated {
    RankError error;
    bool unchanged = false;
  };
  const std::vector<Truncated> truncated = threads::run(
      4,
      [&](Comm& w) {
        Mesh mesh(w, v.shape);
        HybridGPT<float> model(mesh, s.config, s.seed, v.options);
        DistributedOptimizer<optim::AdamW<float>> opt(model, s.groups(model.parameters()), v.zero1);
        std::vector<Tensor<float>> before;
        for (const Parameter<float>& p : model.parameters()) before.push_back(p.value.clone());
        Truncated t;
        t.error =
            rank_error([&] { checkpoint::load_hybrid_checkpoint(dir, model, opt, checkpoint::gpt2_config_json(s.config)); });
        t.unchanged = true;
        std::size_t i = 0;
        for (const Parameter<float>& p : model.parameters())
          t.unchanged = t.unchanged && tessera::testing::bitwise_equal_finite<float>(p.value.contiguous().span(), before[i++].span());
        return t;
      },
      quick);
  int first_own = -1;
  for (int r = 0; r < 4 && first_own < 0; ++r)
    if (!contains(truncated[static_cast<std::size_t>(r)].error.message, "failed on rank")) first_own = r;
  REQUIRE(first_own >= 0);  // some rank found the truncation itself
  for (int r = 0; r < 4; ++r) {
    const Truncated& t = truncated[static_cast<std::size_t>(r)];
    CAPTURE(r);
    CAPTURE(t.error.message);
    CHECK(t.error.thrown);
    CHECK(!t.error.aborted);
    CHECK(!t.error.timeout);
    CHECK(contains(t.error.message, victim.filename().string()));
    CHECK(contains(t.error.message, "truncated"));
    if (contains(t.error.message, "failed on rank")) CHECK(contains(t.error.message, "failed on rank " + std::to_string(first_own)));
    CHECK(t.unchanged);
  }
  fs::remove_all(dir);
}
