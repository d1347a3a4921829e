// The backend-independent checkpoint bodies (ckpt_bodies.hpp, also run under mpirun) on thread
// ranks at world sizes 1 to 4.
#include <doctest/doctest.h>

#include "ckpt_bodies.hpp"

TEST_CASE("checkpoint bodies on threads: tp n -> ZeRO-1 dp n, 1 -> tp n and n -> 1 resume bitwise, n = 1..4") {
  for (int n = 1; n <= 4; ++n) {
    CAPTURE(n);
    tessera::testing::run_ranks(n, [](tessera::Comm& world) { ckpt_bodies::reshard_body(world); });
  }
}

TEST_CASE("checkpoint bodies on threads: a failing or corrupted last rank fails every rank, n = 1..4") {
  for (int n = 1; n <= 4; ++n) {
    CAPTURE(n);
    tessera::testing::run_ranks(n, [](tessera::Comm& world) { ckpt_bodies::failure_body(world); });
  }
}
