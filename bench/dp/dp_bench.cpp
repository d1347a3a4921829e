// DataParallel step time on the threads backend: an MLP of 4 x (Linear(1024, 1024) + ReLU),
// batch 64 per rank, SGD, 1 BLAS thread per rank. Configurations (run interleaved, round by
// round, so that machine noise hits all alike):
//   serial          the bare model on one thread (no DataParallel)
//   dp1             DataParallel on 1 rank (no communication)
//   dp2             2 ranks, default buckets (25 MiB, first 1 MiB), overlap_grad_reduce on
//   dp2_per_param   2 ranks, one all-reduce per parameter (bucket_size 0), overlap on
//   dp2_no_overlap  2 ranks, default buckets, every bucket reduced after backward
//   allreduce2      2 ranks, one all_reduce of the model's gradient bytes alone
// Prints one line per configuration and round: "tessera <config> <round> <ms per step>", and for
// each DataParallel run the check of what it computed:
//   "check tessera <config> <round> <update error> <replicas equal: 1|0> <ok|FAILED>"
// where the update error is that of the parameters' change over the run against the bare model
// trained on the global batch (dp_bench_model.hpp), and every replica must hold the same bits.
// Exits 2 when any check failed, else 0 (the targets are evaluated by bench/dp/run_dp_bench.sh,
// which runs it beside PyTorch DDP and prints the table with ratios).
//
// Run: OPENBLAS_NUM_THREADS=1 build/bench/dp/dp_bench [--rounds 5] [--steps 20] [--warmup 3]

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "dp_bench_model.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"

namespace {

using namespace tessera;
using namespace dp_bench;

// DataParallel on `n` thread ranks: the slowest rank's seconds per step, and whether the run did
// what it should (see check_line).
struct DpRow {
  double seconds = 0;
  double update_error = 0;      // rank 0's update against the serial reference's
  bool replicas_equal = false;  // every rank's parameters bitwise equal to rank 0's (and finite)
  bool ok() const { return update_error <= update_tolerance && replicas_equal; }
};

DpRow dp_step(int n, const DataParallelOptions& o, int steps, int warmup, const RunResult& reference,
              const std::vector<float>& init) {
  const std::vector<RunResult> per_rank =
      threads::run(n, [&](Comm& world) { return dp_bench::dp_run(world, o, steps, warmup); });
  DpRow row;
  row.replicas_equal = true;
  for (const RunResult& r : per_rank) {
    row.seconds = std::max(row.seconds, r.seconds);
    row.replicas_equal = row.replicas_equal && testing::bitwise_equal_finite(std::span<const float>(r.params),
                                                                             std::span<const float>(per_rank[0].params));
  }
  row.update_error = update_error(per_rank[0].params, reference.params, init);
  return row;
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
  // The reference of the 2-rank runs: the bare model trained on both ranks' inputs (untimed).
  const std::vector<float> init = initial_params();
  const RunResult reference2 = serial_run(2, steps, warmup);
  int failed = 0;
  for (int r = 0; r < rounds; ++r) {
    const RunResult serial = serial_run(1, steps, warmup);  // also the reference of dp1
    const std::pair<const char*, DpRow> rows[] = {
        {"dp1", dp_step(1, defaults, steps, warmup, serial, init)},
        {"dp2", dp_step(2, defaults, steps, warmup, reference2, init)},
        {"dp2_per_param", dp_step(2, per_param, steps, warmup, reference2, init)},
        {"dp2_no_overlap", dp_step(2, no_overlap, steps, warmup, reference2, init)},
    };
    const double allreduce = allreduce_time(2, steps, warmup);
    std::printf("tessera serial %d %.4f\n", r, serial.seconds * 1e3);
    for (const auto& [name, row] : rows) std::printf("tessera %s %d %.4f\n", name, r, row.seconds * 1e3);
    std::printf("tessera allreduce2 %d %.4f\n", r, allreduce * 1e3);
    for (const auto& [name, row] : rows) {
      std::printf("check tessera %s %d %.3e %d %s\n", name, r, row.update_error, row.replicas_equal ? 1 : 0,
                  row.ok() ? "ok" : "FAILED");
      failed += row.ok() ? 0 : 1;
    }
    std::fflush(stdout);
  }
  if (failed > 0) {
    std::printf("# dp_bench: %d DataParallel runs FAILED the check (updates against the serial model on the global "
                "batch within %.0e, replicas bitwise equal)\n",
                failed, update_tolerance);
    return 2;
  }
  return 0;
}
