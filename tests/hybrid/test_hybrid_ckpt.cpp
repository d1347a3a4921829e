// Hybrid checkpoints on the threads backend: a run saved at one (dp, pp, tp) layout and resumed
// at another continues exactly as the single-rank run (world 2 -> 4 and 4 -> 1, with ZeRO-1
// state resharded), and a checkpoint of another configuration or a corrupted file is an error
// on every rank that changes nothing.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include "hybrid_bodies.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"

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
  v.options.zero1 = zero1;
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
  threads::run(4, [&](Comm& w) { return run_segment(w, s, v, short_reference(), 0, 1, "", dir.string()); });
  // Another configuration: one layer more.
  Setup deeper = s;
  deeper.config.n_layer = 7;
  std::vector<std::string> messages(4);
  CHECK_THROWS(threads::run(4, [&](Comm& w) {
    Mesh mesh(w, v.shape);
    HybridGPT<float> model(mesh, deeper.config, deeper.seed, v.options, deeper.adamw());
    try {
      checkpoint::load_hybrid_checkpoint(dir, model, checkpoint::gpt2_config_json(deeper.config));
    } catch (const std::exception& e) {
      messages[static_cast<std::size_t>(w.rank())] = e.what();
      throw;
    }
    return 0;
  }));
  for (const std::string& m : messages) {
    CAPTURE(m);
    CHECK(m.find("n_layer") != std::string::npos);
  }
  // A truncated rank file: every rank throws, naming the file, and the parameters are unchanged.
  fs::path victim;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("model-rank", 0) == 0) victim = e.path();
  REQUIRE(!victim.empty());
  fs::resize_file(victim, fs::file_size(victim) / 2);
  std::vector<std::string> errs(4);
  std::vector<int> unchanged(4, 0);
  CHECK_THROWS(threads::run(4, [&](Comm& w) {
    Mesh mesh(w, v.shape);
    HybridGPT<float> model(mesh, s.config, s.seed, v.options, s.adamw());
    std::vector<Tensor<float>> before;
    for (const Parameter<float>& p : model.parameters()) before.push_back(p.value.clone());
    try {
      checkpoint::load_hybrid_checkpoint(dir, model, checkpoint::gpt2_config_json(s.config));
    } catch (const std::exception& e) {
      errs[static_cast<std::size_t>(w.rank())] = e.what();
      bool same = true;
      std::size_t i = 0;
      for (const Parameter<float>& p : model.parameters()) same = same && tp_test::bitwise_equal(p.value, before[i++]);
      unchanged[static_cast<std::size_t>(w.rank())] = same ? 1 : 0;
      throw;
    }
    return 0;
  }));
  for (int r = 0; r < 4; ++r) {
    CAPTURE(errs[static_cast<std::size_t>(r)]);
    CHECK(!errs[static_cast<std::size_t>(r)].empty());
    CHECK(unchanged[static_cast<std::size_t>(r)] == 1);
  }
  CHECK(errs[0].find(victim.filename().string()) != std::string::npos);
  fs::remove_all(dir);
}
