// Parameter-server step time: synchronous against stale-synchronous parallel (SSP) with
// staleness 1, 2 and 4, on the threads backend (1 server, 4 workers), in one run.
//
// Each worker's "compute" is a sleep, so the figures measure synchronization, not how 5 threads
// share the cores: every worker needs `base` ms per step, and
//   - balanced:  nobody is slower;
//   - one slow:  worker 0 needs 4 x base every step (a slower machine);
//   - straggler: at step t, worker t mod 4 needs an extra 8 x base (a transient hiccup that
//                moves around: garbage collection, a noisy neighbour).
// A real gradient (linear regression, 8 features) is pushed and pulled each step, and the
// final loss is printed, so every mode also shows it still trains.
//
// Checks (no timing target: the figures are read against docs/parameter_server.md): every run
// trains (worker 0's final full-data loss finite and below 1% of the untrained model's; enough
// steps are needed, 40 by default), and the staleness the server saw stays within the bound
// (0 for sync, s for SSP s). Exit status: 0 when every check passes, 2 when one fails.
//
// Run: OPENBLAS_NUM_THREADS=1 build/bench/ps/ps_bench [steps] [base_ms] [rounds]

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "tessera/core/random.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/ps/parameter_server.hpp"
#include "tessera/testing/run_ranks.hpp"

namespace {

using namespace tessera;
using Clock = std::chrono::steady_clock;

enum class Scenario { balanced, one_slow, straggler };

struct Result {
  double seconds = 0;     // worker: wall time of its steps
  double final_loss = 0;  // worker 0: full-data loss after its last pull
  double initial_loss = 0;  // worker 0: full-data loss of the untrained model
  std::int64_t max_staleness = 0;
};

constexpr int kWorkers = 4, kFeatures = 8, kRows = 128;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double sleep_ms(Scenario sc, int w, int t, double base) {
  switch (sc) {
    case Scenario::balanced: return base;
    case Scenario::one_slow: return w == 0 ? 4 * base : base;
    case Scenario::straggler: return t % kWorkers == w ? 9 * base : base;
  }
  return base;
}

Result run_one(Comm& world, Scenario sc, ParameterServerMode mode, int s, int steps, double base) {
  Tensor<float> x = Tensor<float>::empty(Shape{kRows, kFeatures}), wstar = Tensor<float>::empty(Shape{kFeatures, 1});
  fill_normal(x, 1, "x", 1.0);
  fill_normal(wstar, 2, "w", 1.0);
  Tensor<float> y(Shape{kRows, 1});
  for (std::int64_t i = 0; i < kRows; ++i)
    for (std::int64_t k = 0; k < kFeatures; ++k) y(i, 0) += x(i, k) * wstar(k, 0);
  nn::Linear<float> lin(kFeatures, 1);
  ParameterServer<float> ps(world, lin.parameters(), {.num_servers = 1, .mode = mode, .staleness = s});
  Result r;
  if (ps.is_server()) {
    optim::SGD<float> opt(ps.shard_parameters(), {.lr = 0.2});
    r.max_staleness = ps.serve(opt).max_staleness;
    return r;
  }
  auto full_loss = [&] {
    auto [pred, ctx] = lin.forward(x);
    double loss = 0;
    for (std::int64_t i = 0; i < kRows; ++i) {
      const double e = pred(i, 0) - y(i, 0);
      loss += 0.5 * e * e / kRows;
    }
    return loss;
  };
  r.initial_loss = full_loss();
  const int w = ps.worker_index();
  const std::int64_t lo = kRows * w / kWorkers, hi = kRows * (w + 1) / kWorkers;
  const auto t0 = Clock::now();
  for (int t = 0; t < steps; ++t) {
    lin.parameters().zero_grad();
    auto [pred, ctx] = lin.forward(x.slice(0, lo, hi));
    Tensor<float> dy = pred.clone();
    dy.add_(y.slice(0, lo, hi), -1.0f);
    lin.backward(dy, ctx);
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(sleep_ms(sc, w, t, base)));
    ps.step(lin, hi - lo);
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  ps.finish();
  r.final_loss = full_loss();
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 40;
  const double base = argc > 2 ? std::atof(argv[2]) : 2.0;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 5;
  std::printf("parameter server, threads backend: 1 server + %d workers, %d steps, compute %.1f ms/step "
              "(a sleep); median of %d rounds, the configurations interleaved in each round\n\n",
              kWorkers, steps, base, rounds);
  const std::pair<Scenario, const char*> scenarios[] = {
      {Scenario::balanced, "balanced"}, {Scenario::one_slow, "one slow"}, {Scenario::straggler, "straggler"}};
  const int staleness[] = {-1, 1, 2, 4};  // -1: sync
  constexpr int ns = 3, nm = 4;
  std::vector<double> wall[ns][nm];
  std::int64_t stale[ns][nm] = {};
  double loss[ns][nm] = {};
  bool trained[ns][nm];
  for (auto& row : trained)
    for (bool& b : row) b = true;
  for (int round = 0; round < rounds; ++round)
    for (int i = 0; i < ns; ++i)
      for (int j = 0; j < nm; ++j) {
        const int s = staleness[j];
        const ParameterServerMode mode = s < 0 ? ParameterServerMode::sync : ParameterServerMode::async;
        const auto rs = testing::run_ranks(kWorkers + 1, [&](Comm& w) {
          return run_one(w, scenarios[i].first, mode, std::max(s, 0), steps, base);
        });
        double t = 0;
        for (int w = 0; w < kWorkers; ++w) t = std::max(t, rs[static_cast<std::size_t>(w)].seconds);
        wall[i][j].push_back(t);
        stale[i][j] = std::max(stale[i][j], rs[kWorkers].max_staleness);
        loss[i][j] = std::max(loss[i][j], rs[0].final_loss);
        // NaN-safe: a non-finite loss is not below anything.
        trained[i][j] = trained[i][j] && std::isfinite(rs[0].final_loss) && rs[0].final_loss <= 0.01 * rs[0].initial_loss;
      }
  std::printf("%-10s %-9s %12s %12s %10s %10s %12s  %s\n", "scenario", "mode", "wall (s)", "ms / step", "vs sync",
              "max stale", "final loss", "check");
  int failed = 0;
  for (int i = 0; i < ns; ++i) {
    const double sync_wall = median(wall[i][0]);
    for (int j = 0; j < nm; ++j) {
      const double t = median(wall[i][j]);
      const std::string label = staleness[j] < 0 ? "sync" : "ssp s=" + std::to_string(staleness[j]);
      const bool within_bound = stale[i][j] <= std::max(staleness[j], 0);
      const bool ok = within_bound && trained[i][j];
      failed += ok ? 0 : 1;
      std::printf("%-10s %-9s %12.3f %12.2f %9.2fx %10lld %12.2e  %s\n", scenarios[i].second, label.c_str(), t,
                  1e3 * t / steps, sync_wall / t, static_cast<long long>(stale[i][j]), loss[i][j],
                  ok ? "ok" : !within_bound ? "FAILED: staleness above the bound" : "FAILED: did not train");
    }
  }
  std::printf("\ncheck: every run trains (final loss <= 1%% of the initial) and stays within its staleness bound: %s\n",
              failed == 0 ? "ok" : "FAILED");
  return failed == 0 ? 0 : 2;
}
