// The planner (include/tessera/plan): activation memory against Korthikanti et al.'s closed
// forms, model state against ZeRO's, FLOPs and parameter counts against Narayanan et al.'s
// formulas, the pipeline replay against the schedules' own counts and the papers' bubble, the
// cluster file, and the search. Each expected value is a formula written out here, never the
// planner's own bookkeeping.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "flat_cluster.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/recompute.hpp"
#include "tessera/plan/calibration.hpp"
#include "tessera/plan/plan.hpp"
#include "tessera/plan/search.hpp"
#include "tessera/schedule/svg.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/instrumented_comm.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;
using namespace tessera::plan;

namespace {

// GPT-3 175B's shape (Korthikanti et al. 2022, Table 3).
ModelSpec gpt175() {
  return ModelSpec{.name = "175B", .layers = 96, .hidden = 12288, .heads = 96, .kv_heads = 0, .ffn = 0,
                   .vocab = 51200, .seq = 2048, .tied = true};
}

using plan_test::flat_cluster;

double rel(double a, double b) { return testing::rel_error(a, b); }

}  // namespace

TEST_CASE("LayerActivations: within 10% of Korthikanti et al.'s per-layer formulas in every mode") {
  // Their Table 2, 16-bit activations and 1-byte dropout masks; b micro-batch, a heads, t tp.
  for (const ModelSpec& m : {gpt175(), ModelSpec{.name = "22B", .layers = 48, .hidden = 6144, .heads = 64, .kv_heads = 0,
                                                  .ffn = 0, .vocab = 51200, .seq = 2048, .tied = true}})
    for (int t : {1, 2, 8})
      for (int b : {1, 4}) {
        CAPTURE(m.name);
        CAPTURE(t);
        CAPTURE(b);
        const double s = m.seq, h = m.hidden, a = m.heads, sbh = s * b * h;
        auto bytes = [&](bool sp, Recompute r) {
          Layout l{.tp = t, .microbatch_size = b};
          l.sequence_parallel = sp;
          l.recompute = r;
          return LayerActivations::of(m, l).bytes();
        };
        CHECK(rel(bytes(false, Recompute::none), sbh * (10 + 24.0 / t + 5 * a * s / (h * t))) < 0.10);
        CHECK(rel(bytes(false, Recompute::selective), sbh * (10 + 24.0 / t)) < 0.10);
        CHECK(rel(bytes(false, Recompute::full), 2 * sbh) < 0.10);
        if (t > 1) {
          CHECK(rel(bytes(true, Recompute::none), sbh / t * (34 + 5 * a * s / h)) < 0.10);
          CHECK(rel(bytes(true, Recompute::selective), 34 * sbh / t) < 0.10);
        }
        if (t == 1) CHECK(rel(bytes(false, Recompute::none), sbh * (34 + 5 * a * s / h)) < 0.10);
      }
}

TEST_CASE("LayerActivations: a block without dropout keeps s b h (32 + 2 a s / h) bytes: no masks, no dropout output") {
  // Korthikanti et al.'s 34 + 5 a s / h less the two residual masks (1 byte each) and the
  // attention dropout's mask (1 byte) and output (2 bytes per score).
  ModelSpec m = gpt175();
  m.dropout = false;
  for (int b : {1, 4}) {
    const double s = m.seq, h = m.hidden, a = m.heads, sbh = s * b * h;
    CHECK(rel(LayerActivations::of(m, Layout{.microbatch_size = b}).bytes(), sbh * (32 + 2 * a * s / h)) < 1e-12);
  }
}

TEST_CASE("MemoryEstimate: the first 1F1B rank keeps L layers of activations, interleaved L (1 + (p-1)/(p v))") {
  // Korthikanti et al. 2022, sec. 4.2.3: 1F1B's first stage holds p micro-batches of L/p layers;
  // interleaving multiplies that by (1 + (p-1)/(p v)).
  const ModelSpec m = gpt175();
  const Cluster c = flat_cluster();
  for (int p : {2, 4, 8})
    for (int v : {1, 2, 3}) {
      CAPTURE(p);
      CAPTURE(v);
      if (m.layers % (p * v) != 0) continue;
      Layout l{.dp = 1, .tp = 8, .pp = p, .virtual_stages = v, .microbatch_size = 1, .num_microbatches = 4 * p};
      l.schedule = v > 1 ? PipelineSchedule::interleaved : PipelineSchedule::one_f_one_b;
      l.sequence_parallel = true;
      l.recompute = Recompute::selective;
      const Plan plan = Plan::predict(m, c, l);
      const double per_layer = 34.0 * m.seq * m.hidden / 8;  // SP + selective, b = 1
      const double expected = per_layer * m.layers * (v == 1 ? 1.0 : 1.0 + double(p - 1) / (p * v));
      CHECK(plan.memory.pp_rank == 0);
      CHECK(rel(plan.memory.activations, expected) < 0.10);
    }
}

TEST_CASE("MemoryEstimate: model state per device is ZeRO's 16 Psi, 4 Psi + 12 Psi/N, 2 Psi + 14 Psi/N, 16 Psi/N") {
  // Rajbhandari et al. 2020 (REFERENCE.md D), with Psi the parameters a device holds.
  const ModelSpec m{.name = "1.3B", .layers = 24, .hidden = 2048, .heads = 16, .kv_heads = 0, .ffn = 0,
                    .vocab = 50304, .seq = 1024, .tied = true};
  const Cluster c = flat_cluster();
  const double psi = m.parameters();  // tp = pp = 1: the device holds every parameter
  CHECK(rel(psi, 12.0 * 24 * 2048.0 * 2048 * (1 + 13.0 / (12 * 2048) + (50304.0 + 1024) / (12 * 24 * 2048)) + 2 * 2048) <
        1e-12);  // Narayanan et al. 2021, Eq. 2, plus the final LayerNorm
  const int n = 16;
  const double expected[] = {16 * psi, 4 * psi + 12 * psi / n, 2 * psi + 14 * psi / n, 16 * psi / n};
  for (int z = 0; z <= 3; ++z) {
    CAPTURE(z);
    const Plan p = Plan::predict(m, c, Layout{.dp = n, .microbatch_size = 1, .num_microbatches = 1, .zero_stage = z});
    CHECK(rel(p.memory.parameters + p.memory.gradients + p.memory.optimizer_state, expected[z]) < 1e-12);
  }
}

TEST_CASE("CostModel: a block's GEMMs do 24 b s h^2 (1 + s/(6h)) / t flops and a step 96 B s l h^2 (...) with full recomputation") {
  const ModelSpec m = gpt175();
  for (int t : {1, 8}) {
    const CostModel cm{.model = m, .cluster = flat_cluster(), .layout = Layout{.tp = t, .microbatch_size = 2}};
    double flops = 0;
    for (const Gemm& g : cm.layer_gemms()) flops += g.flops * g.batch;
    const double s = m.seq, h = m.hidden, b = 2;
    CHECK(rel(flops, 24 * b * s * h * h * (1 + s / (6 * h)) / t) < 1e-12);
  }
  // With a flat curve every GEMM runs at the same rate, so the compute time of the GEMMs of one
  // step (no memory-bound work: infinite bandwidth) is Narayanan et al.'s FLOPs / (peak * 0.5).
  Cluster c = flat_cluster(0.5);
  c.memory_bandwidth = 1e30;
  c.intra_node_bandwidth = c.inter_node_bandwidth = 1e30;
  c.intra_node_latency = c.inter_node_latency = 0;
  Layout l{.dp = 1, .tp = 1, .pp = 1, .microbatch_size = 1, .num_microbatches = 4};
  l.recompute = Recompute::full;
  const ModelSpec small{.name = "small", .layers = 4, .hidden = 1024, .heads = 16, .kv_heads = 0, .ffn = 0,
                        .vocab = 32000, .seq = 1024, .tied = true};
  const Plan p = Plan::predict(small, c, l);
  const double B = 4, s = 1024, L = 4, h = 1024, V = 32000;
  const double F = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h));
  CHECK(rel(p.time.compute, F / (312e12 * 0.5)) < 1e-9);
  CHECK(p.time.bubble == doctest::Approx(0.0).epsilon(1e-12));
}

TEST_CASE("TimeEstimate: the replay's sends are the schedule's 2 (S-1) m hand-offs, and its bubble the papers' (p-1)/(v m)") {
  // Uniform stages (tp 1 and infinite memory bandwidth: no embedding cost, a head of 8 tokens'
  // vocabulary, t_B = 2 t_F exactly), free transfers: the bubble ratio of the replay is
  // Narayanan et al.'s (p-1)/m for 1F1B and (p-1)/(v m) interleaved.
  Cluster c = flat_cluster();
  c.memory_bandwidth = 1e30;
  const ModelSpec m{.name = "uniform", .layers = 24, .hidden = 4096, .heads = 32, .kv_heads = 0, .ffn = 0,
                    .vocab = 8, .seq = 2048, .tied = true};
  for (int p : {2, 4})
    for (int v : {1, 2, 3})
      for (int mb : {4, 8}) {
        CAPTURE(p);
        CAPTURE(v);
        CAPTURE(mb);
        Layout l{.dp = 1, .tp = 1, .pp = p, .virtual_stages = v, .microbatch_size = 1, .num_microbatches = mb};
        l.schedule = v > 1 ? PipelineSchedule::interleaved : PipelineSchedule::one_f_one_b;
        const Plan plan = Plan::predict(m, c, l);
        const int S = p * v;
        CHECK(plan.time.p2p_messages == 2LL * (S - 1) * mb);  // one SEND each way per boundary and micro-batch
        CHECK(plan.time.p2p_bytes == doctest::Approx(2.0 * 2048 * 4096));  // b s h, 16-bit
        CHECK(plan.time.bubble_ratio == doctest::Approx(double(p - 1) / (v * mb)).epsilon(1e-3));
        const double busy = plan.time.compute + plan.time.tp_comm;
        CHECK(plan.time.bubble == doctest::Approx(busy * (p - 1) / (v * mb)).epsilon(1e-3));
        CHECK(plan.time.pp_p2p > 0);
      }
}

