// The planner's collectives against instrumented runs of tessera's own policies on the GPT's
// block (nn::Block): the tensor-parallel all-reduces CostModel charges per block are what
// TensorParallel<nn::Block> sends, and the gradient elements its dp reduction moves (the
// block's parameters, ModelSpec::layer_parameters) are what DataParallel<nn::Block> reduces;
// ZeRO-3's collectives against a ZeRO-3 GPT; and whole HybridGPT steps: their tp all-reduces,
// pipeline sends and ZeRO-1 reduce-scatters per rank.
#include <doctest/doctest.h>

#include <cstddef>

#include "../tp/tp_bodies.hpp"
#include "flat_cluster.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/plan/cost_model.hpp"
#include "tessera/plan/plan.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;


TEST_CASE("CostModel: the tp all-reduces it charges per block are the ones TensorParallel<nn::Block> issues, with and without SP") {
  using tp_bodies::kB;
  using tp_bodies::kD;
  using tp_bodies::kT;
  const plan::ModelSpec m{.name = "tiny", .layers = 1, .hidden = static_cast<int>(kD), .heads = 2, .kv_heads = 0,
                          .ffn = 0, .vocab = 16, .seq = static_cast<int>(kT), .tied = true};
  const plan::CostModel cm{.model = m, .layout = plan::Layout{.microbatch_size = static_cast<int>(kB)}};
  const int per_block = plan::CostModel::tp_all_reduces_forward + plan::CostModel::tp_all_reduces_backward;
  const double elements = per_block * cm.tp_all_reduce_elements();
  for (int tp : {2, 3, 4}) {
    CAPTURE(tp);
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) {
           return tp_bodies::plan_counts_body<nn::Block<float>, Replicate>(comm, tp_bodies::make_block);
         })) {
      CHECK(static_cast<int>(c.all_reduce) == per_block);
      CHECK(static_cast<double>(c.all_reduce_elems) == elements);
    }
    for (const auto& c : testing::run_ranks(tp, [](Comm& comm) {
           return tp_bodies::plan_counts_body<nn::Block<float>, Shard<1>>(comm, tp_bodies::make_block);
         })) {
      // Sequence parallelism: each all-reduce becomes a reduce-scatter (whole input counted)
      // plus an all-gather (its shard counted) of the same tensor.
      CHECK(static_cast<int>(c.reduce_scatter) == per_block);
      CHECK(static_cast<double>(c.reduce_scatter_elems) == elements);
      CHECK(static_cast<int>(c.all_gather) == per_block);
      CHECK(static_cast<double>(c.all_gather_elems * static_cast<std::size_t>(tp)) == elements);
    }
  }
}

TEST_CASE("CostModel: the dp reduction moves the block's parameters, ModelSpec::layer_parameters(), as DataParallel<nn::Block> does") {
  using tp_bodies::kB;
  using tp_bodies::kD;
  using tp_bodies::kHeads;
  using tp_bodies::kT;
  const plan::ModelSpec m{.name = "tiny", .layers = 1, .hidden = static_cast<int>(kD), .heads = static_cast<int>(kHeads),
                          .kv_heads = 0, .ffn = 0, .vocab = 16, .seq = static_cast<int>(kT), .tied = true};
  for (int dp : {2, 3}) {
    CAPTURE(dp);
    const auto counts = testing::run_ranks(dp, [](Comm& world) {
      auto counters = std::make_shared<testing::CommCounters>();
      DataParallel<nn::Block<float>> par(tp_bodies::make_block(), testing::instrument(world, counters),
                                         DataParallelOptions{.bucket_size = 4096, .first_bucket_size = 1024,
                                                             .overlap_grad_reduce = false});
      const Tensor<float> x = tp_test::random_tensor<float>(Shape{kB, kT, kD}, 1);
      counters->reset();
      auto [y, c] = par.forward(x);
      par.backward(y, c);
      return std::pair{counters->elements(testing::CallKind::all_reduce), counters->calls(testing::CallKind::all_reduce)};
    });
    for (const auto& [elements, calls] : counts) {
      CHECK(static_cast<double>(elements) == m.layer_parameters());
      CHECK(calls > 1);  // several buckets, the same elements in all
    }
  }
}

