// A first tessera program: start 4 ranks on the threads backend, lay them out on a 2 x 2 mesh
// (dp x tp), and run the collectives a training step uses. Only rank 0 prints.
//
//   ./build/examples/collectives_demo            (threads backend, no launcher)
//
// Switching to MPI changes one line: tessera::mpi::run(argc, argv, program) under mpirun.
#include <cstdio>
#include <numeric>
#include <vector>

#include "example_main.hpp"
#include "tessera/tessera.hpp"

int run() {
  auto program = [](tessera::Comm& world) {
    tessera::Mesh mesh(world, tessera::MeshShape{.dp = 2, .tp = 2});

    // Each rank holds a "gradient" of 6 values; data parallelism averages them over dp.
    std::vector<float> grad(6);
    std::iota(grad.begin(), grad.end(), static_cast<float>(10 * world.rank()));
    mesh.dp().all_reduce(grad, tessera::ReduceOp::avg);

    // Tensor parallelism gathers each tp rank's shard of an activation.
    std::vector<float> shard{static_cast<float>(mesh.coord().tp), 0.5f};
    std::vector<float> full(shard.size() * static_cast<std::size_t>(mesh.tp().size()));
    mesh.tp().all_gather(shard, full);

    // A control decision every rank must agree on (e.g. "is the loss finite?").
    const double worst = world.all_reduce_value(static_cast<double>(world.rank()), tessera::ReduceOp::max);

    if (world.rank() == 0) {
      std::printf("world of %d ranks on a dp(%d) x pp(%d) x tp(%d) mesh\n", world.size(), mesh.shape().dp,
                  mesh.shape().pp, mesh.shape().tp);
      std::printf("dp-averaged gradient on rank 0:");
      for (float g : grad) std::printf(" %.1f", static_cast<double>(g));
      std::printf("\ntp-gathered activation on rank 0:");
      for (float a : full) std::printf(" %.1f", static_cast<double>(a));
      std::printf("\nlargest rank seen by every rank: %.0f\n", worst);
    }
  };
  tessera::threads::run(4, program);
  return 0;
}

int main(int argc, char** argv) {
  return examples::run_example(
      argc, argv,
      "4 thread ranks on a 2 x 2 (dp x tp) mesh run the collectives a training step uses: a dp average,"
      " a tp all-gather and a maximum over the world.",
      run);
}