TEST_CASE("TimeEstimate: tp all-reduces are 2 (t-1)/t S / B + 2 (t-1) latency, six per block with full recomputation, plus the embedding, head and cross-entropy") {
  const Cluster c = flat_cluster();
  const ModelSpec m = gpt175();
  Layout l{.dp = 1, .tp = 8, .pp = 1, .microbatch_size = 1, .num_microbatches = 2};
  l.recompute = Recompute::full;
  const Plan p = Plan::predict(m, c, l);
  const double S = 2.0 * 2048 * 12288;  // b s h, 16-bit
  const double one = 2 * 7.0 / 8 * S / 300e9 + 2 * 7 * 5e-6;
  // Per micro-batch: 6 per block (forward, recomputed forward, backward: 2 each), the
  // embedding's (and its recomputation's), the head's input gradient, and the vocab-parallel
  // cross-entropy's three small ones (b s 16-bit values twice, b s doubles once).
  auto small = [](double bytes) { return 2 * 7.0 / 8 * bytes / 300e9 + 2 * 7 * 5e-6; };
  const double ce = 2 * small(2.0 * 2048) + small(8.0 * 2048);
  CHECK(rel(p.time.tp_comm, 2 * ((6 * 96 + 3) * one + ce)) < 1e-9);
}

TEST_CASE("Cluster: the JSON file's units, and errors that name the missing key or the bad point") {
  const Cluster c = flat_cluster();
  CHECK(c.device_memory == 80.0 * 1024 * 1024 * 1024);
  CHECK(c.peak_flops == 312e12);
  CHECK(c.inter_node_bandwidth_per_device() == doctest::Approx(25e9));
  nlohmann::json j = {{"devices_per_node", 8}};
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("no key 'device_memory_gib'"), Error);
  GemmEfficiency g{.points = {{1e9, 0.5}, {1e11, 0.9}}};
  CHECK(g.at(1e10) == doctest::Approx(0.7));  // halfway in log(flops)
  CHECK(g.at(1e3) == doctest::Approx(0.5));
  CHECK(g.at(1e15) == doctest::Approx(0.9));
  GemmEfficiency bad{.points = {{1e9, 0.5}, {1e8, 0.9}}};
  CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("point 1 has flops 1e+08, not above point 0's 1e+09"), Error);
  CHECK_THROWS_WITH_AS(Cluster::load("/nonexistent/cluster.json"), doctest::Contains("cannot open '/nonexistent/cluster.json'"),
                       Error);
}

TEST_CASE("search: the ranked layouts fit and are sorted; the first beats every other fitting layout tried by hand") {
  const Cluster c = flat_cluster();
  const ModelSpec m{.name = "6.7B", .layers = 32, .hidden = 4096, .heads = 32, .kv_heads = 0, .ffn = 0,
                    .vocab = 51200, .seq = 2048, .tied = true};
  const SearchResult r = search(m, c, SearchOptions{.world = 16, .global_batch = 64});
  REQUIRE(!r.ranked.empty());
  for (std::size_t i = 0; i < r.ranked.size(); ++i) {
    CHECK(r.ranked[i].fits());
    CHECK(r.ranked[i].layout.world() == 16);
    CHECK(r.ranked[i].layout.global_batch() == 64);
    if (i) CHECK(r.ranked[i - 1].time.total() <= r.ranked[i].time.total());
  }
  // Independent enumeration of a few layouts: none that fits is faster than the first choice.
  for (int tp : {1, 2, 4, 8})
    for (int pp : {1, 2, 4}) {
      if (16 % (tp * pp)) continue;
      Layout l{.dp = 16 / (tp * pp), .tp = tp, .pp = pp, .microbatch_size = 1};
      l.num_microbatches = 64 / l.dp;
      l.recompute = Recompute::selective;
      l.sequence_parallel = tp > 1;
      const Plan p = Plan::predict(m, c, l);
      if (p.fits()) CHECK(r.ranked.front().time.total() <= p.time.total());
    }
  // tp 16 spans nodes of 8; ask for it explicitly and it is rejected with that reason.
  const SearchResult r16 = search(m, c, SearchOptions{.world = 16, .global_batch = 64, .tp_sizes = {16}});
  CHECK(r16.ranked.empty());
  REQUIRE(!r16.rejected.empty());
  CHECK(r16.rejected.front().reason == "tp 16 spans nodes of 8 devices");
}

TEST_CASE("search: a model too large for the devices is rejected everywhere, each reason naming its GiB") {
  const Cluster c = flat_cluster();
  const SearchResult r = search(gpt175(), c, SearchOptions{.world = 8, .global_batch = 8});
  CHECK(r.ranked.empty());
  REQUIRE(!r.rejected.empty());
  int memory_reasons = 0;
  for (const Rejected& x : r.rejected)
    if (x.reason.find("GiB on pp rank") != std::string::npos) ++memory_reasons;
  CHECK(memory_reasons > 0);
}

TEST_CASE("TimeEstimate: the predicted sends and bytes equal what executing the layout's schedule sends through an instrumented Comm") {
  // One source of truth: a small executor walks each rank's ticks of Layout::build_schedule()
  // and sends, per transfer, a buffer of the planner's message size (fp32 activations, as
  // tessera's own pipeline sends them); the counts are taken from InstrumentedComm on every
  // rank, not from the schedule.
  const ModelSpec m{.name = "tiny", .layers = 12, .hidden = 8, .heads = 2, .kv_heads = 0, .ffn = 0,
                    .vocab = 16, .seq = 6, .tied = true};
  const Precision fp32{.activation_bytes = 4, .parameter_bytes = 4, .gradient_bytes = 4, .optimizer_bytes = 8};
  std::vector<Layout> layouts;
  for (int p : {2, 3}) {
    layouts.push_back(Layout{.pp = p, .microbatch_size = 2, .num_microbatches = 5});
    Layout g{.pp = p, .microbatch_size = 1, .num_microbatches = 3};
    g.schedule = PipelineSchedule::gpipe;
    layouts.push_back(g);
    Layout il{.pp = p, .virtual_stages = 2, .microbatch_size = 1, .num_microbatches = 2 * p};
    il.schedule = PipelineSchedule::interleaved;
    layouts.push_back(il);
  }
  for (const Layout& l : layouts) {
    CAPTURE(l.to_string());
    const Plan plan = Plan::predict(m, flat_cluster(), l, fp32);
    const schedule::Schedule s = l.build_schedule();
    const std::size_t count = static_cast<std::size_t>(plan.time.p2p_bytes / sizeof(float));
    const auto counters = testing::run_ranks(l.pp, [&](Comm& world) {
      auto c = std::make_shared<testing::CommCounters>();
      Comm comm = testing::instrument(world, c);
      std::vector<std::vector<float>> boxes;
      for (const schedule::Tick& tick : s.ticks[static_cast<std::size_t>(comm.rank())]) {
        boxes.assign(tick.size(), std::vector<float>(count, 1.0f));
        std::vector<P2POp> ops;
        for (std::size_t i = 0; i < tick.size(); ++i) {
          const schedule::Action& a = tick[i];
          if (a.is_send()) ops.push_back(P2POp::send(std::span<const float>(boxes[i]), a.peer, a.transfer_tag(s.num_microbatches)));
          if (a.is_recv()) ops.push_back(P2POp::recv(std::span<float>(boxes[i]), a.peer, a.transfer_tag(s.num_microbatches)));
        }
        if (!ops.empty()) comm.batch_send_recv(ops);
      }
      return std::pair{c->calls(testing::CallKind::send), c->bytes(testing::CallKind::send)};
    });
    std::size_t sends = 0, bytes = 0;
    for (const auto& [calls, b] : counters) {
      sends += calls;
      bytes += b;
    }
    CHECK(static_cast<long long>(sends) == plan.time.p2p_messages);
    CHECK(static_cast<double>(bytes) == doctest::Approx(plan.time.p2p_messages * plan.time.p2p_bytes));
    CHECK(plan.time.p2p_bytes == doctest::Approx(4.0 * l.microbatch_size * m.seq * m.hidden));  // b s h fp32
  }
}

TEST_CASE("The cluster files in plan/clusters load, and their numbers are the datasheets'") {
  const std::string dir = std::string(TESSERA_SOURCE_ROOT) + "/plan/clusters/";
  const Cluster a = Cluster::load(dir + "selene_a100.json");
  CHECK(a.peak_flops == 312e12);
  CHECK(a.devices_per_node == 8);
  CHECK(a.inter_node_bandwidth == doctest::Approx(8 * 200e9 / 8));  // 8 x 200 Gb/s HDR per node
  const Cluster j = Cluster::load(dir + "jeanzay_a100.json");
  CHECK(j.inter_node_bandwidth == doctest::Approx(4 * 100e9 / 8));  // 4 x 100 Gb/s Omni-Path
  CHECK(j.gemm_efficiency.points == a.gemm_efficiency.points);      // one A100 curve
  const Cluster h = Cluster::load(dir + "h100.json");
  CHECK(h.peak_flops == 989e12);
}

TEST_CASE("The committed calibrations plan/clusters/this_machine_*.json hold every field calibrate writes") {
  // A file written before a measurement was added (block_overhead, cores_per_node_at_ranks)
  // loads with that term at 0, and predicts small models several times too fast: refused here.
  const std::filesystem::path dir = std::filesystem::path(TESSERA_SOURCE_ROOT) / "plan" / "clusters";
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("this_machine_", 0) != 0 || entry.path().extension() != ".json") continue;
    CAPTURE(name);
    ++files;
    std::ifstream in(entry.path());
    const nlohmann::json j = nlohmann::json::parse(in);
    for (const char* key : {"name", "source", "devices_per_node", "cores_per_node", "cores_per_node_at_ranks",
                            "device_memory_gib", "peak_tflops", "memory_bandwidth_gbps", "intra_node", "inter_node",
                            "gemm_efficiency", "waiting_core_share", "block_overhead", "calibration"}) {
      CAPTURE(key);
      CHECK(j.contains(key));
    }
    REQUIRE(j.contains("block_overhead"));
    CHECK(j.at("block_overhead").contains("per_pass_us"));
    CHECK(j.at("block_overhead").contains("per_token_ns"));
    const Cluster c = Cluster::load(entry.path().string());
    CHECK(c.block_pass_overhead + c.block_token_overhead > 0);  // measured, not the default 0
  }
  CHECK(files == 2);  // threads and mpi
}