// ZeRO-3: the all-gathers and reduce-scatters the planner counts (CostModel::zero3_traffic,
// from BucketLayout's packing of the stage's parameters) against an instrumented ZeRO-3 run of
// the tied GPT (DataParallel over the whole model: one unit, Layout::zero3_unit_layers 0) at dp
// 2, 3 and 4 with 1 and 2 micro-batches per step; and BucketLayout against the buckets
// GradBuckets made for the same parameters.
TEST_CASE("CostModel: ZeRO-3's all-gathers and reduce-scatters per step, from the bucket layout, are what an instrumented ZeRO-3 GPT issues") {
  const GPTConfig cfg{.vocab_size = 256, .n_positions = 16, .n_layer = 4, .n_head = 4, .d_model = 128};
  const plan::ModelSpec spec{.name = "GPT", .layers = 4, .hidden = 128, .heads = 4, .kv_heads = 0, .ffn = 0,
                             .vocab = 256, .seq = 16, .tied = true, .dropout = false, .tessera_block = true};
  struct Seen {
    std::size_t all_gathers = 0, all_gather_elements = 0, reduce_scatters = 0, reduce_scatter_elements = 0;
    std::vector<std::int64_t> padded;
  };
  for (int dp : {2, 3, 4})
    for (int m : {1, 2}) {
      CAPTURE(dp);
      CAPTURE(m);
      const auto seen = testing::run_ranks(dp, [&](Comm& world) {
        auto counters = std::make_shared<testing::CommCounters>();
        DataParallel model(GPT<float>(cfg, 1), testing::instrument(world, counters));
        DistributedOptimizer<optim::AdamW<float>> opt(model, optim::AdamWOptions{.lr = 1e-3}, ZeroStage::parameters);
        nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});
        Seen s;
        for (std::size_t b = 0; b < model.buckets().buckets().size(); ++b)
          s.padded.push_back(model.buckets().shard_size(b) * dp);
        counters->reset();
        for (int k = 0; k < m; ++k) {
          Tensor<std::int32_t> x(Shape{2, 16}), y(Shape{2, 16});
          for (std::int64_t i = 0; i < 32; ++i) {
            x.data()[i] = static_cast<std::int32_t>((i * 7 + k + world.rank()) % 256);
            y.data()[i] = static_cast<std::int32_t>((i * 11 + 3) % 256);
          }
          auto [logits, ctx] = model.forward(x);
          auto [loss, lctx] = ce.forward(logits, y);
          model.backward(ce.backward(1.0f, lctx), ctx);
        }
        opt.step();
        s.all_gathers = counters->calls(testing::CallKind::all_gather);
        s.all_gather_elements = counters->elements(testing::CallKind::all_gather) * static_cast<std::size_t>(dp);
        s.reduce_scatters = counters->calls(testing::CallKind::reduce_scatter);
        s.reduce_scatter_elements = counters->elements(testing::CallKind::reduce_scatter);
        return s;
      });
      // DataParallel's buckets: 25 MiB, the first 1 MiB (Hybrid's stages use 25 MiB for both).
      const plan::Layout l{.dp = dp, .microbatch_size = 2, .num_microbatches = m, .zero_stage = 3,
                           .zero3_unit_layers = 0, .dp_first_bucket_bytes = std::size_t{1} << 20};
      const plan::CostModel cm{.model = spec, .layout = l, .precision = plan::Precision::float32_adamw()};
      const std::vector<plan::BucketLayout> units = cm.zero3_buckets(0);
      REQUIRE(units.size() == 1);
      CHECK(units[0].size() >= 2);  // the 1 MiB first bucket and the rest (and, where dp divides it, the tied embedding alone)
      const plan::CostModel::Zero3Traffic t = cm.zero3_traffic(0);
      for (const Seen& s : seen) {
        CHECK(units[0].padded == s.padded);
        CHECK(static_cast<long long>(s.all_gathers) == t.all_gathers);
        CHECK(static_cast<double>(s.all_gather_elements) == t.all_gather_elements);
        CHECK(static_cast<long long>(s.reduce_scatters) == t.reduce_scatters);
        CHECK(static_cast<double>(s.reduce_scatter_elements) == t.reduce_scatter_elements);
      }
    }
}

