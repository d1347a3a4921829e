// Resharding on load: a checkpoint saved at one (dp, tp, pp) loads at any other, the fused
// attention weight keeps each rank's heads' q, k, v (CASES C8), optimizer state (full or
// ZeRO-1 flat pieces) follows, and training resumed in another layout equals training that
// never stopped, bitwise.

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "ckpt_test_util.hpp"

using namespace ckpt_test;
using namespace tessera::checkpoint;
using tessera::MeshShape;

namespace {

struct Layout {
  MeshShape shape;
  bool zero = false;  // ZeRO-1: optimizer state as flat ranges per dp rank
};

std::string describe(const Layout& l) {
  return tessera::detail::str("(dp=", l.shape.dp, ", pp=", l.shape.pp, ", tp=", l.shape.tp, l.zero ? ", ZeRO-1)" : ")");
}

// Trains `steps` steps at layout `l` from `full`, then saves params and optimizer state.
void train_and_save(const FullModel& full, Layout l, int steps, const fs::path& dir) {
  tessera::testing::run_ranks(l.shape.world_size(), [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), l.shape);
    Rank r(full, w, l.zero);
    tessera::Comm dp = dp_comm_of(world, w);
    for (int s = 0; s < steps; ++s) r.step(dp);
    const OptimizerState<double> st = r.state();
    save_checkpoint(dir, world, w, r.list, &st, CheckpointMeta{.config = gpt2_config_json(tiny_config()), .step = steps});
  });
}

// Builds ranks at layout `l` from other values (`decoy`), loads `dir` into them, checks the
// step, trains `steps` more steps and reports every rank's parameters.
std::vector<Report> load_and_train(const FullModel& decoy, Layout l, int steps, const fs::path& dir, int saved_step) {
  return tessera::testing::run_ranks(l.shape.world_size(), [&](tessera::Comm& world) {
    const Placement w = placement(world.rank(), l.shape);
    Rank r(decoy, w, l.zero);
    tessera::Comm dp = dp_comm_of(world, w);
    OptimizerState<double> st = r.state();
    const CheckpointInfo info = load_checkpoint(dir, world, w, r.list, &st, gpt2_config_json(tiny_config()));
    REQUIRE(info.step == saved_step);
    REQUIRE(st.step == saved_step);
    r.opt->set_steps(st.step);
    for (int s = 0; s < steps; ++s) r.step(dp);
    return report(r);
  });
}

void check_equal_to_serial(const std::map<std::string, Tensor<double>>& got, const Serial& serial) {
  REQUIRE(got.size() == serial.rank.params.size());
  for (const Parameter<double>& p : serial.rank.params) {
    CAPTURE(p.name);
    REQUIRE(got.count(p.name) == 1);
    CHECK(same_bits(got.at(p.name), p.value));
  }
}

}  // namespace

TEST_CASE("geometry: Shard(1, blocks=3) of a (4, 12) matrix at tp rank 1 of 2 holds columns [2,4) [6,8) [10,12)") {
  const ShardGeometry g = geometry_of("w", Shape{4, 6}, tessera::ParamLayout::shard(1, 3), 1, 2);
  CHECK(g.global_shape == std::vector<std::int64_t>{4, 12});
  CHECK(g.shard_dim == 1);
  REQUIRE(g.ranges.size() == 3);
  CHECK(g.ranges[0] == std::array<std::int64_t, 2>{2, 4});
  CHECK(g.ranges[1] == std::array<std::int64_t, 2>{6, 8});
  CHECK(g.ranges[2] == std::array<std::int64_t, 2>{10, 12});
  const std::vector<Run> runs = g.runs();
  REQUIRE(runs.size() == 12);  // 4 rows x 3 blocks
  CHECK(runs[3].global == 12 + 2);  // row 1, block 0
  CHECK(runs[3].local == 6);
  CHECK(runs[3].length == 2);
  // At tp = 1 the parts are adjacent: one range, one run.
  const ShardGeometry whole = geometry_of("w", Shape{4, 12}, tessera::ParamLayout::shard(1, 3), 0, 1);
  CHECK(whole.ranges.size() == 1);
  CHECK(whole.runs().size() == 1);
  // A flat range clips the runs and counts from its start.
  const ShardGeometry f = geometry_of("w", Shape{4, 6}, tessera::ParamLayout::shard(1, 3), 1, 2, FlatRange{Shape{4, 6}, 5, 9});
  const std::vector<Run> fr = f.runs();
  REQUIRE(fr.size() == 3);
  CHECK(fr[0].global == 11);  // local element 5 = row 0, column 5 -> global column 11
  CHECK(fr[0].local == 0);
  CHECK(fr[0].length == 1);
  CHECK(fr[1].global == 12 + 2);
  CHECK(fr[1].length == 2);
  CHECK(fr[2].global == 12 + 6);
  CHECK(fr[2].length == 1);
  CHECK(error_of([] { (void)geometry_of("w", Shape{4, 5}, tessera::ParamLayout::shard(1, 3), 0, 2); })
            .find("tensor 'w': its local extent 5 in dim 1 is not a multiple of blocks=3") != std::string::npos);
}