TEST_CASE("BLOOM sweep (rows.md): the layout whose model state alone exceeds 80 GiB is flagged, the other 14 are not") {
  // The sweep as published_rows.json copies it from rows.md (cluster J, 181B, full
  // recomputation, ZeRO-1). rows.md gives no measured memory per layout, so the check is: the
  // planner flags exactly the layouts whose 16-bit weights and gradients plus the sharded
  // optimizer state, 4 P/(tp pp) + 12 P/(tp pp dp) with P from Narayanan's Eq. 2 (written
  // here), already exceed the device; that is dp 48 x tp 8 x pp 1, and no other.
  const std::string root = TESSERA_SOURCE_ROOT;
  std::ifstream in(root + "/plan/validation/published_rows.json");
  REQUIRE(in.good());
  const nlohmann::json doc = nlohmann::json::parse(in);
  const nlohmann::json& sw = doc.at("bloom_sweep");
  const Cluster c = Cluster::load(root + "/plan/clusters/" + sw.at("cluster").get<std::string>());
  const ModelSpec m{.name = "BLOOM sweep", .layers = sw.at("layers"), .hidden = sw.at("hidden"), .heads = sw.at("heads"),
                    .kv_heads = 0, .ffn = 0, .vocab = sw.at("vocab"), .seq = sw.at("seq"), .tied = true};
  const double h = m.hidden, l = m.layers, V = m.vocab, s = m.seq;
  const double P = 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h));
  int flagged = 0, n = 0;
  for (const nlohmann::json& x : sw.at("layouts")) {
    Layout lay{.dp = x.at("dp"), .tp = x.at("tp"), .pp = x.at("pp"), .microbatch_size = x.at("mbs")};
    lay.num_microbatches = static_cast<int>(x.at("global_batch").get<long long>() / (lay.dp * lay.microbatch_size));
    lay.recompute = Recompute::full;
    lay.zero_stage = 1;
    CAPTURE(lay.to_string());
    const Plan p = Plan::predict(m, c, lay);
    const double state = 4 * P / (lay.tp * lay.pp) + 12 * P / (lay.tp * lay.pp * lay.dp);
    const bool must_flag = state > c.device_memory;
    CHECK(p.fits() == !must_flag);
    flagged += p.fits() ? 0 : 1;
    ++n;
  }
  CHECK(n == 15);
  CHECK(flagged == 1);
}

TEST_CASE("CostModel: 70 blocks over 12 stages (BLOOM) give 5 to the first and last stage and 6 to the ten inner ones") {
  const ModelSpec m{.name = "BLOOM", .layers = 70, .hidden = 14336, .heads = 112, .kv_heads = 0, .ffn = 0,
                    .vocab = 250880, .seq = 2048, .tied = true};
  const CostModel cm{.model = m, .cluster = flat_cluster(), .layout = Layout{.dp = 8, .tp = 4, .pp = 12}};
  int total = 0;
  for (int s = 0; s < 12; ++s) {
    CAPTURE(s);
    CHECK(cm.stage_layers(s) == (s == 0 || s == 11 ? 5 : 6));
    total += cm.stage_layers(s);
  }
  CHECK(total == 70);
  // Evenly divided: every stage the same.
  const CostModel even{.model = gpt175(), .cluster = flat_cluster(), .layout = Layout{.pp = 8, .virtual_stages = 3}};
  for (int s = 0; s < 24; ++s) CHECK(even.stage_layers(s) == 4);
}

TEST_CASE("Plan::predict: bad layouts fail with errors that name the numbers") {
  const Cluster c = flat_cluster();
  const ModelSpec m{.name = "small", .layers = 4, .hidden = 64, .heads = 4, .kv_heads = 0, .ffn = 0, .vocab = 100,
                    .seq = 32, .tied = true};
  CHECK_THROWS_WITH_AS(Plan::predict(m, c, Layout{.pp = 8, .microbatch_size = 1, .num_microbatches = 8}),
                       doctest::Contains("4 layers cannot fill 8 pipeline stages (pp 8 x virtual_stages 1)"), Error);
  // A pipeline of 10^6 stages is refused before its schedule is built (it was allocated:
  // std::bad_alloc), and a tp that does not divide the heads as the search refuses it.
  CHECK_THROWS_WITH_AS(Plan::predict(m, c, Layout{.pp = 1000000, .microbatch_size = 1, .num_microbatches = 1}),
                       doctest::Contains("4 layers cannot fill 1000000 pipeline stages"), Error);
  CHECK_THROWS_WITH_AS(Plan::predict(m, c, Layout{.tp = 3, .microbatch_size = 1, .num_microbatches = 1}),
                       doctest::Contains("tp 3 does not divide the heads"), Error);
  Layout il{.pp = 2, .virtual_stages = 2, .microbatch_size = 1, .num_microbatches = 3};
  il.schedule = PipelineSchedule::interleaved;
  CHECK_THROWS_WITH_AS(Plan::predict(m, c, il), doctest::Contains("num_microbatches % group = 3 % 2 = 1"), Error);
  Layout v_without{.pp = 2, .virtual_stages = 2, .microbatch_size = 1, .num_microbatches = 4};
  CHECK_THROWS_WITH_AS(Plan::predict(m, c, v_without), doctest::Contains("virtual_stages 2 needs the interleaved schedule"),
                       Error);
  Layout sp{.tp = 1};
  sp.sequence_parallel = true;
  CHECK_THROWS_WITH_AS(Plan::predict(m, c, sp), doctest::Contains("sequence parallelism needs tp > 1, got tp 1"), Error);
  CHECK_THROWS_WITH_AS(Plan::predict(m, c, Layout{.zero_stage = 4}), doctest::Contains("got 4"), Error);
  ModelSpec bad = m;
  bad.heads = 5;
  CHECK_THROWS_WITH_AS(Plan::predict(bad, c, Layout{}), doctest::Contains("heads 5 must divide hidden 64"), Error);
}

TEST_CASE("Cluster JSON: errors name the key and the value as written; unknown keys are refused") {
  const auto base = [] { return plan_test::flat_cluster_json(0.5); };
  CHECK_NOTHROW(Cluster::from_json(base()));
  nlohmann::json j = base();
  j["device_memory_gib"] = -80;  // was "device_memory must be > 0, got -8.58993e+10"
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("Cluster JSON: device_memory_gib must be > 0, got -80"), Error);
  j = base();
  j["peak_tflops"] = 0;
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("Cluster JSON: peak_tflops must be > 0, got 0"), Error);
  j = base();
  j["peak_tflops"] = "312";  // was "the top level.peak_tflops"
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("Cluster JSON: peak_tflops must be a number, got \"312\""), Error);
  j = base();
  j["intra_node"]["bandwidth_gbps"] = -1;
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("Cluster JSON: intra_node.bandwidth_gbps must be > 0, got -1"), Error);
  j = base();
  j["inter_node"]["latency_us"] = -2;
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("Cluster JSON: inter_node.latency_us must be >= 0, got -2"), Error);
  j = base();
  j["inter_node"].erase("latency_us");
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("Cluster JSON: no key 'inter_node.latency_us'"), Error);
  j = base();
  j["waiting_core_share"] = 1.5;
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("Cluster JSON: waiting_core_share must be <= 1, got 1.5"), Error);
  j = base();
  j["peak_tflop"] = 312;  // misspelt: refused, naming it (the model file refuses unknown keys too)
  CHECK_THROWS_WITH_AS(Cluster::from_json(j), doctest::Contains("Cluster JSON: unknown key 'peak_tflop' (the top level holds name, "),
                       Error);
  j = base();
  j["intra_node"]["bandwidth_gb"] = 1;
  CHECK_THROWS_WITH_AS(Cluster::from_json(j),
                       doctest::Contains("Cluster JSON: unknown key 'intra_node.bandwidth_gb' (intra_node holds bandwidth_gbps, latency_us)"), Error);
  j = base();
  j["calibration"] = {{"anything", 1}};  // calibrate's raw measurements: kept, not read
  CHECK_NOTHROW(Cluster::from_json(j));
}

TEST_CASE("ModelSpec and Layout: limits far above any real model keep the counts in range") {
  const Cluster c = flat_cluster();
  const ModelSpec ok{.name = "m", .layers = 4, .hidden = 64, .heads = 4, .kv_heads = 0, .ffn = 0, .vocab = 100,
                     .seq = 32, .tied = true};
  ModelSpec m = ok;
  m.layers = 2147483647;  // ran for minutes
  CHECK_THROWS_WITH_AS(m.validate(), doctest::Contains("layers 2147483647 is above the planner's limit 4096"), Error);
  m = ok;
  m.hidden = 2147483520;  // 24 heads: printed a negative parameter count
  m.heads = 24;
  CHECK_THROWS_WITH_AS(m.validate(), doctest::Contains("hidden 2147483520 is above the planner's limit 262144"), Error);
  m = ok;
  m.ffn = 2000000000;  // printed 0.0 TFLOP/s
  CHECK_THROWS_WITH_AS(m.validate(), doctest::Contains("ffn 2000000000 is above the planner's limit 1048576"), Error);
  m = ok;
  m.vocab = (1 << 24) + 1;
  CHECK_THROWS_WITH_AS(m.validate(), doctest::Contains("vocab 16777217 is above the planner's limit 16777216"), Error);
  m = ok;
  m.seq = (1 << 24) + 1;
  CHECK_THROWS_WITH_AS(m.validate(), doctest::Contains("seq 16777217 is above the planner's limit 16777216"), Error);
  // At the limits every figure is finite and positive (no overflow).
  const ModelSpec big{.name = "at the limits", .layers = ModelSpec::max_layers, .hidden = ModelSpec::max_hidden,
                      .heads = 128, .kv_heads = 0, .ffn = 0, .vocab = ModelSpec::max_vocab, .seq = 8192, .tied = true};
  const Plan p = Plan::predict(big, c, Layout{.tp = 8, .pp = 64, .microbatch_size = 1, .num_microbatches = 128,
                                              .recompute = Recompute::full});
  CHECK(big.parameters() > 3e15);
  CHECK(std::isfinite(p.time.total()));
  CHECK(p.time.total() > 0);
  CHECK(p.model_flops_per_device() > 0);
  CHECK(p.memory.total() > 0);
  // A GPT-4-scale guess passes: 120 layers, hidden 18432 (PaLM's), 128k vocabulary, seq 8192.
  const ModelSpec gpt4{.name = "GPT-4 scale", .layers = 120, .hidden = 18432, .heads = 96, .kv_heads = 8, .ffn = 73728,
                       .vocab = 128000, .seq = 8192, .tied = false};
  CHECK_NOTHROW(gpt4.validate());
  // The replay: pp x v x micro-batches above 2^20 is refused before any schedule is built.
  const ModelSpec deep{.name = "deep", .layers = 128, .hidden = 64, .heads = 4, .kv_heads = 0, .ffn = 0, .vocab = 100,
                       .seq = 32, .tied = true};
  CHECK_THROWS_WITH_AS(Plan::predict(deep, c, Layout{.pp = 64, .microbatch_size = 1, .num_microbatches = 131072}),
                       doctest::Contains("pp 64 x virtual_stages 1 x 131072 micro-batches = 8388608 schedule units to "
                                         "replay, above the planner's limit 1048576"),
                       Error);
  CHECK_NOTHROW(Plan::predict(deep, c, Layout{.pp = 64, .microbatch_size = 1, .num_microbatches = 16384}));  // 2^20
  // The search rejects such layouts with the reason, and calls on_predicted for the others.
  std::size_t calls = 0, last = 0;
  SearchOptions o{.world = 64, .global_batch = 32768, .microbatch_sizes = {1, 8}, .virtual_stages = {1},
                  .recompute = {Recompute::full}, .zero_stages = {0}, .zero_bubble = false, .pp_sizes = {64},
                  .on_predicted = [&](const Layout&, std::size_t n) { ++calls; last = n; }};
  const SearchResult r = search(deep, c, o);
  bool refused = false;
  for (const Rejected& x : r.rejected)
    refused = refused || x.reason == "pp 64 x v 1 x 32768 micro-batches = 2097152 schedule units, above the planner's "
                                     "limit 1048576";
  CHECK(refused);
  CHECK(calls == 1);  // mbs 8: 4096 micro-batches
  CHECK(last == 1);
}