// A whole HybridGPT step against the planner: the elements of the all-reduces one rank issues
// per micro-batch are CostModel::tp_elements_per_microbatch of its stage -- the blocks' g and f
// (and full recomputation's second forward, the embedding's included), the vocab-parallel
// embedding, the head's input gradient and the vocab-parallel cross-entropy's three -- at tp 2
// and 4, pp 1 and 2, with and without full recomputation. The step's other all-reduces (the
// loss over dp, the tied embedding's gradient over the first and last stage) do not depend on
// the tokens, so the difference between a step of 2 and of 4 sequences per micro-batch is the
// per-token part alone, and that is compared exactly. The second step is counted: in the first,
// every stage but the last also runs one forward on zeros to learn its output shape
// (PipelineStage::output_shape, cached per input shape), which the planner rightly leaves out.
// Sequence parallelism: the same whole-step count, each of the planner's all-reduces being a
// reduce-scatter (its whole input counted) plus an all-gather (its block counted, times tp)
// of the same tensor, or an all-reduce where SP keeps one (the cross-entropy's three). The
// embedding's output is reduce-scattered in its forward and its input gradient all-gathered in
// the backward; the head's input is all-gathered in its forward and its gradient
// reduce-scattered in the backward: over a step each balances, so the planner's all-reduce
// equivalents are exact; full recomputation reruns the first stage's embedding (its
// reduce-scatter again) and the last stage's head (its all-gather again): one more b s h per
// micro-batch of one kind on each, which the planner charges as the all-reduce it counts.
namespace {
// One rank's stage and the elements of its tensor-parallel collectives in a HybridGPT step.
struct TpElements {
  int stage = 0;
  double all_reduce = 0, reduce_scatter = 0, all_gather = 0;  // all-gather: this rank's block x tp
};

// Runs two HybridGPT steps of 2 micro-batches of `rows` sequences (16 tokens) over tp x pp
// thread ranks on an instrumented communicator and returns each rank's count of the second
// (the first also runs each stage's output-shape forward).
std::vector<TpElements> hybrid_tp_elements(int tp, int pp, nn::Recompute rc, bool sp, std::int64_t rows) {
  const GPTConfig cfg{.vocab_size = 64, .n_positions = 16, .n_layer = 4, .n_head = 4, .d_model = 32};
  return testing::run_ranks(tp * pp, [&](Comm& world) {
    auto counters = std::make_shared<testing::CommCounters>();
    Mesh mesh(testing::instrument(world, counters), MeshShape{.dp = 1, .pp = pp, .tp = tp});
    HybridOptions options;
    options.num_microbatches = 2;
    options.recompute = rc;
    HybridGPT<float> model(mesh, cfg, 1, options, std::nullopt, HybridGPTOptions{.sequence_parallel = sp});
    Tensor<std::int32_t> x(Shape{2 * rows, 16}), y(Shape{2 * rows, 16});
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      x.data()[i] = static_cast<std::int32_t>(i % 64);
      y.data()[i] = static_cast<std::int32_t>((i * 3 + 1) % 64);
    }
    model.forward_backward(x, y);  // the first step, with the output-shape forwards
    counters->reset();
    model.forward_backward(x, y);
    return TpElements{mesh.coord().pp, static_cast<double>(counters->elements(testing::CallKind::all_reduce)),
                      static_cast<double>(counters->elements(testing::CallKind::reduce_scatter)),
                      static_cast<double>(counters->elements(testing::CallKind::all_gather)) * tp};
  });
}
}  // namespace

