// The parameter-server bodies of ps_bodies.hpp on real processes (mpirun -np 2, 3, 4; see
// tests/ps/meson.build). Each rank checks what it saw against a serial run computed on its
// own; the doctest main (tests/mpi/mpi_test_main.cpp) sums the failures of all ranks.
#include <doctest/doctest.h>

#include <algorithm>
#include <string>
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
  for (int q = 0; q < W; ++q) {
    const std::vector<T> theirs(all.begin() + static_cast<std::ptrdiff_t>(q * r.values.size()),
                                all.begin() + static_cast<std::ptrdiff_t>((q + 1) * r.values.size()));
    CHECK(bitwise_equal(r.values, theirs));
  }
  const std::vector<T> dp = dp_reference_run<T>(role, c);
  if (W <= 2) {
    CHECK(bitwise_equal(dp, r.values));
  } else {
    CHECK(relative_error(dp, r.values) < tol);
  }
}

// This rank's part of the staleness bound s, as the workers saw it (the MPI twin of the threads
// test's check_bound): every pull got from every server values at least 0 and at most s of the
// worker's own steps old (read off the version probe), never older than the pull before; a
// worker other than the slow one that runs more than s steps, with another worker to run ahead
// of, got values exactly s steps old from every server at least once (the bound is reached). A
// server's shard went through max(steps) global steps.
void check_bound_here(const RegressionResult& x, const Regression& r, int num_workers) {
  const int s = r.staleness, S = r.num_servers;
  CAPTURE(x.server);
  CAPTURE(x.index);
  CAPTURE(s);
  CHECK(x.error.empty());
  int last = 0;
  for (int w = 0; w < num_workers; ++w) last = std::max(last, steps_of(r, w));
  if (x.server) {
    REQUIRE(x.versions.size() == 1);
    CHECK(x.versions[0][0] == last);
    CHECK(x.stats.steps == last);
    return;
  }
  const ObservedStaleness o = observed_staleness(x, S);
  REQUIRE(o.pulls == steps_of(r, x.index));
  CHECK(o.min >= 0);
  CHECK(o.monotone);
  const bool fast = num_workers >= 2 && x.index != r.slow_worker && steps_of(r, x.index) > s;
  for (int q = 0; q < S; ++q) {
    CAPTURE(q);
    const std::int64_t m = o.max[static_cast<std::size_t>(q)];
    CHECK(m <= s);            // never beyond the bound
    if (fast) CHECK(m == s);  // and reached
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
  Comm role = world.split(r.server ? 1 : 0, world.rank());
  if (r.server) {
    CHECK(r.stats.max_staleness == 0);
    return;
  }
  const int W = world.size() - 1;
  CHECK(relative_error(r.values, serial_run<double>(c, W)) < 1e-13);
  // The independent data-parallel reference on the workers: bitwise where the order of the SUM
  // cannot differ (at most 2 workers).
  const std::vector<double> dp = dp_reference_run<double>(role, c);
  if (W <= 2) {
    CHECK(bitwise_equal(dp, r.values));
  } else {
    CHECK(relative_error(dp, r.values) < 1e-13);
  }
}

TEST_CASE("ParameterServer under MPI: SSP with staleness 2 and a slow worker stays within the bound, reaches it with 3 "
          "or more ranks, and converges") {
  Comm world = mpi::world();
  if (world.size() < 2) return;
  const Regression reg{.num_servers = world.size() >= 4 ? 2 : 1, .staleness = 2, .slow_worker = 0, .slow_ms = 2};
  const RegressionResult r = regression_run<float>(world, reg);
  check_bound_here(r, reg, world.size() - reg.num_servers);
  CHECK(r.stats.max_staleness <= 2);
  if (r.server) {
    CHECK(r.stats.max_clock_gap <= 2);
    return;
  }
  CHECK(r.initial_loss > 1.0);
  CHECK(r.final_loss < 1e-4);
}

TEST_CASE("ParameterServer under MPI: SSP with workers that finish early, measured on the workers: the bound holds and "
          "is reached") {
  Comm world = mpi::world();
  if (world.size() < 3) return;
  // One server, s = 1; worker 1 is slow and stops after 4 steps, a third worker (np >= 4)
  // stops after 3; the others run 12.
  const int W = world.size() - 1;
  Regression reg{.steps = 12, .num_servers = 1, .staleness = 1, .slow_worker = 1, .slow_ms = 15};
  for (int w = 0; w < W; ++w) reg.worker_steps.push_back(w == 1 ? 4 : w == 2 ? 3 : 12);
  check_bound_here(regression_run<float>(world, reg), reg, W);
}

TEST_CASE("ParameterServer under MPI: parameter lists that differ fail on every rank with the same message") {
  Comm world = mpi::world();
  if (world.size() < 2) return;
  const int odd = world.size() - 1;  // this rank's weight has another shape
  std::string m = "no error";
  try {
    nn::Linear<float> lin(2, world.rank() == odd ? 3 : 2);
    ParameterServer<float> ps(world, lin.parameters(), {.num_servers = 1});
  } catch (const CommError& e) {  // a rank that only timed out did not detect it itself
    m = std::string("CommError: ") + e.what();
  } catch (const Error& e) {
    m = e.what();
  }
  CAPTURE(m);
  CHECK(m.find("parameter 0 is \"weight\" of shape (2, 2) on rank 0 but \"weight\" of shape (2, 3) on rank " +
               std::to_string(odd)) != std::string::npos);
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
