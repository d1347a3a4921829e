// A program started through tessera::mpi::run, for the tests of run() itself
// (tests/mpi/meson.build): with no argument every rank returns normally (exit code 0); with
// argument K, rank K throws after a collective and the job must be aborted (non-zero exit
// code, "rank K of N failed" on stderr) instead of the other ranks hanging in a barrier.
#include <cstdlib>
#include <stdexcept>

#include "tessera/mpi.hpp"

int main(int argc, char** argv) {
  const int fail_rank = argc > 1 ? std::atoi(argv[1]) : -1;
  return tessera::mpi::run(argc, argv, [&](tessera::Comm& world) {
    if (world.all_reduce_value(1, tessera::ReduceOp::sum) != world.size())
      throw std::runtime_error("all_reduce_value(1) is not the world size");
    if (world.rank() == fail_rank) throw tessera::CommError("deliberate failure for the test", 42);
    world.barrier();  // with a failing rank, the others wait here until MPI_Abort ends them
  });
}