TEST_CASE("search: odd world sizes 3 and 7 give only layouts of that many devices, the rest rejected with reasons") {
  const Cluster c = flat_cluster();
  const ModelSpec m{.name = "small", .layers = 21, .hidden = 512, .heads = 8, .kv_heads = 0, .ffn = 0, .vocab = 1000,
                    .seq = 256, .tied = true};
  for (int world : {3, 7}) {
    CAPTURE(world);
    const SearchResult r = search(m, c, SearchOptions{.world = world, .global_batch = 4 * world});
    REQUIRE(!r.ranked.empty());
    for (const Plan& p : r.ranked) {
      CHECK(p.layout.world() == world);
      CHECK(p.layout.global_batch() == 4 * world);
      CHECK(p.layout.tp == 1);  // 3 and 7 are not powers of two: tp stays 1
    }
    for (const Rejected& x : r.rejected) CHECK(!x.reason.empty());
  }
}

TEST_CASE("Plan: the predicted timeline holds every F and B once and both sides of every send; its SVG one box per F and B") {
  const ModelSpec m{.name = "small", .layers = 16, .hidden = 1024, .heads = 16, .kv_heads = 0, .ffn = 0, .vocab = 32000,
                    .seq = 1024, .tied = true};
  Layout l{.dp = 2, .tp = 2, .pp = 4, .virtual_stages = 2, .microbatch_size = 1, .num_microbatches = 8};
  l.schedule = PipelineSchedule::interleaved;
  const Plan p = Plan::predict(m, flat_cluster(), l);
  const schedule::Timeline& t = p.time.timeline;
  const int S = 8, mb = 8;
  long long computes = 0, transfers = 0;
  for (const schedule::TimelineEvent& e : t.events) (e.action.is_compute() ? computes : transfers) += 1;
  CHECK(computes == 2LL * S * mb);
  CHECK(transfers == 2 * p.time.p2p_messages);  // a SEND and its RECV
  const std::string svg = schedule::to_svg(t);
  std::size_t boxes = 0;
  for (std::size_t at = svg.find("<rect class=\"F\""); at != std::string::npos; at = svg.find("<rect class=\"F\"", at + 1))
    ++boxes;
  CHECK(boxes == static_cast<std::size_t>(S * mb));
}

TEST_CASE("Calibration: the link fit recovers the latency and bandwidth the samples were made with, per collective") {
  // Samples written from the planner's own formulas with chosen constants: the fit must give
  // them back (exactly up to round-off: the model is linear in bytes).
  const double L = 7e-6, B = 3.5e9;
  for (int n : {2, 3, 4, 8}) {
    Calibration cal;
    for (double bytes : {16e3, 128e3, 1e6, 8e6}) {
      const double r = n;
      cal.comm.push_back({.collective = "all_reduce", .ranks = n, .bytes = bytes,
                          .seconds = 2 * (r - 1) * L + 2 * (r - 1) / r * bytes / B});
      cal.comm.push_back({.collective = "all_gather", .ranks = n, .bytes = bytes,
                          .seconds = (r - 1) * L + (r - 1) / r * bytes / B});
      cal.comm.push_back({.collective = "send_recv", .ranks = n, .bytes = bytes, .seconds = L + bytes / B});
    }
    for (const char* c : {"all_reduce", "all_gather", "send_recv"}) {
      CAPTURE(n);
      CAPTURE(c);
      const LinkFit f = cal.fit(c, n);
      CHECK(rel(f.latency, L) < 1e-6);
      CHECK(rel(f.bandwidth, B) < 1e-9);
    }
    CHECK_THROWS_WITH_AS(cal.fit("reduce_scatter", n), doctest::Contains("reduce_scatter"), Error);
  }
  CHECK_THROWS_WITH_AS(Calibration{}.fit("all_reduce", 1), doctest::Contains("all_reduce at 1 rank moves nothing"), Error);
}

TEST_CASE("Calibration: the GEMM curve is each shape's rate over the fastest, sorted by flops; its cluster file loads") {
  Calibration cal{.backend = "threads", .cores = 2};
  // Three shapes at 50, 100 and 25 GFLOP/s (the middle one the peak); two of equal flops merge.
  cal.gemms.push_back({.name = "a", .m = 100, .n = 100, .k = 100, .seconds = 2e6 / 50e9});
  cal.gemms.push_back({.name = "b", .m = 200, .n = 200, .k = 200, .seconds = 16e6 / 100e9});
  cal.gemms.push_back({.name = "c", .m = 200, .n = 100, .k = 400, .seconds = 16e6 / 25e9});
  cal.gemms.push_back({.name = "d", .m = 10, .n = 10, .k = 10, .seconds = 2e3 / 25e9});
  cal.elementwise_bandwidth = 6e9;
  for (double bytes : {1e4, 1e6}) cal.comm.push_back({.collective = "all_reduce", .ranks = 2, .bytes = bytes,
                                                      .seconds = 2e-6 + bytes / 4e9});
  CHECK(rel(cal.peak_flops(), 100e9) < 1e-12);
  const GemmEfficiency curve = cal.gemm_efficiency();
  REQUIRE(curve.points.size() == 3);
  CHECK(rel(curve.points[0].first, 2e3) < 1e-12);
  CHECK(rel(curve.points[0].second, 0.25) < 1e-12);
  CHECK(rel(curve.points[1].second, 0.5) < 1e-12);
  // b and c: 32 MFLOP in 0.16 + 0.64 ms = 40 GFLOP/s, 0.4 of the peak.
  CHECK(rel(curve.points[2].first, 16e6) < 1e-12);
  CHECK(rel(curve.points[2].second, 0.4) < 1e-12);
  const Cluster c = Cluster::from_json(cal.to_cluster_json("this machine", 8, 4.0, 2));
  CHECK(c.devices_per_node == 8);
  CHECK(c.cores_per_node == 2);
  CHECK(rel(c.peak_flops, 100e9) < 1e-12);
  CHECK(rel(c.memory_bandwidth, 6e9) < 1e-12);
  CHECK(rel(c.intra_node_bandwidth, 4e9) < 1e-9);
  CHECK(rel(c.intra_node_latency, 1e-6) < 1e-6);  // 2 us over the 2 (n-1) = 2 steps of a ring
  CHECK(rel(c.gemm_efficiency.at(16e6), 0.4) < 1e-12);
}

TEST_CASE("TimeEstimate: with more ranks than cores_per_node the step lasts max(the replay, the node's work / cores)") {
  Cluster shared = flat_cluster();
  shared.cores_per_node = 2;
  const ModelSpec m{.name = "small", .layers = 6, .hidden = 192, .heads = 6, .kv_heads = 0, .ffn = 0, .vocab = 256,
                    .seq = 128, .tied = true};
  // Data parallelism alone: every rank has the same work and no bubble, so the step is
  // max(1, ranks on the node / cores) times the uncontended one (a node holds at most 8).
  for (int world : {1, 2, 4, 8, 16}) {
    CAPTURE(world);
    const Layout l{.dp = world, .microbatch_size = 2, .num_microbatches = 16 / std::min(world, 16)};
    const double alone = Plan::predict(m, flat_cluster(), l).time.total();
    const TimeEstimate crowded = Plan::predict(m, shared, l).time;
    CHECK(rel(crowded.total(), std::max(1.0, std::min(world, 8) / 2.0) * alone) < 1e-9);
    CHECK(rel(crowded.contention, crowded.total() - alone) < 1e-9);
  }
  // A pipeline of 4 on one core: the bubble is given to the other ranks, so the step is the
  // sum of the four ranks' busy times, written out here from CostModel's pieces. (Free links:
  // the processor-sharing replay counts a hand-off during which no rank computes as time,
  // which the sum of busy times does not have.)
  shared.cores_per_node = 1;
  shared.intra_node_latency = shared.inter_node_latency = 0;
  shared.intra_node_bandwidth = shared.inter_node_bandwidth = 1e30;
  Cluster flat_free = flat_cluster();
  flat_free.intra_node_latency = flat_free.inter_node_latency = 0;
  flat_free.intra_node_bandwidth = flat_free.inter_node_bandwidth = 1e30;
  const Layout pipe{.pp = 4, .microbatch_size = 2, .num_microbatches = 8};
  const CostModel cm{.model = m, .cluster = shared, .layout = pipe, .precision = {}};
  double work = 0;
  for (int r = 0; r < 4; ++r)
    work += 8 * (cm.stage_forward(r).total() + cm.stage_backward(r).total()) + cm.optimizer_seconds(r) +
            (r == 0 || r == 3 ? cm.tied_embedding_seconds() : 0.0);
  const TimeEstimate piped = Plan::predict(m, shared, pipe).time;
  CHECK(rel(piped.total(), work) < 1e-9);
  CHECK(piped.contention > 0);
  // Ranks that poll while they wait (waiting_core_share 1, Open MPI) keep their core through
  // the bubble: the four ranks' work is then 4 whole steps of the replay.
  shared.waiting_core_share = 1;
  const double replay = Plan::predict(m, flat_free, pipe).time.total();
  CHECK(rel(Plan::predict(m, shared, pipe).time.total(), 4 * replay) < 1e-9);
  shared.waiting_core_share = 0;
  // With 4 cores for the 4 ranks nothing waits: the replay alone, bubble included.
  shared.cores_per_node = 4;
  const TimeEstimate roomy = Plan::predict(m, shared, pipe).time;
  CHECK(roomy.contention == 0);
  CHECK(rel(roomy.total(), Plan::predict(m, flat_free, pipe).time.total()) < 1e-12);
  CHECK(roomy.bubble > 0);
  // An effective count below the hardware's (another program's load): 2 ranks on 1.5 cores.
  shared.cores_per_node = 1.5;
  const Layout two{.dp = 2, .microbatch_size = 2, .num_microbatches = 8};
  CHECK(rel(Plan::predict(m, shared, two).time.total(), 2 / 1.5 * Plan::predict(m, flat_free, two).time.total()) < 1e-9);
  // The same pipeline of 4 on 2 cores: Brent's bound is half the work, but while 3 or 4 ranks
  // compute at once each runs at 2/3 or 1/2 speed on the critical path, so the
  // processor-sharing replay is longer than both the bound and the uncontended replay.
  shared.cores_per_node = 2;
  const TimeEstimate two_cores = Plan::predict(m, shared, pipe).time;
  CHECK(two_cores.total() > 1.01 * work / 2);
  CHECK(two_cores.total() > 1.01 * Plan::predict(m, flat_free, pipe).time.total());
  CHECK(two_cores.total() < work);  // and shorter than one core's
  shared.waiting_core_share = 1.5;
  CHECK_THROWS_WITH_AS(shared.validate(), doctest::Contains("waiting_core_share must lie in [0, 1]"), Error);
  shared.waiting_core_share = 0;
  shared.cores_per_node = -1;
  CHECK_THROWS_WITH_AS(shared.validate(), doctest::Contains("cores_per_node must be >= 0"), Error);
}

