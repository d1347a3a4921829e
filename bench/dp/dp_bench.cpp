// DataParallel step time on the threads backend: an MLP of 4 x (Linear(1024, 1024) + ReLU),
// batch 64 per rank, SGD, 1 BLAS thread per rank. Configurations (run interleaved, round by
// round, so that machine noise hits all alike):
//   serial          the bare model on one thread (no DataParallel)
//   dp1             DataParallel on 1 rank (no communication)
//   dp2             2 ranks, default buckets (25 MiB, first 1 MiB), overlap_grad_reduce on
//   dp2_per_param   2 ranks, one all-reduce per parameter (bucket_size 0), overlap on
//   dp2_no_overlap  2 ranks, default buckets, every bucket reduced after backward
//   allreduce2      2 ranks, one all_reduce of the model's gradient bytes alone
// Prints one line per configuration and round: "tessera <config> <round> <ms per step>".
// bench/dp/run_dp_bench.sh runs it beside PyTorch DDP and prints the table with ratios.
//
// Run: OPENBLAS_NUM_THREADS=1 build/bench/dp/dp_bench [--rounds 5] [--steps 20] [--warmup 3]

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "tessera/tessera.hpp"
#include "tessera/parallel/data_parallel.hpp"

namespace {

using namespace tessera;
using Clock = std::chrono::steady_clock;

constexpr std::int64_t width = 1024, batch = 64, depth = 4;

// y = max(x, 0).
struct ReLU {
  static Tensor<float> forward(const Tensor<float>& x) {
    Tensor<float> y = Tensor<float>::empty(x.shape());
    const float* a = x.data();
    float* b = y.data();
    for (std::int64_t i = 0; i < x.numel(); ++i) b[i] = a[i] > 0 ? a[i] : 0.0f;
    return y;
  }
  // dx = dy where the output was positive (dy is consumed in place).
  static Tensor<float> backward(Tensor<float> dy, const Tensor<float>& y) {
    float* g = dy.data();
    const float* o = y.data();
    for (std::int64_t i = 0; i < dy.numel(); ++i)
      if (o[i] <= 0) g[i] = 0;
    return dy;
  }
};

// 4 x (Linear(1024, 1024) + ReLU): a user-defined Layer.
class Mlp {
 public:
  using Input = Tensor<float>;
  struct Context {
    std::vector<nn::Linear<float>::Context> linear;
    std::vector<Tensor<float>> relu_out;
  };
  explicit Mlp(std::uint64_t seed) {
    for (std::int64_t i = 0; i < depth; ++i)
      layers_.emplace_back(width, width, nn::LayerInit{.prefix = "fc" + std::to_string(i), .seed = seed, .std = 0.03});
  }
  ForwardResult<Tensor<float>, Context> forward(const Tensor<float>& x) const {
    Context c;
    Tensor<float> h = x;
    for (const auto& l : layers_) {
      auto [y, lc] = l.forward(h);
      c.linear.push_back(std::move(lc));
      h = ReLU::forward(y);
      c.relu_out.push_back(h);
    }
    return {std::move(h), std::move(c)};
  }
  Tensor<float> backward(const Tensor<float>& dy, const Context& c) {
    Tensor<float> g = dy.clone();
    for (std::size_t i = layers_.size(); i-- > 0;) g = layers_[i].backward(ReLU::backward(g, c.relu_out[i]), c.linear[i]);
    return g;
  }
  ParameterList<float> parameters() {
    ParameterList<float> ps;
    for (auto& l : layers_) ps.append(l.parameters());
    return ps;
  }

