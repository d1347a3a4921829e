// bench/zero: the largest GPT (in layers, at a fixed width) whose per-rank memory fits a fixed
// budget at dp ranks with ZeRO 0, 1, 2 and 3, measured by the MemoryTracker on real training
// steps (DataParallel over the threads backend, AdamW), and the ratio of each stage's size to
// ZeRO-0's. Two budgets are applied: to the model states (parameters + gradients + AdamW
// state, the ZeRO paper's accounting, Rajbhandari et al. SC 2020, Figure 1) and to the peak of
// everything tracked (the communication buffers too: ZeRO-2's bucket buffers, the all-gather
// buffers, ZeRO-3's gathered unit). Activations are not tracked and not counted.
//
// With --time-steps N: the step time of ZeRO-3 over plain DP at dp 2 and 4, prefetch on and
// off, the configurations interleaved in one run (median of N steps each after one warm-up).
//
//   zero_memory_bench --dp 4 --budget-mib 64 --d-model 128
//   zero_memory_bench --time-steps 20 --layers 4 --d-model 128
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "tessera/core/memory_tracker.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;

namespace {

struct Options {
  int dp = 4;
  double budget_mib = 64;
  int d_model = 128, heads = 4, vocab = 256, context = 16, max_layers = 256;
  int time_steps = 0, layers = 4, rows = 4;  // --time-steps: the step-time table instead
};

// Per-rank peaks (largest over the ranks) of two steps of a GPT of `layers` blocks.
struct Measured {
  double model_states = 0;  // bytes: peak parameters + gradients + optimizer state
  double total = 0;         // bytes: peak of everything tracked at one moment
  std::int64_t params = 0;  // parameters of the model
};

Measured measure(const Options& o, int layers, ZeroStage stage) {
  const GPTConfig cfg{.vocab_size = o.vocab, .n_positions = o.context, .n_layer = layers, .n_head = o.heads,
                      .d_model = o.d_model};
  auto per_rank = testing::run_ranks(o.dp, [&](Comm& c) {
    MemoryTracker& t = MemoryTracker::this_rank();
    DataParallel dp(GPT<float>(cfg, 1), c);
    std::int64_t n = 0;  // before ZeRO-3 frees the values
    for (const Parameter<float>& p : dp.parameters()) n += p.value.numel();
    DistributedOptimizer<optim::AdamW<float>> opt(dp, optim::AdamWOptions{.lr = 1e-4}, stage);
    nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});
    t.reset_peaks();
    for (int step = 0; step < 2; ++step) {
      Tensor<std::int32_t> x(Shape{1, o.context}), y(Shape{1, o.context});
      for (std::int64_t i = 0; i < o.context; ++i) {
        x(0, i) = static_cast<std::int32_t>((i * 7 + step + c.rank()) % o.vocab);
        y(0, i) = static_cast<std::int32_t>((i * 11 + 3) % o.vocab);
      }
      const double scale = dp.loss_scale(o.context);
      auto [logits, ctx] = dp.forward(x);
      auto [loss, lctx] = ce.forward(logits, y);
      dp.backward(ce.backward(static_cast<float>(scale), lctx), ctx);
      opt.step();
      dp.zero_grad();
    }
    return Measured{static_cast<double>(t.peak(MemoryCategory::parameters) + t.peak(MemoryCategory::gradients) +
                                        t.peak(MemoryCategory::optimizer_state)),
                    static_cast<double>(t.peak_total()), n};
  });
  Measured worst;
  for (const Measured& m : per_rank) {
    worst.model_states = std::max(worst.model_states, m.model_states);
    worst.total = std::max(worst.total, m.total);
    worst.params = m.params;
  }
  return worst;
}

