// The shared collective bodies (tests/common/collective_bodies.hpp) on real processes: on the
// world communicator, on a split communicator with reversed rank order, and with buffers moved
// in pieces. Run under mpirun -np 1..4 (tests/mpi/meson.build).
#include <doctest/doctest.h>

#include "common/collective_bodies.hpp"
#include "tessera/mpi.hpp"

namespace cb = collective_bodies;

namespace {
tessera::Comm world() { return tessera::mpi::world(); }
}  // namespace

TEST_CASE("all_reduce: sum over every rank equals the serial sum (f32, f64, i32, i64; 0 to 300001 elements)") {
  tessera::Comm w = world();
  cb::all_reduce_sum_body(w);
}

TEST_CASE("all_reduce: avg equals the serial mean; max and min equal the serial max and min") {
  tessera::Comm w = world();
  cb::all_reduce_avg_body(w);
  cb::all_reduce_max_min_body(w);
}

TEST_CASE("all_gather: every rank receives rank r's input at offset r * count") {
  tessera::Comm w = world();
  cb::all_gather_body(w);
}

TEST_CASE("reduce_scatter: rank r receives the reduction of block r, for sum, avg, max and min") {
  tessera::Comm w = world();
  cb::reduce_scatter_body(w);
}

TEST_CASE("in-place all_gather and reduce_scatter (input or output is this rank's block) give the same results") {
  tessera::Comm w = world();
  cb::in_place_body(w);
}

TEST_CASE("broadcast: every rank receives the root's buffer, for every root") {
  tessera::Comm w = world();
  cb::broadcast_body(w);
}

TEST_CASE("send/recv: a ring shift delivers each rank's buffer to its right neighbour") {
  tessera::Comm w = world();
  cb::send_recv_ring_body(w);
}

TEST_CASE("isend/irecv: all pairs exchange at once, messages matched by tag, completed in any order") {
  tessera::Comm w = world();
  cb::isend_irecv_body(w);
}

TEST_CASE("non-blocking collectives: five in flight at once complete with the serial results") {
  tessera::Comm w = world();
  cb::nonblocking_overlap_body(w);
}

TEST_CASE("batch_isend_irecv: an exchange completes whatever order the two sides list send and receive") {
  tessera::Comm w = world();
  cb::batch_p2p_exchange_body(w, false);
}

TEST_CASE("barrier: no rank leaves before the last rank arrives") {
  tessera::Comm w = world();
  cb::barrier_body(w);
}

TEST_CASE("split: even/odd colors with reversed keys order the new ranks by key; collectives work on them") {
  tessera::Comm w = world();
  cb::split_body(w);
}

TEST_CASE("all_reduce_value: a value only one rank knows becomes the same on every rank, so all take one branch") {
  tessera::Comm w = world();
  cb::all_reduce_value_body(w);
}

TEST_CASE("fused bucket vs per-tensor all_reduce: equal within fp32 round-off and bitwise equal across ranks") {
  tessera::Comm w = world();
  cb::fused_vs_per_tensor_body(w);
}

TEST_CASE("bad root, peer, tag, color and buffer sizes throw Error naming the values, before communicating") {
  tessera::Comm w = world();
  cb::argument_errors_body(w);
}

TEST_CASE("every collective body passes on a split communicator whose rank order is reversed") {
  tessera::Comm w = world();
  tessera::Comm reversed = w.split(0, w.size() - w.rank());
  CHECK(reversed.rank() == w.size() - 1 - w.rank());
  cb::run_all_bodies(reversed, false);
}

TEST_CASE("buffers longer than max_message_count() are moved in pieces with the same results") {
  tessera::Comm w = world();
  tessera::Comm pieces = w.split(0, w.rank());
  tessera::mpi::backend(pieces).set_max_message_count(1000);  // 1001 -> 1000 + 1, 300001 -> 301 pieces
  cb::run_all_bodies(pieces, false);
}

TEST_SUITE("big") {
  TEST_CASE("64 MiB buffers: all_reduce, all_gather, reduce_scatter and broadcast equal the serial results") {
    tessera::Comm w = world();
    cb::large_body(w);
  }
}

TEST_SUITE("c6-big") {
  TEST_CASE("64 MiB exchange where both ranks list send before receive completes (batch_isend_irecv)") {
    tessera::Comm w = world();
    cb::batch_p2p_exchange_body(w, true);
  }
}