 private:
  std::vector<nn::Linear<float>> layers_;
};

// Loss 0.5 * sum (y - t)^2 * scale: its gradient (y - t) * scale.
Tensor<float> loss_grad(const Tensor<float>& y, const Tensor<float>& t, float scale) {
  Tensor<float> g = Tensor<float>::empty(y.shape());
  for (std::int64_t i = 0; i < y.numel(); ++i) g.data()[i] = (y.data()[i] - t.data()[i]) * scale;
  return g;
}

Tensor<float> random(const Shape& s, std::uint64_t seed, const char* name) {
  Tensor<float> t = Tensor<float>::empty(s);
  fill_normal(t, seed, name, 1.0);
  return t;
}

// Seconds per step of the bare model on this thread.
double serial_step(int steps, int warmup) {
  Mlp model(1);
  optim::SGD<float> opt(model.parameters(), {.lr = 1e-3});
  const Tensor<float> x = random(Shape{batch, width}, 2, "x"), t = random(Shape{batch, width}, 3, "t");
  Clock::time_point t0;
  for (int s = 0; s < warmup + steps; ++s) {
    if (s == warmup) t0 = Clock::now();
    auto [y, ctx] = model.forward(x);
    model.backward(loss_grad(y, t, 1.0f / batch), ctx);
    opt.step();
    model.parameters().zero_grad();
  }
  return std::chrono::duration<double>(Clock::now() - t0).count() / steps;
}

// Seconds per step of DataParallel on `n` thread ranks (the slowest rank's).
double dp_step(int n, const DataParallelOptions& o, int steps, int warmup) {
  const std::vector<double> per_rank = threads::run(n, [&](Comm& world) {
    DataParallel dp(Mlp(1), world, o);
    optim::SGD<float> opt(dp.parameters(), {.lr = 1e-3});
    const Tensor<float> x = random(Shape{batch, width}, 2 + static_cast<std::uint64_t>(world.rank()), "x");
    const Tensor<float> t = random(Shape{batch, width}, 3, "t");
    Clock::time_point t0;
    for (int s = 0; s < warmup + steps; ++s) {
      if (s == warmup) {
        world.barrier();
        t0 = Clock::now();
      }
      const float scale = static_cast<float>(dp.loss_scale(batch));
      auto [y, ctx] = dp.forward(x);
      dp.backward(loss_grad(y, t, scale), ctx);
      opt.step();
      dp.zero_grad();
    }
    world.barrier();
    return std::chrono::duration<double>(Clock::now() - t0).count() / steps;
  });
  return *std::max_element(per_rank.begin(), per_rank.end());
}

// Seconds of one all_reduce of the model's gradient (4 x (1024^2 + 1024) floats) on n ranks.
double allreduce_time(int n, int steps, int warmup) {
  const std::vector<double> per_rank = threads::run(n, [&](Comm& world) {
    std::vector<float> g(static_cast<std::size_t>(depth * (width * width + width)), 1.0f);
    Clock::time_point t0;
    for (int s = 0; s < warmup + steps; ++s) {
      if (s == warmup) {
        world.barrier();
        t0 = Clock::now();
      }
      world.iall_reduce(g).wait();
    }
    return std::chrono::duration<double>(Clock::now() - t0).count() / steps;
  });
  return *std::max_element(per_rank.begin(), per_rank.end());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"DataParallel step time on the threads backend (MLP 4 x Linear(1024, 1024) + ReLU, batch 64 per rank)"};
  int rounds = 5, steps = 20, warmup = 3;
  app.add_option("--rounds", rounds, "rounds over all configurations (interleaved)");
  app.add_option("--steps", steps, "timed steps per configuration and round");
  app.add_option("--warmup", warmup, "untimed steps before them");
  CLI11_PARSE(app, argc, argv);

  const char* blas = std::getenv("OPENBLAS_NUM_THREADS");
  if (blas == nullptr || std::strcmp(blas, "1") != 0)
    std::printf("# warning: OPENBLAS_NUM_THREADS is %s, not 1: ranks fight over the cores\n", blas ? blas : "unset");

  const DataParallelOptions defaults{};
  const DataParallelOptions per_param{.bucket_size = 0, .first_bucket_size = 0};
  const DataParallelOptions no_overlap{.overlap_grad_reduce = false};
  for (int r = 0; r < rounds; ++r) {
    const std::pair<const char*, double> rows[] = {
        {"serial", serial_step(steps, warmup)},
        {"dp1", dp_step(1, defaults, steps, warmup)},
        {"dp2", dp_step(2, defaults, steps, warmup)},
        {"dp2_per_param", dp_step(2, per_param, steps, warmup)},
        {"dp2_no_overlap", dp_step(2, no_overlap, steps, warmup)},
        {"allreduce2", allreduce_time(2, steps, warmup)},
    };
    for (const auto& [name, sec] : rows) std::printf("tessera %s %d %.4f\n", name, r, sec * 1e3);
    std::fflush(stdout);
  }
  return 0;
}