TEST_CASE("CostModel: the tensor-parallel elements of a whole HybridGPT step per micro-batch, per stage, are the planner's, with and without SP") {
  const plan::ModelSpec m{.name = "GPT", .layers = 4, .hidden = 32, .heads = 4, .kv_heads = 0, .ffn = 0,
                          .vocab = 64, .seq = 16, .tied = true, .dropout = false, .tessera_block = true};
  for (bool sp : {false, true})
    for (int tp : {2, 4})
      for (int pp : {1, 2})
        for (nn::Recompute rc : {nn::Recompute::none, nn::Recompute::full}) {
          CAPTURE(sp);
          CAPTURE(tp);
          CAPTURE(pp);
          CAPTURE(static_cast<int>(rc));
          const auto two = hybrid_tp_elements(tp, pp, rc, sp, 2), four = hybrid_tp_elements(tp, pp, rc, sp, 4);
          for (std::size_t r = 0; r < two.size(); ++r) {
            CAPTURE(r);
            const int stage = two[r].stage;
            auto per_microbatch = [&](int mbs) {
              plan::Layout l{.tp = tp, .pp = pp, .microbatch_size = mbs, .num_microbatches = 2};
              l.sequence_parallel = sp;
              l.recompute = rc == nn::Recompute::full ? plan::Recompute::full : plan::Recompute::none;
              return plan::CostModel{.model = m, .layout = l}.tp_elements_per_microbatch(stage);
            };
            // Two micro-batches per step; 4 rows of 16 tokens against 2.
            const double want = 2 * (per_microbatch(4) - per_microbatch(2));
            const double ar = four[r].all_reduce - two[r].all_reduce,
                         rs = four[r].reduce_scatter - two[r].reduce_scatter,
                         ag = four[r].all_gather - two[r].all_gather;
            if (!sp) {
              CHECK(ar == want);
              CHECK(rs == 0);
              CHECK(ag == 0);
              continue;
            }
            CHECK(ar + rs == want);  // every all-reduce the planner charges: an all-reduce or a reduce-scatter
            // ... and as many all-gathered elements, but for the embedding's reduce-scatter and the
            // head's all-gather rerun by full recomputation, which land on the first and the last
            // stage (one b s h per micro-batch each; they cancel at one stage).
            const double rerun = rc == nn::Recompute::full ? 2.0 * 2 * 16 * 32 : 0.0;  // 2 micro-batches x 2 more rows
            const double skew = (stage == pp - 1 ? rerun : 0.0) - (stage == 0 ? rerun : 0.0);
            CHECK(ag == rs + skew);
          }
        }
}