// The largest layer count in [1, max_layers] whose `field` fits the budget (0: none), by
// bisection (memory grows with the layer count).
template <class F>
int largest_fitting(const Options& o, ZeroStage stage, F field, Measured& at) {
  const double budget = o.budget_mib * 1024 * 1024;
  int lo = 0, hi = o.max_layers + 1;  // lo fits (or is 0), hi does not
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    const Measured m = measure(o, mid, stage);
    if (field(m) <= budget) {
      lo = mid;
      at = m;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Median seconds per step (forward, backward, AdamW) of a GPT of o.layers blocks under
// DataParallel at `world` ranks and ZeRO stage `stage` (ZeRO-3 with or without prefetch), for
// configuration k of `configs`, all built at once and stepped in turn so that they see the
// same machine load. Returns one median per configuration.
struct TimedConfig {
  int world;
  ZeroStage stage;
  bool prefetch;
};
std::vector<double> time_configs(const Options& o, const std::vector<TimedConfig>& configs) {
  const GPTConfig cfg{.vocab_size = o.vocab, .n_positions = o.context, .n_layer = o.layers, .n_head = o.heads,
                      .d_model = o.d_model};
  std::vector<std::vector<double>> times(configs.size());
  for (int rep = 0; rep <= o.time_steps; ++rep)  // rep 0: warm-up
    for (std::size_t k = 0; k < configs.size(); ++k) {
      const TimedConfig& tc = configs[k];
      auto secs = testing::run_ranks(tc.world, [&](Comm& c) {
        DataParallel dp(GPT<float>(cfg, 1), c);
        DistributedOptimizer<optim::AdamW<float>> opt(dp, optim::AdamWOptions{.lr = 1e-4}, tc.stage);
        dp.buckets().set_prefetch(tc.prefetch);
        nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});
        Tensor<std::int32_t> x(Shape{o.rows, o.context}), y(Shape{o.rows, o.context});
        for (std::int64_t r = 0; r < o.rows; ++r)
          for (std::int64_t i = 0; i < o.context; ++i) {
            x(r, i) = static_cast<std::int32_t>((i * 7 + r + c.rank()) % o.vocab);
            y(r, i) = static_cast<std::int32_t>((i * 11 + 3) % o.vocab);
          }
        double last = 0;
        for (int step = 0; step < 2; ++step) {  // the first step learns the buckets' marks
          const auto t0 = std::chrono::steady_clock::now();
          const double scale = dp.loss_scale(o.rows * o.context);
          auto [logits, ctx] = dp.forward(x);
          auto [loss, lctx] = ce.forward(logits, y);
          dp.backward(ce.backward(static_cast<float>(scale), lctx), ctx);
          opt.step();
          dp.zero_grad();
          last = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
        return last;
      });
      if (rep > 0) times[k].push_back(*std::max_element(secs.begin(), secs.end()));
    }
  std::vector<double> med;
  for (auto& t : times) {
    std::sort(t.begin(), t.end());
    med.push_back(t[t.size() / 2]);
  }
  return med;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app("Largest GPT fitting a per-rank memory budget with ZeRO 0, 1, 2, 3 (MemoryTracker)");
  app.add_option("--dp", o.dp, "data-parallel ranks (threads)")->check(CLI::Range(1, 64));
  app.add_option("--budget-mib", o.budget_mib, "per-rank budget, MiB")->check(CLI::Range(0.1, 1e6));
  app.add_option("--d-model", o.d_model, "model width")->check(CLI::Range(8, 4096));
  app.add_option("--heads", o.heads, "attention heads")->check(CLI::Range(1, 64));
  app.add_option("--vocab", o.vocab, "vocabulary")->check(CLI::Range(2, 1 << 20));
  app.add_option("--context", o.context, "sequence length")->check(CLI::Range(1, 4096));
  app.add_option("--max-layers", o.max_layers, "largest layer count tried")->check(CLI::Range(1, 4096));
  app.add_option("--time-steps", o.time_steps, "instead: median step time of N steps of ZeRO-3 over plain DP at dp 2 "
                 "and 4, prefetch on and off")->check(CLI::Range(0, 100000));
  app.add_option("--layers", o.layers, "--time-steps: GPT blocks")->check(CLI::Range(1, 4096));
  app.add_option("--rows", o.rows, "--time-steps: sequences per rank per step")->check(CLI::Range(1, 4096));
  CLI11_PARSE(app, argc, argv);

  if (o.time_steps > 0) {
    std::printf("step time, GPT %d layers d_model %d vocab %d, %d x %d tokens per rank; median of %d steps, "
                "configurations interleaved\n", o.layers, o.d_model, o.vocab, o.rows, o.context, o.time_steps);
    std::printf("%4s %12s %16s %16s %16s %14s\n", "dp", "plain ms", "ZeRO-3 pf ms", "ZeRO-3 no-pf ms", "ratio pf",
                "ratio no-pf");
    for (int world : {2, 4}) {
      const std::vector<double> t = time_configs(
          o, {{world, ZeroStage::none, true}, {world, ZeroStage::parameters, true}, {world, ZeroStage::parameters, false}});
      std::printf("%4d %12.2f %16.2f %16.2f %16.3f %14.3f\n", world, 1e3 * t[0], 1e3 * t[1], 1e3 * t[2], t[1] / t[0],
                  t[2] / t[0]);
    }
    return 0;
  }

  std::printf("dp %d, budget %.1f MiB per rank, GPT d_model %d, vocab %d, context %d; fp32 AdamW\n", o.dp,
              o.budget_mib, o.d_model, o.vocab, o.context);
  std::printf("%-6s %-28s %7s %12s %10s %12s %8s\n", "ZeRO", "budget applied to", "layers", "parameters",
              "B/param", "peak MiB", "ratio");
  for (int which = 0; which < 2; ++which) {
    double base = 0;
    for (ZeroStage stage : {ZeroStage::none, ZeroStage::optimizer, ZeroStage::gradients, ZeroStage::parameters}) {
      Measured at;
      auto field = [which](const Measured& m) { return which == 0 ? m.model_states : m.total; };
      const int layers = largest_fitting(o, stage, field, at);
      const double size = static_cast<double>(at.params);
      if (stage == ZeroStage::none) base = size;
      std::printf("%-6d %-28s %7d %12lld %10.2f %12.2f %8.2f\n", static_cast<int>(stage),
                  which == 0 ? "params+grads+AdamW state" : "everything tracked", layers,
                  static_cast<long long>(at.params), size > 0 ? field(at) / size : 0.0, field(at) / (1024.0 * 1024.0),
                  base > 0 ? size / base : 0.0);
    }
  }
  std::printf("paper (model states, fp32 AdamW, Nd = %d): ZeRO-1 16/(8+8/Nd) = %.2f, ZeRO-2 16/(4+12/Nd) = %.2f, "
              "ZeRO-3 16/(16/Nd) = %d (parameter ratios at a fixed budget, embeddings aside)\n",
              o.dp, 16.0 / (8.0 + 8.0 / o.dp), 16.0 / (4.0 + 12.0 / o.dp), o.dp);
  return 0;
}