TEST_CASE("Effective cores per rank count: the file's [ranks, cores] pairs, interpolated, set the contention of that many ranks") {
  // calibrate measures the cores with 2, 4 and 8 ranks at once; a layout of N ranks on the node
  // is bounded by its work over the cores measured at N (linear between measured counts).
  Calibration cal{.backend = "threads", .cores = 1.9};
  cal.gemms.push_back({.name = "a", .m = 100, .n = 100, .k = 100, .seconds = 2e6 / 50e9});
  cal.elementwise_bandwidth = 6e9;
  for (double bytes : {1e4, 1e6}) cal.comm.push_back({.collective = "all_reduce", .ranks = 2, .bytes = bytes,
                                                      .seconds = 2e-6 + bytes / 4e9});
  cal.record_cores(8, 1.5);
  cal.record_cores(2, 1.9);
  cal.record_cores(4, 1.7);
  cal.record_cores(4, 1.6);  // a repeated count replaces its entry
  Cluster shared = Cluster::from_json(cal.to_cluster_json("this machine", 8, 4.0, 2));
  REQUIRE(shared.cores_at_ranks.size() == 3);
  CHECK(shared.cores_at_ranks[1] == std::pair<int, double>{4, 1.6});
  CHECK(shared.cores_for(1) == 1.9);
  CHECK(shared.cores_for(2) == 1.9);
  CHECK(shared.cores_for(4) == 1.6);
  CHECK(rel(shared.cores_for(6), 1.55) < 1e-12);
  CHECK(shared.cores_for(16) == 1.5);
  // dp-only layouts: every rank the same work, no bubble: the step is ranks / cores(ranks)
  // times the uncontended one.
  Cluster flat = shared;
  flat.cores_per_node = 0;
  flat.cores_at_ranks.clear();
  const ModelSpec m{.name = "small", .layers = 6, .hidden = 192, .heads = 6, .kv_heads = 0, .ffn = 0, .vocab = 256,
                    .seq = 128, .tied = true, .dropout = false, .tessera_block = true};
  // (Plain variables, not a structured binding: clang++ 14 cannot capture those in CAPTURE's lambda.)
  for (const std::pair<int, double>& wc : std::vector<std::pair<int, double>>{{2, 1.9}, {4, 1.6}, {8, 1.5}}) {
    const int world = wc.first;
    const double cores = wc.second;
    CAPTURE(world);
    const Layout l{.dp = world, .microbatch_size = 2, .num_microbatches = 16 / world};
    const double alone = Plan::predict(m, flat, l).time.total();
    CHECK(rel(Plan::predict(m, shared, l).time.total(), world / cores * alone) < 1e-9);
  }
  // Entries out of order are refused, naming the entry.
  shared.cores_at_ranks = {{4, 1.6}, {2, 1.9}};
  CHECK_THROWS_WITH_AS(shared.validate(), doctest::Contains("cores_per_node_at_ranks entry 1 is (2, 1.9)"), Error);
  // A real measurement with a block of this model: 1 thread is 1 core (within timing noise),
  // and the count is recorded.
  Calibration real;
  const ModelSpec tiny{.name = "tiny", .layers = 1, .hidden = 32, .heads = 2, .vocab = 64, .seq = 16, .dropout = false,
                       .tessera_block = true};
  const double one = real.measure_cores(tiny, 1, 3);
  CHECK(one == doctest::Approx(1.0).epsilon(0.35));
  REQUIRE(real.cores_at_ranks.size() == 1);
  CHECK(real.cores_at_ranks[0].first == 1);
}

TEST_CASE("ZB-H1: I + W is the fused backward, W is the four linears' dW GEMMs, and the replay's bubble is zero_bubble_h1_bubble_ratio") {
  // Uniform stages as above (no embedding cost, a head of 8 tokens' vocabulary); the replay of
  // schedule::ZeroBubbleH1 with the planner's own t_F, t_I, t_W has Qi et al.'s bubble
  // (p-1)(t_F + t_I - t_W) / (m (t_F + t_I + t_W)), from schedule/bubble.hpp.
  Cluster c = flat_cluster();
  c.memory_bandwidth = 1e30;
  const ModelSpec m{.name = "uniform", .layers = 24, .hidden = 4096, .heads = 32, .kv_heads = 0, .ffn = 0,
                    .vocab = 8, .seq = 2048, .tied = true};
  for (Recompute rc : {Recompute::none, Recompute::selective, Recompute::full})
    for (int p : {2, 4, 8})
      for (int mb : {p, 2 * p, 3 * p}) {
        CAPTURE(to_string(rc));
        CAPTURE(p);
        CAPTURE(mb);
        Layout l{.dp = 1, .tp = 1, .pp = p, .virtual_stages = 1, .microbatch_size = 1, .num_microbatches = mb};
        l.schedule = PipelineSchedule::zero_bubble_h1;
        l.recompute = rc;
        const CostModel cm{.model = m, .cluster = c, .layout = l, .precision = {}};
        // W: one GEMM of each linear's forward shape, 2 b s h (h + 2h + h + 4h + 4h) = 24 b s h^2 flops at 0.5 of peak.
        const double w_layer = 24.0 * 2048 * 4096 * 4096 / (312e12 * 0.5);
        CHECK(cm.layer_backward_weight().total() == doctest::Approx(w_layer).epsilon(1e-9));
        for (int s = 0; s < p; ++s) {
          CHECK(cm.stage_backward_input(s).total() + cm.stage_backward_weight(s).total() ==
                doctest::Approx(cm.stage_backward(s).total()).epsilon(1e-12));
          CHECK(cm.stage_backward_input(s).tp_comm == cm.stage_backward(s).tp_comm);
        }
        const Plan plan = Plan::predict(m, c, l);
        const double tf = cm.stage_forward(1).total(), ti = cm.stage_backward_input(1).total(),
                     tw = cm.stage_backward_weight(1).total();
        CHECK(plan.time.bubble_ratio == doctest::Approx(schedule::zero_bubble_h1_bubble_ratio(p, mb, tf, ti, tw)).epsilon(1e-3));
        // Every I and W of the replay lasts the CostModel's time for it.
        int splits = 0;
        for (const schedule::TimelineEvent& e : plan.time.timeline.events) {
          if (e.action.kind == schedule::ActionKind::backward_input) {
            CHECK(e.end - e.start == doctest::Approx(cm.stage_backward_input(e.action.stage_index).total()).epsilon(1e-9));
            ++splits;
          }
          if (e.action.kind == schedule::ActionKind::backward_weight)
            CHECK(e.end - e.start == doctest::Approx(cm.stage_backward_weight(e.action.stage_index).total()).epsilon(1e-9));
        }
        CHECK(splits == p * mb);
        // A third of 1F1B's bubble or less, and a shorter step.
        Layout one = l;
        one.schedule = PipelineSchedule::one_f_one_b;
        const Plan p1 = Plan::predict(m, c, one);
        CHECK(plan.time.bubble < p1.time.bubble);
        CHECK(plan.time.total() < p1.time.total());
        CHECK(plan.time.compute + plan.time.tp_comm == doctest::Approx(p1.time.compute + p1.time.tp_comm).epsilon(1e-9));
      }
}