TEST_CASE("FlatLayout: parameters back to back, padded to the dp size; a flat range maps back onto named pieces") {
  Parameter<double> a("a", Tensor<double>(Shape{2, 3})), b("b", Tensor<double>(Shape{4})), c("c", Tensor<double>(Shape{3}));
  const FlatLayout f = FlatLayout::contiguous(ParameterList<double>{&a, &b, &c}, 3, 2);
  CHECK(f.params[0].offset == 0);
  CHECK(f.params[1].offset == 6);
  CHECK(f.params[2].offset == 10);  // aligned to 2
  CHECK(f.padded_numel == 18);      // 13 -> multiple of 3 * 2
  CHECK(f.shard_range(1, 3) == std::pair<std::int64_t, std::int64_t>{6, 12});
  const auto segs = f.segments(4, 12);
  REQUIRE(segs.size() == 3);
  CHECK((segs[0].param == 0 && segs[0].param_begin == 4 && segs[0].param_end == 6 && segs[0].flat_begin == 4));
  CHECK((segs[1].param == 1 && segs[1].param_begin == 0 && segs[1].param_end == 4 && segs[1].flat_begin == 6));
  CHECK((segs[2].param == 2 && segs[2].param_begin == 0 && segs[2].param_end == 2 && segs[2].flat_begin == 10));
  Tensor<double> buf(Shape{8});
  const auto shards = f.shards(4, buf, ".exp_avg");
  REQUIRE(shards.size() == 3);
  CHECK(shards[1].name == "b.exp_avg");
  CHECK(shards[1].flat->local_shape == Shape{4});
  shards[1].value.fill(5.0);
  CHECK(buf(2) == 5.0);  // a view into the flat buffer
  CHECK(buf(6) == 0.0);
}

TEST_CASE("C8: the fused c_attn saved at tp 2 loads at tp 1 and 4 (and tp 1 at 3) bitwise, each shard with its heads' q, k, v") {
  const FullModel full = full_gpt(7);
  const std::string name = "h.1.attn.c_attn.weight";
  const Tensor<double> w = std::find_if(full.begin(), full.end(), [&](const auto& e) { return e.first == name; })->second;
  const std::int64_t d = 24;
  REQUIRE(w.shape() == Shape{d, 3 * d});
  struct Case {
    int from, to;
  };
  for (const Case c : {Case{2, 1}, Case{2, 4}, Case{1, 3}, Case{4, 2}}) {
    CAPTURE(c.from);
    CAPTURE(c.to);
    TempDir dir;
    train_and_save(full, Layout{MeshShape{.tp = c.from}}, 0, dir.path / "ckpt");
    const std::vector<Report> reps = load_and_train(full_gpt(99), Layout{MeshShape{.tp = c.to}}, 0, dir.path / "ckpt", 0);
    std::vector<Tensor<double>> shards;
    for (const Report& r : reps) {
      const int t = r.where.coord.tp;
      const Tensor<double> local = r.params.at(name);
      const std::int64_t cols = d / c.to;  // this rank's heads: 12 / tp heads of 2 columns
      REQUIRE(local.shape() == Shape{d, 3 * cols});
      for (int part = 0; part < 3; ++part)  // q, k, v
        CHECK(same_bits(local.slice(1, part * cols, (part + 1) * cols), w.slice(1, part * d + t * cols, part * d + (t + 1) * cols)));
      if (c.to > 1) CHECK(!same_bits(local, w.slice(1, t * 3 * cols, (t + 1) * 3 * cols)));  // not a contiguous third
      shards.push_back(local);
    }
    CHECK(same_bits(unshard(shards, tp_layout(name)), w));
  }
}

