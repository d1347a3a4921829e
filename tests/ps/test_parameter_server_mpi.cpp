// The parameter-server bodies of ps_bodies.hpp on real processes (mpirun -np 2, 3, 4; see
// tests/ps/meson.build). Each rank checks what it saw against a serial run computed on its
// own; the doctest main (tests/mpi/mpi_test_main.cpp) sums the failures of all ranks.
#include <doctest/doctest.h>

#include <vector>

#include "ps/ps_bodies.hpp"
#include "tessera/mpi.hpp"

using namespace tessera;
using namespace ps_bodies;

namespace {

// Runs Config c on the world and checks this rank's result: a worker's parameters, or a
// server's shard, equal the serial run within round-off; the workers hold bitwise the same
// values; and they equal the data-parallel reference run on the workers alone (bitwise when
// there are at most 2 workers, where the order of a SUM does not matter).
template <class T>
void check_sync_equivalence(int num_servers, Opt opt) {
  Comm world = mpi::world();
  CAPTURE(num_servers);
  CAPTURE(static_cast<int>(opt));
  Config c{.num_servers = num_servers, .opt = opt};
  const int W = world.size() - num_servers;
  const RankResult<T> r = ps_run<T>(world, c);
  const std::vector<T> serial = serial_run<T>(c, W);
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-13;
  Comm role = world.split(r.server ? 1 : 0, world.rank());
  if (r.server) {
    const std::vector<T> part(serial.begin() + r.key_begin,
                              serial.begin() + r.key_begin + static_cast<std::ptrdiff_t>(r.values.size()));
    CHECK(relative_error(r.values, part) < tol);
    CHECK(r.stats.steps == c.steps);
    CHECK(r.stats.pushes == static_cast<std::int64_t>(c.steps) * W);
    return;
  }
  CHECK(relative_error(r.values, serial) < tol);
  std::vector<T> all(r.values.size() * static_cast<std::size_t>(W));
  role.all_gather(r.values, all);
  for (int q = 0; q < W; ++q)
    CHECK(std::equal(r.values.begin(), r.values.end(), all.begin() + static_cast<std::ptrdiff_t>(q * r.values.size())));
  const std::vector<T> dp = dp_reference_run<T>(role, c);
  if (W <= 2) {
    CHECK(dp == r.values);
  } else {
    CHECK(relative_error(dp, r.values) < tol);
  }
}

}  // namespace

TEST_CASE("ParameterServer under MPI: 5 synchronous steps with 1 to size-1 servers equal 5 serial steps on the global batch") {
  const int n = mpi::world().size();
  if (n < 2) return;  // a parameter server needs a server and a worker
  for (int s = 1; s < n; ++s)
    for (Opt opt : {Opt::adamw, Opt::sgd_momentum}) {
      check_sync_equivalence<float>(s, opt);
      check_sync_equivalence<double>(s, opt);
    }
}

TEST_CASE("ParameterServer under MPI: push, pull and wait with the worker busy (no MPI calls) between pull and wait") {
  Comm world = mpi::world();
  if (world.size() < 2) return;
  Config c{.num_servers = 1, .steps = 3, .busy_ms = 20};
  const RankResult<double> r = ps_run<double>(world, c);
  CHECK(r.error.empty());
  if (!r.server) CHECK(relative_error(r.values, serial_run<double>(c, world.size() - 1)) < 1e-13);
}

TEST_CASE("ParameterServer under MPI: async with staleness 0 and a slow worker equals the serial run") {
  Comm world = mpi::world();
  if (world.size() < 2) return;
  Config c{.num_servers = 1, .mode = ParameterServerMode::async, .steps = 4, .slow_worker = 0, .slow_ms = 3};
  const RankResult<double> r = ps_run<double>(world, c);
  if (r.server) {
    CHECK(r.stats.max_staleness == 0);
    return;
  }
  CHECK(relative_error(r.values, serial_run<double>(c, world.size() - 1)) < 1e-13);
}

TEST_CASE("ParameterServer under MPI: SSP with staleness 2 and a slow worker stays within the bound and converges") {
  Comm world = mpi::world();
  if (world.size() < 2) return;
  Regression reg{.num_servers = world.size() >= 4 ? 2 : 1, .staleness = 2, .slow_worker = 0, .slow_ms = 1};
  const RegressionResult r = regression_run<float>(world, reg);
  CHECK(r.stats.max_staleness <= 2);
  if (r.server) {
    CHECK(r.stats.max_clock_gap <= 2);
    CHECK(r.stats.steps == reg.steps);
    return;
  }
  CHECK(r.initial_loss > 1.0);
  CHECK(r.final_loss < 1e-4);
}

TEST_CASE("ParameterServer under MPI: workers that stop early send done and no rank hangs") {
  Comm world = mpi::world();
  if (world.size() < 3) return;
  const int W = world.size() - 1;
  Config c{.num_servers = 1, .steps = 4};
  for (int w = 0; w < W; ++w) c.worker_steps.push_back(w == W - 1 ? 2 : 4);
  const RankResult<double> r = ps_run<double>(world, c);
  if (r.server) {
    CHECK(r.stats.steps == 4);
    return;
  }
  if (r.index == 0) CHECK(relative_error(r.values, serial_run<double>(c, W)) < 1e-13);
}
