// Checks specific to the MPI backend: the world communicator, timeouts, debug-mode mismatch
// detection, MPI error codes, and requests dropped before completion.
#include <doctest/doctest.h>

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/collective_bodies.hpp"
#include "tessera/mpi.hpp"

using collective_bodies::check_contains;
using collective_bodies::thrown_message;
using namespace std::chrono_literals;

namespace {

tessera::Comm world() { return tessera::mpi::world(); }

/// A fresh communicator over the same ranks (same order), so that a test that breaks it leaves
/// the world communicator usable.
tessera::Comm fresh(const std::string& name) {
  tessera::Comm c = world().split(0, world().rank());
  c.set_name(name);
  return c;
}

std::string rank_of(const tessera::Comm& c) {
  return "rank " + std::to_string(c.rank()) + " of " + std::to_string(c.size());
}

}  // namespace

TEST_CASE("world(): every call returns the same communicator, mpi:world, congruent to MPI_COMM_WORLD") {
  tessera::Comm a = world(), b = world();
  CHECK(&a.backend() == &b.backend());
  CHECK(a.name() == "mpi:world");
  int rank = -1, size = -1, cmp = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  CHECK(a.rank() == rank);
  CHECK(a.size() == size);
  MPI_Comm_compare(tessera::mpi::backend(a).mpi_comm(), MPI_COMM_WORLD, &cmp);
  CHECK(cmp == MPI_CONGRUENT);  // a duplicate: same ranks, separate message space
  CHECK(tessera::mpi::Environment::thread_level() >= boost::mpi::threading::serialized);
  // Environment chose libnbc's all-reduce algorithm before MPI started (unless set outside).
  CHECK(std::getenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm") != nullptr);
}

TEST_CASE("split names the new communicator after its parent and inherits timeout and settings") {
  tessera::Comm w = world();
  tessera::Comm parent = fresh("mpi:parent");
  parent.set_timeout(12345ms);
  tessera::mpi::backend(parent).set_max_message_count(777);
  tessera::Comm child = parent.split(w.rank() % 2, 0);
  CHECK(child.name() == "mpi:parent/split(color=" + std::to_string(w.rank() % 2) + ")");
  CHECK(child.timeout() == 12345ms);
  CHECK(tessera::mpi::backend(child).max_message_count() == 777);
  check_contains(thrown_message<tessera::Error>([&] { child.set_timeout(0ms); }), {"timeout must be positive", "0 ms"});
  check_contains(thrown_message<tessera::Error>([&] { tessera::mpi::backend(child).set_max_message_count(0); }),
                 {"set_max_message_count", "got 0"});
}

TEST_CASE("timeout: a rank that skips a collective makes the others throw TimeoutError within seconds") {
  tessera::Comm w = world();
  if (w.size() < 2) return;
  tessera::Comm sub = fresh("mpi:timeout-test");
  tessera::mpi::backend(sub).set_debug_collectives(false);  // this test skips a call on purpose
  tessera::mpi::backend(sub).set_blocking_mpi_collectives(false);  // poll: TimeoutError, not the watchdog
  sub.set_timeout(300ms);
  // Lives to the end of the test: the abandoned all_reduce may still write it.
  std::vector<float> data(8, static_cast<float>(w.rank() + 1));
  if (w.rank() != 0) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string msg = thrown_message<tessera::TimeoutError>([&] { sub.all_reduce(data); });
    const auto waited = std::chrono::steady_clock::now() - t0;
    check_contains(msg, {"all_reduce(float32, count=8, sum)", "mpi:timeout-test", rank_of(sub), "timed out after",
                         "timeout 0.300 s", "MPI cannot tell which ranks did not arrive",
                         "cannot be used after this error"});
    CHECK(waited >= 300ms);
    CHECK(waited < 5s);
    // The ranks no longer agree on the order of calls: later calls are refused, not hung.
    check_contains(thrown_message<tessera::CommError>([&] { sub.barrier(); }),
                   {"barrier()", "mpi:timeout-test cannot be used any more", "all_reduce(float32, count=8, sum) timed out"});
  }
  w.barrier();
  if (w.rank() == 0) {
    // The late rank arrives: its all_reduce completes with the operations the others abandoned.
    sub.set_timeout(30s);
    sub.all_reduce(data);
    const int n = w.size();
    CHECK(data[0] == static_cast<float>(n * (n + 1) / 2));
  }
  w.barrier();
}

