// The pipeline bodies of pipe_bodies.hpp on MPI processes: the world communicator is the
// pipeline (pp = number of processes). Run under mpirun -np 2, 3, 4 (tests/pipe/meson.build);
// every process asserts on its own report.
#include <doctest/doctest.h>

#include "pipe_bodies.hpp"
#include "tessera/mpi.hpp"

namespace pb = pipe_bodies;
using tessera::PipelineScheduleKind;

TEST_CASE("PipelineParallel over MPI: 5 steps of GPipe, 1F1B and interleaved 1F1B for m 1..8 equal 5 serial steps") {
  tessera::Comm world = tessera::mpi::world();
  const int pp = world.size();
  for (auto kind : {PipelineScheduleKind::gpipe, PipelineScheduleKind::one_f_one_b})
    for (int m = 1; m <= 8; ++m) pb::check_equivalence(pb::gpt_equivalence_body(world, kind, m));
  for (int m = 1; m <= 8; ++m)
    if (m >= pp && (m % pp == 0 || m % pp >= pp))
      pb::check_equivalence(pb::gpt_equivalence_body(world, PipelineScheduleKind::interleaved_one_f_one_b, m, 2), 2);
}

TEST_CASE("PipelineParallel over MPI: C5, 2 stages x 2 micro-batches x 2 accumulation steps equal 1 stage x 4 micro-batches") {
  tessera::Comm world = tessera::mpi::world();
  if (world.size() != 2) return;  // the case is defined for a 2-stage pipeline
  pb::check_c5(pb::c5_body(world));
}

TEST_CASE("PipelineParallel over MPI: bad batches and a deadlocking hand-built schedule are rejected on every process") {
  tessera::Comm world = tessera::mpi::world();
  if (world.size() != 2) return;  // the hand-built schedule is for 2 ranks
  pb::check_errors(pb::errors_body(world));
}
