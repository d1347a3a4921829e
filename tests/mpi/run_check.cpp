// A program started through tessera::mpi::run, for the tests of run() itself
// (tests/mpi/meson.build): with no argument every rank returns normally (exit code 0); with
// argument K, rank K throws after a collective and the job must be aborted (non-zero exit
// code, "rank K of N failed" on stderr) instead of the other ranks hanging in a barrier.
// With "skip K": rank K skips an all_reduce (timeout 0.5 s) and sleeps; the others' blocking
// all_reduce must be ended by the watchdog (message on stderr, non-zero exit) within seconds.
#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tessera/mpi.hpp"

int main(int argc, char** argv) {
  if (argc > 2 && std::string(argv[1]) == "skip") {
    const int skip_rank = std::atoi(argv[2]);
    return tessera::mpi::run(argc, argv, [&](tessera::Comm& world) {
      world.set_timeout(std::chrono::milliseconds(500));
      std::vector<float> x(1024, 1.0f);
      if (world.rank() == skip_rank) {
        std::this_thread::sleep_for(std::chrono::seconds(20));  // never calls the all_reduce
        return;
      }
      world.all_reduce(x);
    });
  }
  const int fail_rank = argc > 1 ? std::atoi(argv[1]) : -1;
  return tessera::mpi::run(argc, argv, [&](tessera::Comm& world) {
    if (world.all_reduce_value(1, tessera::ReduceOp::sum) != world.size())
      throw std::runtime_error("all_reduce_value(1) is not the world size");
    if (world.rank() == fail_rank) throw tessera::CommError("deliberate failure for the test", 42);
    world.barrier();  // with a failing rank, the others wait here until MPI_Abort ends them
  });
}