TEST_CASE("timeout: a receive whose sender never sends throws TimeoutError naming the peer and tag") {
  tessera::Comm w = world();
  if (w.size() < 2) return;
  tessera::Comm sub = fresh("mpi:p2p-timeout");
  sub.set_timeout(200ms);
  std::vector<std::int32_t> buf(3, 0);  // the abandoned receive still writes it
  if (w.rank() == 0) {
    const std::string msg = thrown_message<tessera::TimeoutError>([&] { sub.recv(buf, 1, 42); });
    check_contains(msg, {"recv(int32, count=3, peer=1, tag=42)", "mpi:p2p-timeout", rank_of(sub),
                         "the receive from rank 1 (tag 42) did not complete"});
  }
  w.barrier();
  if (w.rank() == 1) sub.send(std::vector<std::int32_t>{1, 2, 3}, 0, 42);  // late: matches the abandoned receive
  w.barrier();
}

TEST_CASE("debug mode: a timeout names the ranks that did not arrive") {
  tessera::Comm w = world();
  if (w.size() < 2) return;
  tessera::Comm dbg = fresh("mpi:dbg-timeout");
  tessera::mpi::backend(dbg).set_debug_collectives(true);
  dbg.set_timeout(300ms);
  if (w.rank() != 0) {
    const std::string msg = thrown_message<tessera::TimeoutError>([&] { dbg.barrier(); });
    check_contains(msg, {"barrier()", "mpi:dbg-timeout", rank_of(dbg), "rank(s) 0 did not arrive"});
  }
  // Rank 0 never calls: the others' signature messages to and from it stay pending, and the
  // communicator is kept (not freed) when its handles go.
  w.barrier();
}

TEST_CASE("debug mode: mismatched collectives throw MismatchError on every rank naming both calls") {
  tessera::Comm w = world();
  if (w.size() < 2) return;
  const int n = w.size();
  tessera::Comm dbg = fresh("mpi:dbg");
  tessera::mpi::backend(dbg).set_debug_collectives(true);
  const bool first = w.rank() == 0;
  std::vector<float> a(10, 1.0f), b(11, 1.0f), in(5, 1.0f), out(5 * static_cast<std::size_t>(n), 0.0f);

  std::string msg = thrown_message<tessera::MismatchError>([&] {
    if (first) dbg.all_reduce(a);
    else dbg.all_gather(in, out);
  });
  check_contains(msg, {"collective mismatch on mpi:dbg: rank 0 called all_reduce(float32, count=10, sum) but rank 1 "
                       "called all_gather(float32, count=5)"});

  msg = thrown_message<tessera::MismatchError>([&] { dbg.all_reduce(first ? a : b); });
  check_contains(msg, {"rank 0 called all_reduce(float32, count=10, sum) but rank 1 called all_reduce(float32, count=11, sum)"});

  msg = thrown_message<tessera::MismatchError>([&] { dbg.all_reduce(a, first ? tessera::ReduceOp::sum : tessera::ReduceOp::max); });
  check_contains(msg, {"all_reduce(float32, count=10, sum) but rank 1 called all_reduce(float32, count=10, max)"});

  msg = thrown_message<tessera::MismatchError>([&] { dbg.broadcast(a, first ? 0 : 1); });
  check_contains(msg, {"broadcast(float32, count=10, root=0) but rank 1 called broadcast(float32, count=10, root=1)"});

  std::vector<double> d(10, 1.0);
  msg = thrown_message<tessera::MismatchError>([&] {
    if (first) dbg.all_reduce(a);
    else dbg.all_reduce(d);
  });
  check_contains(msg, {"all_reduce(float32, count=10, sum) but rank 1 called all_reduce(float64, count=10, sum)"});

  msg = thrown_message<tessera::MismatchError>([&] {
    if (first) dbg.barrier();
    else static_cast<void>(dbg.split(0, 0));
  });
  check_contains(msg, {"rank 0 called barrier() but rank 1 called split()"});

  // A mismatch is found before any data moves, so the communicator is still usable; and the
  // blocking and non-blocking forms of a collective match each other.
  std::vector<float> x(10, 2.0f);
  if (first) {
    tessera::Request r = dbg.iall_reduce(x);
    r.wait();
  } else {
    dbg.all_reduce(x);
  }
  CHECK(x[9] == 2.0f * static_cast<float>(n));
}

