// The planner's memory estimate under ZeRO 0, 1, 2 and 3 against what the MemoryTracker measures on
// two real training steps of a small GPT (DataParallel over the threads backend, AdamW through
// DistributedOptimizer, train_gpt's model as the planner sees it: tessera_block, fp32 AdamW),
// at dp 2 and 4: parameters, gradients and optimizer state per category, and ZeRO-2's bucket
// buffers (comm_buffers).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "tessera/core/memory_tracker.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/plan/plan.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;

namespace {

struct Peaks {
  double parameters = 0, gradients = 0, optimizer_state = 0, comm_buffers = 0;
  std::int64_t params = 0;
};

// The largest per-rank peak of each category over two steps.
Peaks measure(const GPTConfig& cfg, int dp, ZeroStage stage) {
  auto per_rank = testing::run_ranks(dp, [&](Comm& c) {
    MemoryTracker& t = MemoryTracker::this_rank();
    DataParallel model(GPT<float>(cfg, 1), c);
    DistributedOptimizer<optim::AdamW<float>> opt(model, optim::AdamWOptions{.lr = 1e-4}, stage);
    nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});
    t.reset_peaks();
    const std::int64_t T = cfg.n_positions;
    for (int step = 0; step < 2; ++step) {
      Tensor<std::int32_t> x(Shape{2, T}), y(Shape{2, T});
      for (std::int64_t b = 0; b < 2; ++b)
        for (std::int64_t i = 0; i < T; ++i) {
          x(b, i) = static_cast<std::int32_t>((i * 7 + step + c.rank() + b) % cfg.vocab_size);
          y(b, i) = static_cast<std::int32_t>((i * 11 + 3 + b) % cfg.vocab_size);
        }
      const double scale = model.loss_scale(2 * T);
      auto [logits, ctx] = model.forward(x);
      auto [loss, lctx] = ce.forward(logits, y);
      model.backward(ce.backward(static_cast<float>(scale), lctx), ctx);
      opt.step();
      model.zero_grad();
    }
    Peaks p{static_cast<double>(t.peak(MemoryCategory::parameters)), static_cast<double>(t.peak(MemoryCategory::gradients)),
            static_cast<double>(t.peak(MemoryCategory::optimizer_state)),
            static_cast<double>(t.peak(MemoryCategory::comm_buffers)), 0};
    for (const Parameter<float>& q : model.parameters()) p.params += q.value.numel();
    return p;
  });
  Peaks worst = per_rank.front();
  for (const Peaks& p : per_rank) {
    worst.parameters = std::max(worst.parameters, p.parameters);
    worst.gradients = std::max(worst.gradients, p.gradients);
    worst.optimizer_state = std::max(worst.optimizer_state, p.optimizer_state);
    worst.comm_buffers = std::max(worst.comm_buffers, p.comm_buffers);
  }
  return worst;
}

}  // namespace

TEST_CASE("MemoryEstimate under ZeRO 0/1/2/3 equals the MemoryTracker's peaks per category on a GPT at dp 2 and 4") {
  const GPTConfig cfg{.vocab_size = 256, .n_positions = 16, .n_layer = 3, .n_head = 4, .d_model = 64};
  const plan::ModelSpec spec{.name = "GPT", .layers = 3, .hidden = 64, .heads = 4, .kv_heads = 0, .ffn = 0, .vocab = 256,
                             .seq = 16, .tied = true, .dropout = false, .tessera_block = true};
  const plan::Cluster cluster = plan::Cluster::from_json(
      {{"name", "test"}, {"devices_per_node", 8}, {"device_memory_gib", 80}, {"peak_tflops", 1},
       {"memory_bandwidth_gbps", 10}, {"intra_node", {{"bandwidth_gbps", 10}, {"latency_us", 5}}},
       {"inter_node", {{"bandwidth_gbps", 10}, {"latency_us", 5}}}, {"gemm_efficiency", {{1.0, 0.5}}}});
  for (int dp : {2, 4})
    for (int z : {0, 1, 2, 3}) {
      CAPTURE(dp);
      CAPTURE(z);
      const Peaks got = measure(cfg, dp, zero_stage(z));
      const plan::Layout l{.dp = dp, .tp = 1, .pp = 1, .microbatch_size = 2, .num_microbatches = 1,
                           .zero_stage = z, .zero3_unit_layers = 0,
                           .dp_first_bucket_bytes = std::size_t{1} << 20};  // DataParallel's first bucket
      const plan::Plan p = plan::Plan::predict(spec, cluster, l, plan::Precision::float32_adamw());
      const double P = spec.parameters();  // (ZeRO-3 frees the values, so got.params counts the tied embedding only)
      std::printf("dp %d ZeRO-%d: bytes/param measured params %.3f grads %.3f optimizer %.3f comm %.3f; "
                  "predicted %.3f %.3f %.3f buffers %.3f\n",
                  dp, z, got.parameters / P, got.gradients / P, got.optimizer_state / P, got.comm_buffers / P,
                  p.memory.parameters / P, p.memory.gradients / P, p.memory.optimizer_state / P, p.memory.buffers / P);
      if (z < 3) CHECK(static_cast<double>(got.params) == P);
      CHECK(p.memory.parameters == doctest::Approx(got.parameters).epsilon(1e-9));
      CHECK(p.memory.gradients == doctest::Approx(got.gradients).epsilon(0.02));
      CHECK(p.memory.optimizer_state == doctest::Approx(got.optimizer_state).epsilon(0.02));
      // ZeRO-2's bucket buffers (the whole gradient during backward) and the tied embedding's own
      // gradient: what the planner adds to the buffers of the same layout without ZeRO.
      // ZeRO-3: the gathered unit (here the whole model: tessera's DataParallel gathers it
      // before each forward and backward) and the unit's gradient buckets during backward,
      // 4 + 4 bytes per parameter.
      if (z >= 2) {
        plan::Layout l0 = l;
        l0.zero_stage = 0;
        const plan::Plan p0 = plan::Plan::predict(spec, cluster, l0, plan::Precision::float32_adamw());
        CHECK(p.memory.buffers - p0.memory.buffers == doctest::Approx(got.comm_buffers).epsilon(0.02));
      }
    }
}
