// DataParallel step time on the MPI backend, one rank per process: the model and loop of
// dp_bench_model.hpp (MLP 4 x (Linear(1024, 1024) + ReLU), batch 64 per rank, SGD, 1 BLAS thread
// per rank), default buckets with overlap, and one all_reduce of the model's gradient bytes.
// Rank 0 prints "tessera mpi_dp<N> <round> <ms per step>" and "tessera mpi_allreduce<N> ...",
// and the check of the DataParallel run (as dp_bench does):
//   "check tessera mpi_dp<N> <round> <update error> <replicas equal: 1|0> <ok|FAILED>"
// where every rank trains the bare model on the global batch (untimed) as the reference of its
// update, and every rank's parameters must equal rank 0's bit for bit. Every process exits 2
// when the check failed (so mpirun does), else 0.
// bench/dp/run_dp_bench.sh runs it under mpirun -np 2 beside the threads backend and PyTorch.
//
// Run: mpirun -np 2 -x OPENBLAS_NUM_THREADS=1 build/bench/dp/dp_bench_mpi [--steps 20] [--round 0]

#include <CLI/CLI.hpp>

#include <cstdio>
#include <span>
#include <vector>

#include "dp_bench_model.hpp"
#include "tessera/mpi.hpp"

int main(int argc, char** argv) {
  CLI::App app{"DataParallel step time on the MPI backend (run under mpirun)"};
  int steps = 20, warmup = 3, round = 0;
  app.add_option("--steps", steps, "timed steps");
  app.add_option("--warmup", warmup, "untimed steps before them");
  app.add_option("--round", round, "round number to print");
  CLI11_PARSE(app, argc, argv);
  int status = 0;
  tessera::mpi::run(argc, argv, [&](tessera::Comm& world) {
    const dp_bench::RunResult run = dp_bench::dp_run(world, {}, steps, warmup);
    const double ar = dp_bench::all_reduce_seconds(world, steps, warmup);
    double slowest[2] = {run.seconds, ar};
    world.iall_reduce(std::span<double>(slowest, 2), tessera::ReduceOp::max).wait();

    // The check (untimed): this rank's update against the serial model on the global batch, and
    // this rank's parameters against rank 0's.
    const dp_bench::RunResult reference = dp_bench::serial_run(world.size(), steps, warmup);
    std::vector<float> rank0 = run.params;
    world.broadcast(std::span<float>(rank0), 0);
    const bool equal = tessera::testing::bitwise_equal_finite(std::span<const float>(run.params), std::span<const float>(rank0));
    // The worst rank's error (+inf stays +inf under max) and 1 if any rank differs from rank 0.
    double worst[2] = {dp_bench::update_error(run.params, reference.params, dp_bench::initial_params()), equal ? 0.0 : 1.0};
    world.iall_reduce(std::span<double>(worst, 2), tessera::ReduceOp::max).wait();
    const bool ok = worst[0] <= dp_bench::update_tolerance && worst[1] == 0.0;
    if (world.rank() == 0) {
      std::printf("tessera mpi_dp%d %d %.4f\n", world.size(), round, slowest[0] * 1e3);
      std::printf("tessera mpi_allreduce%d %d %.4f\n", world.size(), round, slowest[1] * 1e3);
      std::printf("check tessera mpi_dp%d %d %.3e %d %s\n", world.size(), round, worst[0], worst[1] == 0.0 ? 1 : 0,
                  ok ? "ok" : "FAILED");
      std::fflush(stdout);
    }
    status = ok ? 0 : 2;
  });
  return status;
}
