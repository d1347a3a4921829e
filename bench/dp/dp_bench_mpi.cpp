// DataParallel step time on the MPI backend, one rank per process: the model and loop of
// dp_bench_model.hpp (MLP 4 x (Linear(1024, 1024) + ReLU), batch 64 per rank, SGD, 1 BLAS thread
// per rank), default buckets with overlap, and one all_reduce of the model's gradient bytes.
// Rank 0 prints "tessera mpi_dp<N> <round> <ms per step>" and "tessera mpi_allreduce<N> ...".
// bench/dp/run_dp_bench.sh runs it under mpirun -np 2 beside the threads backend and PyTorch.
//
// Run: mpirun -np 2 -x OPENBLAS_NUM_THREADS=1 build/bench/dp/dp_bench_mpi [--steps 20] [--round 0]

#include <CLI/CLI.hpp>

#include <cstdio>

#include "dp_bench_model.hpp"
#include "tessera/mpi.hpp"

int main(int argc, char** argv) {
  CLI::App app{"DataParallel step time on the MPI backend (run under mpirun)"};
  int steps = 20, warmup = 3, round = 0;
  app.add_option("--steps", steps, "timed steps");
  app.add_option("--warmup", warmup, "untimed steps before them");
  app.add_option("--round", round, "round number to print");
  CLI11_PARSE(app, argc, argv);
  return tessera::mpi::run(argc, argv, [&](tessera::Comm& world) {
    const double step = dp_bench::dp_step_seconds(world, {}, steps, warmup);
    const double ar = dp_bench::all_reduce_seconds(world, steps, warmup);
    double slowest[2] = {step, ar};
    world.iall_reduce(std::span<double>(slowest, 2), tessera::ReduceOp::max).wait();
    if (world.rank() == 0) {
      std::printf("tessera mpi_dp%d %d %.4f\n", world.size(), round, slowest[0] * 1e3);
      std::printf("tessera mpi_allreduce%d %d %.4f\n", world.size(), round, slowest[1] * 1e3);
      std::fflush(stdout);
    }
  });
}
