// The backend-independent collective bodies (tests/common/collective_bodies.hpp, also run under
// mpirun by tests/mpi) on the threads backend at world sizes 1..8, and the 64 MiB ones at 2 and 3.
#include <doctest/doctest.h>

#include "common/collective_bodies.hpp"
#include "tessera/tessera.hpp"

namespace cb = collective_bodies;

TEST_CASE("collective bodies: every collective at world sizes 1..8 on the threads backend matches the serial result") {
  for (int n = 1; n <= 8; ++n) {
    CAPTURE(n);
    tessera::testing::run_ranks(n, [](tessera::Comm& c) { cb::run_all_bodies(c, false); });
  }
}

TEST_CASE("collective bodies: 64 MiB collectives and the 64 MiB C6 exchange on 2 thread ranks") {
  tessera::testing::run_ranks(2, [](tessera::Comm& c) {
    cb::large_body(c);
    cb::batch_p2p_exchange_body(c, true);
  });
}

TEST_CASE("C9 on threads: one fused bucket equals one all_reduce per tensor bitwise, on every rank") {
  auto r = tessera::testing::run_ranks(4, [](tessera::Comm& c) { return cb::fused_vs_per_tensor(c); });
  for (auto& x : r) CHECK(x.fused == x.per_tensor);
  for (auto& x : r) CHECK(x.fused == r[0].fused);
}