TEST_CASE("ZB-H1 memory: rank 0 keeps 1F1B's p micro-batches; the last rank keeps each deferred W's x and dy (16 s b h per block)") {
  const Cluster c = flat_cluster();
  const ModelSpec m{.name = "1.3B", .layers = 24, .hidden = 2048, .heads = 16, .kv_heads = 0, .ffn = 0,
                    .vocab = 51200, .seq = 2048, .tied = true};
  const double s = 2048, h = 2048, b = 2;
  for (int p : {2, 4, 8}) {
    CAPTURE(p);
    Layout l{.dp = 1, .tp = 1, .pp = p, .microbatch_size = 2, .num_microbatches = 2 * p};
    l.schedule = PipelineSchedule::zero_bubble_h1;
    // Without recomputation a block's I-to-W bytes (16 s b h, 16-bit) are below its F-to-I bytes.
    const double wpass = LayerActivations::weight_pass(m, l).bytes();
    CHECK(wpass == doctest::Approx(2.0 * 16 * s * b * h));
    const double kept = LayerActivations::of(m, l).bytes();
    const CostModel cm{.model = m, .cluster = c, .layout = l, .precision = {}};
    const schedule::Schedule zb = l.build_schedule();
    Layout one = l;
    one.schedule = PipelineSchedule::one_f_one_b;
    const double layers = 24.0 / p;
    CHECK(MemoryEstimate::of_rank(cm, zb, 0).activations == doctest::Approx(p * layers * kept));
    CHECK(MemoryEstimate::of_rank(cm, zb, 0).activations ==
          doctest::Approx(MemoryEstimate::of_rank(CostModel{.model = m, .cluster = c, .layout = one, .precision = {}},
                                                  one.build_schedule(), 0)
                              .activations));
    // Full recomputation: F keeps s b h per block, I leaves the weight pass; the last rank defers
    // p - 1 W's, so after its p-th I it holds p weight passes (its blocks' and the LM head's x and
    // dlogits, s b (h + V) each).
    Layout full = l;
    full.recompute = Recompute::full;
    const CostModel cf{.model = m, .cluster = c, .layout = full, .precision = {}};
    const double head = 2.0 * s * b * (h + 51200);
    CHECK(MemoryEstimate::of_rank(cf, full.build_schedule(), p - 1).activations ==
          doctest::Approx(p * (layers * wpass + head)));
  }
}

TEST_CASE("search offers ZB-H1 for pipelines (v = 1), and ranks it above 1F1B when the bubble matters") {
  const Cluster c = flat_cluster();
  const ModelSpec m{.name = "6.7B", .layers = 32, .hidden = 4096, .heads = 32, .kv_heads = 0, .ffn = 0,
                    .vocab = 51200, .seq = 2048, .tied = true};
  SearchOptions o{.world = 8, .global_batch = 16};
  o.tp_sizes = {1};
  o.pp_sizes = {4};
  o.recompute = {Recompute::full};
  o.virtual_stages = {1};
  const SearchResult r = search(m, c, o);
  REQUIRE(!r.ranked.empty());
  int zb = 0, one = 0;
  for (const Plan& p : r.ranked) {
    zb += p.layout.schedule == PipelineSchedule::zero_bubble_h1;
    one += p.layout.schedule == PipelineSchedule::one_f_one_b;
  }
  CHECK(zb > 0);
  CHECK(zb == one);  // every 1F1B layout has its ZB-H1 twin
  CHECK(r.ranked.front().layout.schedule == PipelineSchedule::zero_bubble_h1);
  CHECK(r.ranked.front().layout.to_string().find("ZB-H1") != std::string::npos);
  o.zero_bubble = false;
  for (const Plan& p : search(m, c, o).ranked) CHECK(p.layout.schedule != PipelineSchedule::zero_bubble_h1);
  // No ZB-H1 without a pipeline.
  o.zero_bubble = true;
  o.pp_sizes = {1};
  for (const Plan& p : search(m, c, o).ranked) CHECK(p.layout.schedule == PipelineSchedule::one_f_one_b);
}

TEST_CASE("tessera's block: the predicted activation bytes are nn::block_activation_bytes in every recomputation mode") {
  // train_gpt's model as the planner sees it (fp32, tessera_block): one block's contexts equal
  // the library's own count (Korthikanti et al.'s carried to nn::Block) for none and selective;
  // under full recomputation a block keeps nothing and the stage its input (s b h fp32 values),
  // and the whole stage's contexts are rebuilt at once for one micro-batch.
  const Cluster c = flat_cluster();
  const Precision fp32 = Precision::float32_adamw();
  // (Plain variables, not a structured binding: clang++ 14 cannot capture those in CAPTURE's lambda.)
  for (const std::tuple<int, int, int>& shape : std::vector<std::tuple<int, int, int>>{{192, 6, 128}, {64, 4, 32}, {128, 2, 64}})
    for (int b : {1, 2, 8}) {
      const int h = std::get<0>(shape), a = std::get<1>(shape), s = std::get<2>(shape);
      const ModelSpec m{.name = "train_gpt", .layers = 6, .hidden = h, .heads = a, .kv_heads = 0, .ffn = 0, .vocab = 256,
                        .seq = s, .tied = true, .dropout = false, .tessera_block = true};
      for (Recompute rc : {Recompute::none, Recompute::selective, Recompute::full}) {
        CAPTURE(h);
        CAPTURE(b);
        CAPTURE(to_string(rc));
        const nn::Recompute nrc = rc == Recompute::none        ? nn::Recompute::none
                                  : rc == Recompute::selective ? nn::Recompute::selective
                                                               : nn::Recompute::full;
        Layout l{.dp = 1, .tp = 1, .pp = 1, .microbatch_size = b, .num_microbatches = 3};
        l.recompute = rc;
        const double block = static_cast<double>(nn::block_activation_bytes(b, s, h, a, nrc));
        CHECK(LayerActivations::of(m, l, fp32).bytes() == block);
        const double input = rc == Recompute::full ? 4.0 * b * s * h : 0.0;
        CHECK(LayerActivations::stage_input_bytes(m, l, fp32) == input);
        // One stage of 6 blocks, micro-batches one at a time: the peak is one micro-batch's.
        const Plan p = Plan::predict(m, c, l, fp32);
        CHECK(p.memory.activations == doctest::Approx(6 * block + input));
        // 2 stages under 1F1B: rank 0 holds 2 micro-batches of its 3 blocks.
        Layout l2 = l;
        l2.pp = 2;
        const Plan p2 = Plan::predict(m, c, l2, fp32);
        CHECK(MemoryEstimate::of_rank(CostModel{.model = m, .cluster = c, .layout = l2, .precision = fp32},
                                      l2.build_schedule(), 0)
                  .activations == doctest::Approx(2 * (3 * block + input)));
        // Full: the working set of the rerun stage, 6 blocks' contexts without recomputation.
        if (rc == Recompute::full) {
          Layout none = l;
          none.recompute = Recompute::none;
          const Plan pn = Plan::predict(m, c, none, fp32);
          CHECK(p.memory.buffers - pn.memory.buffers ==
                doctest::Approx(6.0 * static_cast<double>(nn::block_activation_bytes(b, s, h, a, nn::Recompute::none))));
        }
      }
    }
}

TEST_CASE("Recomputation in the time estimate: full adds a forward per block, selective the attention core; the search offers both") {
  const Cluster c = flat_cluster();
  const ModelSpec m{.name = "train_gpt", .layers = 6, .hidden = 192, .heads = 6, .kv_heads = 0, .ffn = 0, .vocab = 256,
                    .seq = 128, .tied = true, .dropout = false, .tessera_block = true};
  Layout l{.dp = 1, .tp = 1, .pp = 1, .microbatch_size = 4, .num_microbatches = 2};
  auto with = [&](Recompute rc) {
    Layout x = l;
    x.recompute = rc;
    return CostModel{.model = m, .cluster = c, .layout = x, .precision = Precision::float32_adamw()};
  };
  const CostModel none = with(Recompute::none), sel = with(Recompute::selective), full = with(Recompute::full);
  CHECK(full.layer_backward().total() == doctest::Approx(none.layer_backward().total() + none.layer_forward().total()));
  // Selective: the two attention GEMMs (b a of 2 s^2 d_head each, at 0.5 of peak) and the
  // probabilities written and read once (4-byte values, no dropout mask) at memory bandwidth.
  const double core = 2.0 * 4 * 6 * 2 * 128.0 * 128 * 32 / (312e12 * 0.5) + 2.0 * 4 * 6 * 128 * 128 * 4 / 2039e9;
  CHECK(sel.layer_backward().total() == doctest::Approx(none.layer_backward().total() + core));
  SearchOptions o{.world = 2, .global_batch = 8};
  o.tp_sizes = {1};
  int seen[3] = {0, 0, 0};
  for (const Plan& p : search(m, c, o, Precision::float32_adamw()).ranked) ++seen[static_cast<int>(p.layout.recompute)];
  CHECK(seen[0] > 0);
  CHECK(seen[1] == seen[0]);
  CHECK(seen[2] == seen[0]);
}

TEST_CASE("tessera's block: the element-wise work charged is the inputs of nn::Block's LayerNorms, softmax and GELU") {
  // CostModel charges tessera's block 2 x 4 bytes per element of each element-wise kernel's
  // input in forward (twice that in backward), the unit calibrate measures the kernels in. The
  // elements are counted here on a real nn::Block forward: each LayerNorm's x-hat, the core
  // attention's probabilities (B H T T) and the GELU's saved input.
  const Cluster c = flat_cluster();
  const Precision fp32 = Precision::float32_adamw();
  for (const std::tuple<int, int, int>& shape : std::vector<std::tuple<int, int, int>>{{192, 6, 128}, {64, 4, 32}, {48, 2, 16}})
    for (int b : {1, 3}) {
      const int h = std::get<0>(shape), a = std::get<1>(shape), s = std::get<2>(shape);
      CAPTURE(h);
      CAPTURE(b);
      nn::Block<float> block(h, a);
      Tensor<float> x = Tensor<float>::empty(Shape{b, s, h});
      for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = 0.01f * static_cast<float>(i % 89) - 0.4f;
      const auto r = block.forward(x);
      const double ln1 = static_cast<double>(r.ctx.ln_1.xhat.numel()), ln2 = static_cast<double>(r.ctx.ln_2.xhat.numel());
      const double softmax = static_cast<double>(r.ctx.attn.core.probs.numel());
      const double gelu = static_cast<double>(r.ctx.mlp.act.x.numel());
      const ModelSpec m{.name = "train_gpt", .layers = 6, .hidden = h, .heads = a, .kv_heads = 0, .ffn = 0, .vocab = 256,
                        .seq = s, .tied = true, .dropout = false, .tessera_block = true};
      const Layout l{.dp = 1, .tp = 1, .pp = 1, .microbatch_size = b, .num_microbatches = 1};
      const CostModel cm{.model = m, .cluster = c, .layout = l, .precision = fp32};
      const std::vector<CostModel::ElementwisePass> passes = cm.layer_elementwise_passes();
      REQUIRE(passes.size() == 4);
      CHECK(passes[0].elements == ln1);
      CHECK(passes[1].elements == softmax);
      CHECK(passes[2].elements == ln2);
      CHECK(passes[3].elements == gelu);
      CHECK(cm.layer_memory_bytes() == 2.0 * 4 * (ln1 + softmax + ln2 + gelu));
      // The forward's time: the GEMMs plus those bytes at the memory bandwidth; backward twice.
      double gemms = 0;
      for (const Gemm& g : cm.layer_gemms()) gemms += g.batch * cm.gemm_seconds(g.flops);
      CHECK(cm.layer_forward().compute == doctest::Approx(gemms + 8 * (ln1 + softmax + ln2 + gelu) / c.memory_bandwidth));
      CHECK(cm.layer_backward().compute == doctest::Approx(2 * cm.layer_forward().compute));
      // A tp rank holds a / t heads and ffn / t of the MLP; the LayerNorms run on the whole
      // width unless sequence parallelism splits the tokens.
      Layout l2 = l;
      l2.tp = 2;
      const std::vector<CostModel::ElementwisePass> tp2 = CostModel{.model = m, .cluster = c, .layout = l2, .precision = fp32}.layer_elementwise_passes();
      CHECK(tp2[0].elements == ln1);
      CHECK(tp2[1].elements == softmax / 2);
      CHECK(tp2[3].elements == gelu / 2);
      l2.sequence_parallel = true;
      CHECK(CostModel{.model = m, .cluster = c, .layout = l2, .precision = fp32}.layer_elementwise_passes()[2].elements == ln2 / 2);
    }
  // Other blocks keep Korthikanti et al.'s charge: twice the kept bytes without recomputation.
  const ModelSpec g = gpt175();
  const Layout lg{.dp = 1, .tp = 8, .pp = 1, .microbatch_size = 1, .num_microbatches = 1};
  const CostModel cg{.model = g, .cluster = c, .layout = lg, .precision = Precision{}};
  CHECK(cg.layer_elementwise_passes().empty());
  CHECK(cg.layer_memory_bytes() == 2 * LayerActivations::of(g, lg, Precision{}).bytes());
}

