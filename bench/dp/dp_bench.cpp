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

#include "dp_bench_model.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"

namespace {

using namespace tessera;
using namespace dp_bench;

// Seconds per step of DataParallel on `n` thread ranks (the slowest rank's).
double dp_step(int n, const DataParallelOptions& o, int steps, int warmup) {
  const std::vector<double> per_rank =
      threads::run(n, [&](Comm& world) { return dp_bench::dp_step_seconds(world, o, steps, warmup); });
  return *std::max_element(per_rank.begin(), per_rank.end());
}

// Seconds of one all_reduce of the model's gradient on n thread ranks (the slowest rank's).
double allreduce_time(int n, int steps, int warmup) {
  const std::vector<double> per_rank =
      threads::run(n, [&](Comm& world) { return dp_bench::all_reduce_seconds(world, steps, warmup); });
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
