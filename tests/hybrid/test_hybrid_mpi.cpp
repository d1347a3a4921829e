// Hybrid on real processes (mpirun -np 2 and 4, see tests/hybrid/meson.build): every (dp, pp,
// tp) layout of the MPI world trains the reference GPT for 20 steps and matches the
// single-rank run computed in each process. Each rank checks its own results; the doctest main
// (tests/mpi/mpi_test_main.cpp) sums the failures of all ranks.
#include <doctest/doctest.h>

#include "hybrid/hybrid_bodies.hpp"
#include "tessera/mpi.hpp"

using namespace tessera;
using namespace hybrid_test;

TEST_CASE("Hybrid under MPI: every layout of the world equals the single-rank run") {
  Comm world = mpi::world();
  const Setup s;
  const Reference ref = serial_reference(s);
  for (const Variant& v : variants_for(world.size())) {
    CAPTURE(v.describe());
    const Outcome o = run_variant(world, s, v, ref);
    CHECK(o.worst_loss < 1e-5);
    CHECK(o.worst_norm < 1e-4);
    CHECK(o.worst_param < 2e-4);
    CHECK(o.copies_equal);
  }
}