TEST_CASE("debug mode is read from TESSERA_DEBUG_COLLECTIVES and inherited by split") {
  const char* old = std::getenv("TESSERA_DEBUG_COLLECTIVES");
  const std::string saved = old ? old : "";
  setenv("TESSERA_DEBUG_COLLECTIVES", "1", 1);
  tessera::Comm on = tessera::mpi::make_comm(boost::mpi::communicator(), "mpi:debug-env");
  setenv("TESSERA_DEBUG_COLLECTIVES", "0", 1);
  tessera::Comm off = tessera::mpi::make_comm(boost::mpi::communicator(), "mpi:debug-env-off");
  if (old) setenv("TESSERA_DEBUG_COLLECTIVES", saved.c_str(), 1);
  else unsetenv("TESSERA_DEBUG_COLLECTIVES");
  CHECK(tessera::mpi::backend(on).debug_collectives());
  CHECK_FALSE(tessera::mpi::backend(off).debug_collectives());
  tessera::Comm child = on.split(0, 0);
  CHECK(tessera::mpi::backend(child).debug_collectives());
  CHECK(child.all_reduce_value(1, tessera::ReduceOp::sum) == on.size());
}

TEST_CASE("MPI errors keep MPI's error class: a receive shorter than the matching send is MPI_ERR_TRUNCATE") {
  tessera::Comm w = world();
  if (w.size() < 2) return;
  tessera::Comm sub = fresh("mpi:errors");
  if (w.rank() == 0) {
    sub.send(std::vector<float>(10, 1.0f), 1, 9);
    sub.send(std::vector<float>(3, 1.0f), 1, 10);
  } else if (w.rank() == 1) {
    std::vector<float> five(5, 0.0f);
    int code = -1;
    std::string msg;
    try {
      sub.recv(five, 0, 9);
    } catch (const tessera::CommError& e) {
      code = e.code();
      msg = e.what();
    }
    CHECK(code == MPI_ERR_TRUNCATE);
    check_contains(msg, {"recv(float32, count=5, peer=0, tag=9)", "mpi:errors", "MPI_ERR_TRUNCATE",
                         "the matching send has more elements"});
    msg = thrown_message<tessera::CommError>([&] { sub.recv(five, 0, 10); });
    check_contains(msg, {"recv(float32, count=5, peer=0, tag=10)", "received 3 elements from rank 0 (tag 10) but expected 5"});
  }
  sub.barrier();  // errors in completed operations leave the communicator usable
}

TEST_CASE("a Request dropped before completion still completes: the receiver gets the data") {
  tessera::Comm w = world();
  if (w.size() < 2) return;
  tessera::Comm sub = fresh("mpi:dropped");
  const std::vector<double> payload = collective_bodies::inputs<double>(0, 5, 100003);
  if (w.rank() == 0) {
    static_cast<void>(sub.isend(payload, 1, 4));  // dropped at once; the communicator keeps it
  } else if (w.rank() == 1) {
    std::vector<double> got(100003, 0.0);
    sub.recv(got, 0, 4);
    collective_bodies::check_equal(got, payload, "data of a dropped isend");
  }
  sub.barrier();
  sub.barrier();
}