TEST_CASE("Calibration: a waiting rank's share of a core, from the computing ranks' slowdown, inverts TimeEstimate's contention bound") {
  // 4 ranks on 1.8 cores, 2 of them computing work of `alone` seconds each: asleep, the others
  // leave the cores to them (2 alone / 1.8); waiting with share w they add w x 2 x T to the
  // node's work: T = 2 alone / (1.8 - 2 w). The measurement recovers w.
  const double alone = 0.1, cores = 1.8;
  const double sleeping = 2 * alone / cores;
  for (double w : {0.0, 0.2, 0.45, 0.8}) {
    CAPTURE(w);
    const double waiting = 2 * alone / (cores - 2 * w);
    CHECK(rel(Calibration::waiting_share_from_slowdown(4, 2, cores, sleeping, waiting) + 1e-3, w + 1e-3) < 1e-9);
  }
  // Faster while they wait (noise) is no share; a slowdown beyond a whole core each is one.
  CHECK(Calibration::waiting_share_from_slowdown(4, 2, cores, sleeping, 0.9 * sleeping) == 0.0);
  CHECK(Calibration::waiting_share_from_slowdown(4, 2, 4.0, sleeping, 50 * sleeping) == 1.0);
  CHECK_THROWS_WITH_AS(Calibration::waiting_share_from_slowdown(4, 4, cores, sleeping, sleeping),
                       doctest::Contains("working 4 of 4 ranks"), Error);
  // The share sets how much of a pipeline's bubble the waiting ranks take from the others: a
  // yielding rank (0.2) costs less than a polling one (1) and more than a blocking one (0).
  const ModelSpec m{.name = "small", .layers = 6, .hidden = 192, .heads = 6, .kv_heads = 0, .ffn = 0, .vocab = 256,
                    .seq = 128, .tied = true, .dropout = false, .tessera_block = true};
  Cluster shared = flat_cluster();
  shared.cores_per_node = 2;
  const Layout pipe{.pp = 4, .microbatch_size = 8, .num_microbatches = 4};
  double last = 0;
  for (double w : {0.0, 0.2, 1.0}) {
    shared.waiting_core_share = w;
    const double t = Plan::predict(m, shared, pipe, Precision::float32_adamw()).time.total();
    CHECK(t > last);
    last = t;
  }
}

TEST_CASE("ZeRO-3 in the planner: 16 Psi / N plus the gathered unit; per step 2 all-gathers and 1 reduce-scatter of every bucket per micro-batch (1.5 x an all-reduce at m = 1)") {
  const ModelSpec m{.name = "1.3B", .layers = 24, .hidden = 2048, .heads = 16, .kv_heads = 0, .ffn = 0,
                    .vocab = 50304, .seq = 1024, .tied = true};
  Cluster c = flat_cluster();
  c.intra_node_latency = c.inter_node_latency = 0;
  const int n = 8;
  const Plan z2 = Plan::predict(m, c, Layout{.dp = n, .microbatch_size = 1, .num_microbatches = 1, .zero_stage = 2});
  for (int unit : {1, 4, 0}) {
    CAPTURE(unit);
    const Layout l{.dp = n, .microbatch_size = 1, .num_microbatches = 1, .zero_stage = 3, .zero3_unit_layers = unit};
    const CostModel cm{.model = m, .cluster = c, .layout = l};
    const Plan z3 = Plan::predict(m, c, l);
    // The units: runs of `unit` of the stage's 26 layers (the embedding, 24 blocks, the head),
    // a whole stage for 0; every parameter in exactly one.
    const auto units = cm.zero3_units(0);
    CHECK(units.size() == static_cast<std::size_t>(unit == 0 ? 1 : (26 + unit - 1) / unit));
    double params = 0, largest = 0;
    for (const auto& u : cm.zero3_buckets(0)) largest = std::max(largest, static_cast<double>(u.padded_elements()));
    for (const auto& u : units)
      for (const BucketLayout::Param& p : u) params += static_cast<double>(p.numel);
    CHECK(params == m.parameters());
    // Memory: the 16 Psi / N of model state, plus the gathered unit (and its prefetched
    // neighbour when there are two or more) and the unit's gradient buckets.
    CHECK(rel(z3.memory.parameters + z3.memory.gradients + z3.memory.optimizer_state, 16 * m.parameters() / n) < 1e-12);
    const double gathered = largest * (units.size() >= 2 ? 2 : 1) * 2 + largest * 2;
    CHECK(rel(z3.memory.buffers - z2.memory.buffers, gathered) < 1e-12);
    // Time: per micro-batch each bucket is gathered before the forward and the backward and
    // reduce-scattered once: (N-1)/N of 3 x 2 bytes per element at the dp bandwidth, 1.5 times
    // ZeRO-2's all-reduce of the same bytes (Rajbhandari et al. 2020, sec. 7.2.2) up to the
    // buckets' padding; charged inside F and B, so none after the flush.
    const CostModel::Zero3Traffic t = cm.zero3_traffic(0);
    CHECK(t.all_gathers == 2 * t.reduce_scatters);
    CHECK(t.reduce_scatter_elements >= m.parameters());
    CHECK(t.reduce_scatter_elements < m.parameters() + n * static_cast<double>(t.reduce_scatters));
    CHECK(cm.dp_reduce_seconds(0) == 0.0);
    const double expect = (n - 1.0) / n * (t.all_gather_elements + t.reduce_scatter_elements) * 2 / cm.dp_bandwidth();
    CHECK(rel(z3.time.dp_comm_exposed, expect) < 1e-9);
    CHECK(rel(z3.time.dp_comm_exposed, 1.5 * z2.time.dp_comm_exposed) < 1e-4);
    CHECK(z3.layout.to_string().find(unit == 0 ? "ZeRO-3 (unit: a stage)" : "ZeRO-3 (unit: ") != std::string::npos);
  }
  // m micro-batches gather and reduce-scatter m times.
  const CostModel four{.model = m, .cluster = c,
                       .layout = Layout{.dp = n, .microbatch_size = 1, .num_microbatches = 4, .zero_stage = 3}};
  const CostModel one{.model = m, .cluster = c,
                      .layout = Layout{.dp = n, .microbatch_size = 1, .num_microbatches = 1, .zero_stage = 3}};
  CHECK(four.zero3_traffic(0).all_gathers == 4 * one.zero3_traffic(0).all_gathers);
  CHECK(four.zero3_traffic(0).reduce_scatter_elements == 4 * one.zero3_traffic(0).reduce_scatter_elements);
  CHECK_THROWS_WITH_AS(Layout{.zero3_unit_layers = -1}.validate(), doctest::Contains("zero3_unit_layers must be >= 0"),
                       Error);
  // The search gives every ZeRO-3 layout the unit asked for (train_gpt: 0, a whole stage).
  const SearchResult r = search(m, c, SearchOptions{.world = 8, .global_batch = 16, .microbatch_sizes = {1, 2},
                                                    .virtual_stages = {1}, .recompute = {Recompute::full},
                                                    .zero_stages = {3}, .zero3_unit_layers = 0});
  REQUIRE(!r.ranked.empty());
  for (const Plan& p : r.ranked) {
    CHECK(p.layout.zero_stage == 3);
    CHECK(p.layout.zero3_unit_layers == 0);
    CHECK(p.layout.dp_bucket_bytes == std::size_t{25} << 20);
  }
  // ... and the bucket size asked for (train_gpt: --bucket-mb): smaller buckets, more messages.
  const std::size_t small = std::size_t{1} << 16;
  const SearchResult rs = search(m, c, SearchOptions{.world = 8, .global_batch = 16, .microbatch_sizes = {1, 2},
                                                     .virtual_stages = {1}, .recompute = {Recompute::full},
                                                     .zero_stages = {3}, .zero3_unit_layers = 0,
                                                     .dp_bucket_bytes = small, .dp_first_bucket_bytes = small});
  REQUIRE(rs.ranked.size() == r.ranked.size());
  for (const Plan& p : rs.ranked) {
    CHECK(p.layout.dp_bucket_bytes == small);
    CHECK(p.layout.dp_first_bucket_bytes == small);
  }
  Layout big = rs.ranked.front().layout;
  big.dp_bucket_bytes = big.dp_first_bucket_bytes = std::size_t{25} << 20;
  const CostModel with_small{.model = m, .cluster = c, .layout = rs.ranked.front().layout};
  const CostModel with_big{.model = m, .cluster = c, .layout = big};
  CHECK(with_small.zero3_traffic(0).all_gathers > with_big.zero3_traffic(0).all_gathers);
}

