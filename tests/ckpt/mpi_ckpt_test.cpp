// The checkpoint bodies (ckpt_bodies.hpp) on real processes under mpirun -np 1..4: files
// written by several processes, the index by rank 0, collective failure across processes.
#include <doctest/doctest.h>

#include "ckpt_bodies.hpp"
#include "tessera/mpi.hpp"

TEST_CASE("checkpoint on MPI: tp n -> ZeRO-1 dp n, 1 -> tp n and n -> 1 resume bitwise") {
  tessera::Comm world = tessera::mpi::world();
  ckpt_bodies::reshard_body(world);
}

TEST_CASE("checkpoint on MPI: a failing or corrupted last rank fails every rank") {
  tessera::Comm world = tessera::mpi::world();
  ckpt_bodies::failure_body(world);
}
