// ZeRO-3 under Hybrid (dp 2 x pp 2, threads backend, the tied GPT with 4 blocks, 2 micro-batches,
// HybridOptions::unit_layers 0, 1 and 2): each rank's units and their padded buckets, and the
// elements its all-gathers move in one steady-state step (the second: the first step gathers
// stage 0 once more), against the planner's CostModel::zero3_buckets and zero3_traffic. Not in CI
// (a Hybrid build costs about 17 s of CPU); run by hand after changing either side:
//   g++ -std=c++20 -O1 -Iinclude -Itests bench/plan/zero3_hybrid_counts.cpp -o /tmp/z3h -lopenblas -pthread
//   OPENBLAS_NUM_THREADS=1 /tmp/z3h    (exit 0: every rank EQUAL)
// 2026-12-05 09:59 UTC: all six (unit x pp rank) EQUAL; before the planner stopped treating the
// stage-0 embedding as tied at pp > 1 its buckets differed (25664 + 2048 vs 27712 elements).
#include <cstdio>
#include <vector>
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/plan/cost_model.hpp"
#include "tessera/testing/run_ranks.hpp"
using namespace tessera;
int main() {
  int bad = 0;
  const GPTConfig cfg{.vocab_size = 64, .n_positions = 8, .n_layer = 4, .n_head = 4, .d_model = 32};
  const plan::ModelSpec spec{.name = "GPT", .layers = 4, .hidden = 32, .heads = 4, .kv_heads = 0, .ffn = 0, .vocab = 64,
                             .seq = 8, .tied = true, .dropout = false, .tessera_block = true};
  for (int u : {0, 1, 2}) {
    auto res = testing::run_ranks(4, [&](Comm& c) {
      Mesh mesh(c, MeshShape{.dp = 2, .pp = 2, .tp = 1});
      HybridOptions ho;
      ho.num_microbatches = 2;
      ho.unit_layers = u;
      HybridGPT<float> model(mesh, cfg, 7, ho);
      DistributedOptimizer<optim::AdamW<float>> opt(model, optim::AdamWOptions{.lr = 1e-3}, ZeroStage::parameters);
      std::vector<std::vector<std::int64_t>> units;
      for (GradBuckets<float>* b : model.buckets()) {
        units.emplace_back();
        for (std::size_t k = 0; k < b->buckets().size(); ++k) units.back().push_back(b->shard_size(k) * 2);
      }
      Tensor<std::int32_t> x(Shape{4, 8}), y(Shape{4, 8});
      for (std::int64_t i = 0; i < 32; ++i) { x.data()[i] = (i * 7 + c.rank()) % 64; y.data()[i] = (i * 3 + 1) % 64; }
      model.zero_grad();
      model.forward_backward(x, y);
      opt.step();
      std::int64_t g0 = 0;
      for (GradBuckets<float>* b : model.buckets()) g0 += b->gathered_elements();
      model.zero_grad();
      model.forward_backward(x, y);
      opt.step();
      std::int64_t g1 = 0;
      for (GradBuckets<float>* b : model.buckets()) g1 += b->gathered_elements();
      return std::tuple{mesh.coord().pp, units, g1 - g0};
    });
    for (const auto& [pp, units, gathered] : res) {
      const plan::Layout l{.dp = 2, .pp = 2, .microbatch_size = 2, .num_microbatches = 2, .zero_stage = 3, .zero3_unit_layers = u};
      const plan::CostModel cm{.model = spec, .layout = l, .precision = plan::Precision::float32_adamw()};
      std::vector<std::vector<std::int64_t>> want;
      for (const auto& b : cm.zero3_buckets(pp)) want.push_back(b.padded);
      std::printf("unit %d pp %d: measured units %zu gathered %lld; planner units %zu gathered %.0f; layouts %s\n", u, pp,
                  units.size(), (long long)gathered, want.size(), cm.zero3_traffic(pp).all_gather_elements,
                  units == want ? "EQUAL" : "DIFFER");
      if (units != want || static_cast<double>(gathered) != cm.zero3_traffic(pp).all_gather_elements) ++bad;
      if (units != want) {
        for (auto& v : units) { std::printf("  m:"); for (auto e : v) std::printf(" %lld", (long long)e); std::printf("\n"); }
        for (auto& v : want) { std::printf("  p:"); for (auto e : v) std::printf(" %lld", (long long)e); std::printf("\n"); }
      }
    }
  }
  return bad == 0 ? 0 : 1;
}