TEST_CASE("checkpoint: round trip at the same layout (tp 2) restores parameters, moments and step bitwise") {
  const FullModel full = full_gpt(3);
  Serial serial(full);
  serial.run(3);
  TempDir dir;
  train_and_save(full, Layout{MeshShape{.tp = 2}}, 3, dir.path / "c");
  check_equal_to_serial(reassemble(load_and_train(full_gpt(4), Layout{MeshShape{.tp = 2}}, 0, dir.path / "c", 3)), serial);
  // Moments and step, read back at tp = 1 into a fresh optimizer, equal the serial ones.
  Rank one(full_gpt(5), Placement{}, false);
  OptimizerState<double> st = one.state();
  tessera::testing::run_ranks(1, [&](tessera::Comm& world) {
    load_checkpoint(dir.path / "c", world, Placement{}, one.list, &st, gpt2_config_json(tiny_config()));
  });
  CHECK(st.step == 3);
  for (std::size_t i = 0; i < one.params.size(); ++i) {
    CAPTURE(one.params[i].name);
    CHECK(same_bits(one.opt->exp_avg(i), serial.rank.opt->exp_avg(i)));
    CHECK(same_bits(one.opt->exp_avg_sq(i), serial.rank.opt->exp_avg_sq(i)));
  }
}

TEST_CASE("checkpoint: training resumed at another (dp, tp, pp) equals training that never stopped, bitwise") {
  const FullModel full = full_gpt(11);
  Serial serial(full);
  serial.run(5);
  struct Case {
    Layout from, to;
  };
  const std::vector<Case> cases = {
      // world 2 -> 4
      {{MeshShape{.tp = 2}}, {MeshShape{.dp = 2, .tp = 2}, true}},
      {{MeshShape{.tp = 2}}, {MeshShape{.pp = 2, .tp = 2}}},
      {{MeshShape{.dp = 2}, true}, {MeshShape{.tp = 4}}},
      {{MeshShape{.pp = 2}}, {MeshShape{.dp = 2, .pp = 2}, true}},
      // world 4 -> 1
      {{MeshShape{.dp = 2, .tp = 2}, true}, {MeshShape{}}},
      {{MeshShape{.pp = 2, .tp = 2}}, {MeshShape{}}},
      {{MeshShape{.tp = 4}}, {MeshShape{}}},
      // ZeRO-1 flat shards dp 2 -> 3, plain dp 2 -> tp 3, tp 1 -> 3
      {{MeshShape{.dp = 2}, true}, {MeshShape{.dp = 3}, true}},
      {{MeshShape{.dp = 2}}, {MeshShape{.tp = 3}}},
      {{MeshShape{}}, {MeshShape{.dp = 3}, true}},
  };
  for (const Case& c : cases) {
    CAPTURE(describe(c.from));
    CAPTURE(describe(c.to));
    TempDir dir;
    train_and_save(full, c.from, 2, dir.path / "ckpt");
    check_equal_to_serial(reassemble(load_and_train(full_gpt(12), c.to, 3, dir.path / "ckpt", 2)), serial);
  }
}

TEST_CASE("checkpoint: a pp = 2 save holds the tied wte once, from stage 0, and the index lists the saved layout") {
  const FullModel full = full_gpt(21);
  TempDir dir;
  train_and_save(full, Layout{MeshShape{.dp = 2, .pp = 2, .tp = 2}, true}, 1, dir.path / "c");
  CheckpointReader reader(dir.path / "c");
  CHECK(reader.info().layout.dp == 2);
  CHECK(reader.info().layout.pp == 2);
  CHECK(reader.info().layout.tp == 2);
  CHECK(reader.info().has_optimizer);
  CHECK(reader.info().optimizer_step == 1);
  const std::vector<std::string> names = reader.tensor_names(TensorKind::model);
  REQUIRE(names.size() == full.size());
  for (std::size_t i = 0; i < names.size(); ++i) CHECK(names[i] == full[i].first);  // model order
  // Only dp rank 0 writes model tensors; stage 1 (ranks 4..7) holds wte too but does not save it.
  std::ifstream in(dir.path / "c" / "index.json");
  const auto index = nlohmann::json::parse(in);
  for (const auto& p : index["tensors"]["wte.weight"]["pieces"]) CHECK(p["pp"] == 0);
  CHECK(index["tensors"]["wte.weight"]["pieces"].size() == 2);
  CHECK(index["tensors"]["ln_f.weight"]["pieces"].size() == 1);
  for (const auto& p : index["tensors"]["h.1.mlp.c_fc.weight.exp_avg"]["pieces"]) CHECK(p["geometry"].contains("flat"));
  CHECK(fs::exists(dir.path / "c" / "model-rank00000.safetensors"));
  CHECK(!fs::exists(dir.path / "c" / "model-rank00002.safetensors"));  // dp rank 1
  CHECK(fs::exists(dir.path / "c" / "optim-rank00002.safetensors"));
}