TEST_CASE("Block overhead: calibrate's fit of a real block's unlisted work, and CostModel charging it per forward (1/3) and backward (2/3) of tessera's block only") {
  // extra = pass + per_token x tokens through two micro-batch sizes.
  const auto [pass, token] = Calibration::fit_block_overhead(128, 1, 50e-6 + 128 * 2e-9, 16, 50e-6 + 2048 * 2e-9);
  CHECK(rel(pass, 50e-6) < 1e-9);
  CHECK(rel(token, 2e-9) < 1e-9);
  // A negative intercept (more extra per token at small batches than the line allows) is a
  // line through the origin; a model slower than the block is no overhead.
  const auto [p0, t0] = Calibration::fit_block_overhead(128, 1, 1e-6, 16, 1e-3);
  CHECK(p0 == 0.0);
  CHECK(t0 > 0);
  const auto [p1, t1] = Calibration::fit_block_overhead(128, 1, -1e-4, 16, -1e-3);
  CHECK(p1 == 0.0);
  CHECK(t1 == 0.0);
  CHECK_THROWS_WITH_AS(Calibration::fit_block_overhead(128, 4, 0, 4, 0), doctest::Contains("1 <= mbs 4 < mbs 4"), Error);
  // The cluster file carries it (us per pass, ns per token) and CostModel adds it.
  Calibration cal{.backend = "threads", .cores = 1.9};
  cal.gemms.push_back({.name = "a", .m = 100, .n = 100, .k = 100, .seconds = 2e6 / 50e9});
  cal.elementwise_bandwidth = 6e9;
  for (double bytes : {1e4, 1e6}) cal.comm.push_back({.collective = "all_reduce", .ranks = 2, .bytes = bytes,
                                                      .seconds = 2e-6 + bytes / 4e9});
  cal.block_pass_overhead = 40e-6;
  cal.block_token_overhead = 3e-9;
  const Cluster with = Cluster::from_json(cal.to_cluster_json("this machine", 8, 4.0, 2));
  CHECK(rel(with.block_pass_overhead, 40e-6) < 1e-12);
  CHECK(rel(with.block_token_overhead, 3e-9) < 1e-12);
  Cluster without = with;
  without.block_pass_overhead = without.block_token_overhead = 0;
  ModelSpec m{.name = "small", .layers = 6, .hidden = 192, .heads = 6, .kv_heads = 0, .ffn = 0, .vocab = 256,
              .seq = 128, .tied = true, .dropout = false, .tessera_block = true};
  const Layout l{.microbatch_size = 4};
  const CostModel a{.model = m, .cluster = with, .layout = l}, b{.model = m, .cluster = without, .layout = l};
  const double extra = 40e-6 + 3e-9 * 128 * 4;
  CHECK(rel(a.layer_forward().compute - b.layer_forward().compute, extra / 3) < 1e-9);
  CHECK(rel(a.layer_backward().compute - b.layer_backward().compute, 2 * extra / 3) < 1e-9);
  // Under tp a rank does its share of the per-token part: 6 h of replicated widths and
  // h + 2 kv + h + 2 ffn split (h 192, kv 192, ffn 768: (1152 + 2304 / 2) / 3456 = 2/3 at tp 2);
  // with sequence parallelism everything is split (1/2); the per-pass part stays whole.
  CHECK(a.block_token_overhead_share() == 1.0);
  for (const auto& [tp, sp, share] : {std::tuple{2, false, 2.0 / 3}, std::tuple{2, true, 0.5}, std::tuple{3, false, 5.0 / 9}}) {
    Layout lt = l;
    lt.tp = tp;
    lt.sequence_parallel = sp;
    const CostModel at{.model = m, .cluster = with, .layout = lt}, bt{.model = m, .cluster = without, .layout = lt};
    CHECK(rel(at.block_token_overhead_share(), share) < 1e-12);
    CHECK(rel(at.layer_forward().compute - bt.layer_forward().compute, (40e-6 + 3e-9 * 128 * 4 * share) / 3) < 1e-9);
  }
  m.tessera_block = false;
  const CostModel c{.model = m, .cluster = with, .layout = l}, d{.model = m, .cluster = without, .layout = l};
  CHECK(c.layer_forward().compute == d.layer_forward().compute);
  Cluster bad = with;
  bad.block_token_overhead = -1;
  CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("block_overhead must be >= 0"), Error);
  // On a real block of a small model the measurement runs and gives non-negative parts.
  Calibration real;
  const ModelSpec tiny{.name = "tiny", .layers = 1, .hidden = 32, .heads = 2, .kv_heads = 0, .ffn = 0, .vocab = 64,
                       .seq = 16, .tied = true, .dropout = false, .tessera_block = true};
  real.measure_gemms(tiny, {1, 4}, {1}, 0.001);
  real.measure_elementwise(64, 32, 0.001);
  const auto [rp, rt] = real.measure_block_overhead(tiny, 1, 4, 0.002);
  CHECK(rp >= 0);
  CHECK(rt >= 0);
}

TEST_CASE("Plan figures: a step below 0.1 s prints 2 significant digits (not 0.000), memory below 1 GiB in MiB") {
  TimeEstimate t;
  t.compute = 0.004;
  t.bubble = 0.001;
  t.optimizer = 0.00012;
  // 0.00512 s: ceil(-log10) + 2 = 5 decimals, every component at the same precision.
  CHECK(t.to_string().rfind("0.00512 s: compute 0.00400, tp 0.00000, p2p 0.00000, bubble 0.00100, dp 0.00000 "
                            "(+0.00000 hidden), optimizer 0.00012", 0) == 0);
  t.compute = 24.1;  // from 0.1 s up: 3 decimals, as before
  CHECK(t.to_string().rfind("24.10112 s", 0) != 0);
  CHECK(t.to_string().rfind("24.101 s: compute 24.100, ", 0) == 0);
  MemoryEstimate m;
  m.parameters = 3.0 * 1024 * 1024;
  m.activations = 1.5 * 1024 * 1024;
  CHECK(m.to_string().rfind("4.5 MiB on pp rank 0: parameters 3.0, gradients 0.0, optimizer 0.0, activations 1.5", 0) == 0);
  m.activations = 2.0 * 1024 * 1024 * 1024;
  CHECK(m.to_string().rfind("2.0 GiB on pp rank 0: parameters 0.0,", 0) == 0);
}

TEST_CASE("plan::choose: within the tolerance the layout with the fewest mechanisms, then synchronizations, else the fastest") {
  const ModelSpec m{.name = "tiny", .layers = 8, .hidden = 64, .heads = 4, .kv_heads = 0, .ffn = 0, .vocab = 16,
                    .seq = 8, .tied = true};
  auto plan_of = [&](Layout l, double seconds, long long p2p_messages) {
    Plan p;
    p.model = m;
    p.layout = l;
    p.time.compute = seconds;
    p.time.p2p_messages = p2p_messages;
    return p;
  };
  Layout zb{.dp = 4, .pp = 2, .microbatch_size = 8, .num_microbatches = 1};
  zb.schedule = PipelineSchedule::zero_bubble_h1;
  zb.zero_stage = 1;
  const Layout pipe{.dp = 4, .pp = 2, .microbatch_size = 4, .num_microbatches = 2};
  const Layout flat{.dp = 8, .microbatch_size = 4, .num_microbatches = 1};
  const Layout slow{.dp = 8, .microbatch_size = 2, .num_microbatches = 2};
  SearchResult r;
  r.ranked = {plan_of(zb, 0.400, 2), plan_of(pipe, 0.410, 4), plan_of(flat, 0.415, 0), plan_of(slow, 0.500, 0)};
  CHECK(mechanisms(zb) == 2);
  CHECK(mechanisms(pipe) == 0);
  CHECK(synchronizations(r.ranked[1]) == doctest::Approx(4.0));  // 4 sends and 4 receives over 2 pp ranks
  CHECK(choose(r, 0.0).index == 0);
  CHECK(choose(r, 0.0).reason == "the fastest predicted");
  CHECK(choose(r, 0.02).index == 0);   // only zb within 0.408
  CHECK(choose(r, 0.03).index == 1);   // pipe (0.410): no mechanisms against zb's two
  CHECK(choose(r, 0.04).index == 2);   // flat (0.415): no mechanisms and no synchronizations
  CHECK(choose(r, 0.5).index == 2);    // slow ties flat in both; the faster stays
  const std::string why = choose(r, 0.03).reason;
  CHECK(why.find("2.5% slower than the fastest (dp 4 x tp 1 x pp 2, ZB-H1") != std::string::npos);
  CHECK(why.find("within the 3% tolerance, with 0 optional mechanisms against 2, then 4 synchronizations per step "
                 "against 2") != std::string::npos);
  CHECK(choose(r, 0.04).reason.find("with 0 optional mechanisms against 2") != std::string::npos);
  // tp collectives: 4 per block and micro-batch (6 under full recomputation), 8 layers over pp 2.
  Layout tpl{.tp = 2, .pp = 2, .microbatch_size = 1, .num_microbatches = 4};
  CHECK(synchronizations(plan_of(tpl, 1.0, 12)) == doctest::Approx(12.0 + 4 * 4 * 4));
  tpl.recompute = Recompute::full;
  CHECK(synchronizations(plan_of(tpl, 1.0, 12)) == doctest::Approx(12.0 + 6 * 4 * 4));
  CHECK(mechanisms(tpl) == 1);
  CHECK_THROWS_WITH_AS((void)choose(SearchResult{}, 0.03), doctest::Contains("the ranking is empty"), Error);
  CHECK_THROWS_WITH_AS((void)choose(r, -0.01), doctest::Contains("the tolerance must be in [0, 1], got -0.01"), Error);
  CHECK_THROWS_WITH_AS((void)choose(r, std::nan("")), doctest::Contains("the tolerance must be in [0, 1], got nan"), Error);
  CHECK_THROWS_WITH_AS((void)choose(r, 1.5), doctest::Contains("got 1.5"), Error);
  // Mechanisms: ZeRO, a schedule other than 1F1B at pp > 1, recomputation; not SP.
  Layout sp{.tp = 2, .microbatch_size = 1, .num_microbatches = 1};
  sp.sequence_parallel = true;
  CHECK(mechanisms(sp) == 0);
  Layout gp{.pp = 1, .microbatch_size = 1, .num_microbatches = 1};
  gp.schedule = PipelineSchedule::gpipe;  // no pipeline at pp 1: not a mechanism
  CHECK(mechanisms(gp) == 0);
}