// A whole HybridGPT step against the planner's pipeline and dp traffic: per pipeline (one dp
// and tp coordinate), the SENDs of every pp rank are TimeEstimate::p2p_messages, each of
// TimeEstimate::p2p_bytes (b s h fp32 elements, / tp under sequence parallelism, whose
// activations between stages are split along the sequence; tessera's pipeline sends a tp rank's
// whole activation otherwise); and under ZeRO-1 each rank's dp reduce-scatters move its stage's
// parameters (CostModel::rank_parameters) in the padded buckets the planner packs
// (CostModel::zero3_buckets). The second step is counted (the first runs each stage's
// output-shape forward). dp 2 at tp 1 and 2, pp 2 and 4, with and without sequence parallelism.
TEST_CASE("CostModel: a whole HybridGPT step's pipeline sends and ZeRO-1 dp reduce-scatters are the planner's") {
  const GPTConfig cfg{.vocab_size = 64, .n_positions = 16, .n_layer = 4, .n_head = 4, .d_model = 32};
  const plan::ModelSpec m{.name = "GPT", .layers = 4, .hidden = 32, .heads = 4, .kv_heads = 0, .ffn = 0,
                          .vocab = 64, .seq = 16, .tied = true, .dropout = false, .tessera_block = true};
  struct Case {
    int tp, pp;
    bool sp;
  };
  for (const Case k : {Case{1, 2, false}, Case{2, 2, false}, Case{2, 2, true}, Case{1, 4, false}}) {
    CAPTURE(k.tp);
    CAPTURE(k.pp);
    CAPTURE(k.sp);
    const int dp = 2, mbs = 2, mbcount = 2;
    struct Seen {
      MeshCoord at;
      std::size_t sends = 0, send_elements = 0, reduce_scatter_elements = 0, reduce_scatters = 0;
    };
    const auto seen = testing::run_ranks(dp * k.tp * k.pp, [&](Comm& world) {
      auto counters = std::make_shared<testing::CommCounters>();
      Mesh mesh(testing::instrument(world, counters), MeshShape{.dp = dp, .pp = k.pp, .tp = k.tp});
      HybridOptions options;
      options.num_microbatches = mbcount;
      HybridGPT<float> model(mesh, cfg, 1, options, std::nullopt, HybridGPTOptions{.sequence_parallel = k.sp});
      DistributedOptimizer<optim::AdamW<float>> opt(model, optim::AdamWOptions{.lr = 1e-3}, ZeroStage::optimizer);
      Tensor<std::int32_t> x(Shape{mbs * mbcount, 16}), y(Shape{mbs * mbcount, 16});
      for (std::int64_t i = 0; i < x.numel(); ++i) {
        x.data()[i] = static_cast<std::int32_t>((i + mesh.coord().dp) % 64);
        y.data()[i] = static_cast<std::int32_t>((i * 3 + 1) % 64);
      }
      model.forward_backward(x, y);
      opt.step();
      model.zero_grad();
      counters->reset();
      model.forward_backward(x, y);
      return Seen{mesh.coord(), counters->calls(testing::CallKind::send), counters->elements(testing::CallKind::send),
                  counters->elements(testing::CallKind::reduce_scatter), counters->calls(testing::CallKind::reduce_scatter)};
    });
    plan::Layout l{.dp = dp, .tp = k.tp, .pp = k.pp, .microbatch_size = mbs, .num_microbatches = mbcount};
    l.sequence_parallel = k.sp;
    l.zero_stage = 1;
    l.zero3_unit_layers = 0;  // HybridOptions::unit_layers' default: one unit per stage
    const plan::Plan p = plan::Plan::predict(m, plan_test::flat_cluster(), l, plan::Precision::float32_adamw());
    const plan::CostModel cm{.model = m, .layout = l, .precision = plan::Precision::float32_adamw()};
    for (int d = 0; d < dp; ++d)
      for (int t = 0; t < k.tp; ++t) {
        std::size_t sends = 0, elements = 0;
        for (const Seen& s : seen)
          if (s.at.dp == d && s.at.tp == t) {
            sends += s.sends;
            elements += s.send_elements;
          }
        CHECK(static_cast<long long>(sends) == p.time.p2p_messages);
        CHECK(static_cast<double>(elements) * sizeof(float) == p.time.p2p_messages * p.time.p2p_bytes);
      }
    if (k.sp) continue;  // sequence parallelism's own reduce-scatters are tp's
    // TimeEstimate::dp_collectives: per device, averaged over the pp ranks, a reduce-scatter per
    // bucket here and the optimizer step's all-gather of it.
    double reduce_scatters = 0;
    for (const Seen& s : seen) reduce_scatters += static_cast<double>(s.reduce_scatters);
    CHECK(2 * reduce_scatters / static_cast<double>(seen.size()) == doctest::Approx(p.time.dp_collectives));
    for (const Seen& s : seen) {
      CAPTURE(s.at.pp);
      double padded = 0;
      for (const plan::BucketLayout& b : cm.zero3_buckets(s.at.pp))
        for (std::int64_t e : b.padded) padded += static_cast<double>(e);
      CHECK(static_cast<double>(s.reduce_scatter_elements) == padded);
      CHECK(padded - cm.rank_parameters(s.at.pp) >= 0);
      CHECK(padded - cm.rank_parameters(s.at.pp) < dp);  // one bucket per stage here: at most dp - 1 padding
    }
  }
}

