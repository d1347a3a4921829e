#pragma once
/// @file
/// Collective test bodies, written once and run on every backend: the threads backend runs
/// them in n std::threads, tests/mpi runs them under `mpirun -np 1..4`.
///
/// Each `xxx_body(comm)` is called by every rank of `comm` with the same arguments. Inputs are
/// generated from (rank, seed, index), so every rank can compute what every other rank
/// contributed and checks its result against a serial computation done locally. Values are
/// chosen so that sums are exact in fp32 (multiples of 1/4 no larger than 64 in magnitude:
/// any sum over fewer than 2^14 ranks needs at most 22 significant bits), hence exact
/// comparisons; where a tolerance is used, the comment says why.
///
/// The bodies use CHECK (not REQUIRE) for values, so a rank whose result is wrong still makes
/// the same sequence of calls as the others and the ranks stay in step. doctest 2.4.9
/// assertions are thread-safe.

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

namespace collective_bodies {

using tessera::Comm;
using tessera::CommScalar;
using tessera::P2POp;
using tessera::ReduceOp;
using tessera::Request;

// ---- deterministic inputs ---------------------------------------------------------------------

/// SplitMix64 finalizer (Steele, Lea, Flood 2014): a well-mixed 64-bit hash of `x`.
inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// Per-(rank, seed) base of the element hash.
inline std::uint64_t stream(int rank, std::uint64_t seed) {
  return mix(mix(seed) ^ (static_cast<std::uint64_t>(rank) + 1) * 0x100000001b3ULL);
}

/// Hash of element i of a stream (one multiply and shift: cheap enough for 64 MiB buffers).
inline std::uint64_t element(std::uint64_t base, std::size_t i) {
  std::uint64_t h = (base ^ (static_cast<std::uint64_t>(i) * 0xd6e8feb86659fd93ULL)) * 0x9e3779b97f4a7c15ULL;
  return h ^ (h >> 29);
}

/// Element i of `rank`'s input for `seed`, exact under summation:
/// float/double: a multiple of 1/4 in [-64, 64]; int32: in [-1000, 1000]; int64: the same
/// plus k * 2^40 with k in {-1, 0, 1}, so that the upper 32 bits take part.
template <CommScalar T>
T input_from(std::uint64_t base, std::size_t i) {
  const std::uint64_t h = element(base, i);
  if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(static_cast<int>((h >> 20) % 513) - 256) / T(4);
  } else if constexpr (std::is_same_v<T, std::int32_t>) {
    return static_cast<T>(static_cast<int>((h >> 20) % 2001) - 1000);
  } else {
    return static_cast<T>(static_cast<std::int64_t>((h >> 20) % 2001) - 1000 +
                          (static_cast<std::int64_t>((h >> 50) % 3) - 1) * (std::int64_t{1} << 40));
  }
}

/// Element i of `rank`'s input for `seed` (see input_from).
template <CommScalar T>
T input(int rank, std::uint64_t seed, std::size_t i) {
  return input_from<T>(stream(rank, seed), i);
}

/// Elements [first, first + count) of `rank`'s input, each multiplied by `scale`.
template <CommScalar T>
std::vector<T> inputs(int rank, std::uint64_t seed, std::size_t count, std::size_t first = 0,
                      int scale = 1) {
  const std::uint64_t base = stream(rank, seed);
  std::vector<T> v(count);
  for (std::size_t i = 0; i < count; ++i) v[i] = static_cast<T>(input_from<T>(base, first + i) * static_cast<T>(scale));
  return v;
}

/// Serial reduction over ranks 0..n-1 of elements [first, first + count) of their inputs
/// (in rank order). `avg` here is the sum of the unscaled inputs: the bodies feed
/// scale = n inputs to avg, so the exact mean is that sum.
template <CommScalar T>
std::vector<T> expected_reduce(int n, std::uint64_t seed, std::size_t first, std::size_t count, ReduceOp op) {
  std::vector<T> out = inputs<T>(0, seed, count, first);
  for (int r = 1; r < n; ++r) {
    const std::uint64_t base = stream(r, seed);
    for (std::size_t i = 0; i < count; ++i) {
      const T x = input_from<T>(base, first + i);
      switch (op) {
        case ReduceOp::sum:
        case ReduceOp::avg: out[i] = static_cast<T>(out[i] + x); break;
        case ReduceOp::max: out[i] = std::max(out[i], x); break;
        case ReduceOp::min: out[i] = std::min(out[i], x); break;
      }
    }
  }
  return out;
}

/// Calls f(T{}) for float, double, int32_t and int64_t.
template <class F>
void for_each_type(F&& f) {
  f(float{});
  f(double{});
  f(std::int32_t{});
  f(std::int64_t{});
}

/// Seed used by the bodies unless they say otherwise.
inline constexpr std::uint64_t default_seed = 20240601;

/// Counts every body covers: empty, one element, odd, not divisible by the usual world sizes
/// (1001 = 7 * 11 * 13, 4099 prime), and one past the eager limits of shared memory and TCP.
inline const std::vector<std::size_t>& test_counts() {
  static const std::vector<std::size_t> counts{0, 1, 3, 1001, 4099, 300001};
  return counts;
}

/// Element count of the large (64 MiB of float) bodies.
inline constexpr std::size_t large_count = std::size_t{16} << 20;

// ---- checks -----------------------------------------------------------------------------------

/// "float32" etc. for a C++ element type.
template <CommScalar T>
std::string type_name() {
  return std::string(tessera::name_of(tessera::dtype_of<T>));
}

/// Checks got == want element by element (rel_tol == 0: exactly; otherwise
/// |got - want| <= rel_tol * |want|). One CHECK per call, naming the number of wrong elements
/// and the first one.
template <class T>
void check_values(std::span<const T> got, std::span<const T> want, double rel_tol, std::string_view what) {
  std::size_t bad = 0, first = 0;
  const std::size_t n = std::min(got.size(), want.size());
  for (std::size_t i = 0; i < n; ++i) {
    const bool ok = rel_tol == 0.0
                        ? got[i] == want[i]
                        : std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i])) <=
                              rel_tol * std::abs(static_cast<double>(want[i]));
    if (!ok && bad++ == 0) first = i;
  }
  std::string detail;
  if (bad != 0 || got.size() != want.size()) {
    std::ostringstream os;
    os.precision(17);
    os << what << ": ";
    if (got.size() != want.size()) os << "size " << got.size() << " != expected " << want.size() << "; ";
    if (bad != 0)
      os << bad << " of " << n << " elements differ, first at index " << first << ": got " << got[first]
         << ", expected " << want[first];
    detail = os.str();
  }
  CHECK_MESSAGE(detail.empty(), detail);
}

/// Exact comparison of two vectors (see check_values).
template <class T>
void check_equal(const std::vector<T>& got, const std::vector<T>& want, std::string_view what) {
  check_values<T>(got, want, 0.0, what);
}

/// Tolerance of an avg result: the bodies' avg inputs make the mean exact, but a backend may
/// compute sum * (1/n) instead of sum / n, which is within 2 ulp of it.
template <class T>
double avg_tolerance() {
  if constexpr (std::is_floating_point_v<T>) return 4.0 * std::numeric_limits<T>::epsilon();
  return 0.0;
}

/// Label of one case: "<call> <type> count=<n> on <comm> (rank r of n)".
template <CommScalar T>
std::string label(std::string_view call, std::size_t count, const Comm& comm) {
  return tessera::detail::str(call, " ", type_name<T>(), " count=", count, " on ", comm.name(),
                              " (rank ", comm.rank(), " of ", comm.size(), ")");
}

/// The message of the exception of type E that f() throws; "" if it throws nothing, and
/// "<other exception: ...>" if it throws something else.
template <class E, class F>
std::string thrown_message(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<other exception: ") + e.what() + ">";
  }
  return "";
}

/// Checks that `text` contains every one of `parts`.
inline void check_contains(const std::string& text, std::initializer_list<std::string_view> parts) {
  for (std::string_view p : parts) CHECK_MESSAGE(text.find(p) != std::string::npos, "'", p, "' not in: ", text);
}

// ---- all_reduce -------------------------------------------------------------------------------

/// all_reduce sum of every element type and every test count equals the serial sum (exact).
inline void all_reduce_sum_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  for_each_type([&]<class T>(T) {
    for (std::size_t count : test_counts()) {
      std::vector<T> data = inputs<T>(rank, default_seed, count);
      comm.all_reduce(data, ReduceOp::sum);
      check_equal(data, expected_reduce<T>(n, default_seed, 0, count, ReduceOp::sum),
                  label<T>("all_reduce sum", count, comm));
    }
  });
  // The default op is sum, and a std::span works as well as a vector.
  std::vector<double> v = inputs<double>(rank, default_seed + 1, 17);
  comm.all_reduce(std::span<double>(v));
  check_equal(v, expected_reduce<double>(n, default_seed + 1, 0, 17, ReduceOp::sum),
              label<double>("all_reduce default op on a span", 17, comm));
}

/// all_reduce avg equals the serial mean: inputs are n times the base inputs, so the mean is
/// exactly the sum of the base inputs (within avg_tolerance for floating point).
inline void all_reduce_avg_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  for_each_type([&]<class T>(T) {
    for (std::size_t count : test_counts()) {
      std::vector<T> data = inputs<T>(rank, default_seed, count, 0, n);
      comm.all_reduce(data, ReduceOp::avg);
      const std::vector<T> want = expected_reduce<T>(n, default_seed, 0, count, ReduceOp::avg);
      check_values<T>(data, want, avg_tolerance<T>(), label<T>("all_reduce avg", count, comm));
    }
  });
}

/// all_reduce max and min equal the serial element-wise max and min (exact).
inline void all_reduce_max_min_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  for (ReduceOp op : {ReduceOp::max, ReduceOp::min}) {
    for_each_type([&]<class T>(T) {
      for (std::size_t count : test_counts()) {
        std::vector<T> data = inputs<T>(rank, default_seed + 2, count);
        comm.all_reduce(data, op);
        check_equal(data, expected_reduce<T>(n, default_seed + 2, 0, count, op),
                    label<T>(op == ReduceOp::max ? "all_reduce max" : "all_reduce min", count, comm));
      }
    });
  }
}

// ---- all_gather / reduce_scatter --------------------------------------------------------------

/// all_gather puts rank r's input at offset r * count on every rank, for every type and count.
inline void all_gather_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  for_each_type([&]<class T>(T) {
    for (std::size_t count : test_counts()) {
      const std::vector<T> in = inputs<T>(rank, default_seed + 3, count);
      std::vector<T> out(count * static_cast<std::size_t>(n), T(-7));
      comm.all_gather(in, out);
      std::vector<T> want;
      for (int r = 0; r < n; ++r) {
        const std::vector<T> part = inputs<T>(r, default_seed + 3, count);
        want.insert(want.end(), part.begin(), part.end());
      }
      check_equal(out, want, label<T>("all_gather", count, comm));
    }
  });
}

/// reduce_scatter gives rank r the reduction of block r of every rank's input, for every op,
/// type and count (sum, max, min exact; avg within avg_tolerance).
inline void reduce_scatter_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  const std::size_t un = static_cast<std::size_t>(n);
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max, ReduceOp::min}) {
    for_each_type([&]<class T>(T) {
      for (std::size_t count : {std::size_t{0}, std::size_t{1}, std::size_t{3}, std::size_t{1001}, std::size_t{4099}}) {
        const int scale = op == ReduceOp::avg ? n : 1;
        const std::vector<T> in = inputs<T>(rank, default_seed + 4, count * un, 0, scale);
        std::vector<T> out(count, T(-7));
        comm.reduce_scatter(in, out, op);
        const std::vector<T> want =
            expected_reduce<T>(n, default_seed + 4, static_cast<std::size_t>(rank) * count, count, op);
        check_values<T>(out, want, op == ReduceOp::avg ? avg_tolerance<T>() : 0.0,
                        label<T>(tessera::detail::str("reduce_scatter ", tessera::name_of(op)), count, comm));
      }
    });
  }
}

/// The in-place forms that NCCL defines and ZeRO-style sharding uses: all_gather whose input
/// is this rank's block of the output, and reduce_scatter whose output is this rank's block
/// of the input.
inline void in_place_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  const std::size_t un = static_cast<std::size_t>(n), ur = static_cast<std::size_t>(rank);
  for (std::size_t count : {std::size_t{1}, std::size_t{1001}}) {
    std::vector<float> buf(count * un, -7.0f);
    const std::vector<float> mine = inputs<float>(rank, default_seed + 5, count);
    std::copy(mine.begin(), mine.end(), buf.begin() + static_cast<std::ptrdiff_t>(ur * count));
    comm.all_gather(std::span<const float>(buf.data() + ur * count, count), buf);
    std::vector<float> want;
    for (int r = 0; r < n; ++r) {
      const std::vector<float> part = inputs<float>(r, default_seed + 5, count);
      want.insert(want.end(), part.begin(), part.end());
    }
    check_equal(buf, want, label<float>("in-place all_gather", count, comm));

    std::vector<double> grads = inputs<double>(rank, default_seed + 6, count * un);
    comm.reduce_scatter(grads, std::span<double>(grads.data() + ur * count, count), ReduceOp::sum);
    const std::vector<double> shard(grads.begin() + static_cast<std::ptrdiff_t>(ur * count),
                                    grads.begin() + static_cast<std::ptrdiff_t>((ur + 1) * count));
    check_equal(shard, expected_reduce<double>(n, default_seed + 6, ur * count, count, ReduceOp::sum),
                label<double>("in-place reduce_scatter", count, comm));
  }
}

// ---- broadcast --------------------------------------------------------------------------------

/// broadcast from every root copies the root's buffer to every rank, for every type.
inline void broadcast_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  for (int root = 0; root < n; ++root) {
    for_each_type([&]<class T>(T) {
      for (std::size_t count : {std::size_t{0}, std::size_t{1}, std::size_t{1001}, std::size_t{300001}}) {
        const std::uint64_t seed = default_seed + 7 + static_cast<std::uint64_t>(root);
        std::vector<T> data = rank == root ? inputs<T>(root, seed, count) : std::vector<T>(count, T(-7));
        comm.broadcast(data, root);
        check_equal(data, inputs<T>(root, seed, count),
                    label<T>(tessera::detail::str("broadcast from root ", root), count, comm));
      }
    });
  }
}

// ---- point-to-point ---------------------------------------------------------------------------

/// Blocking send/recv around a ring: every rank receives its left neighbour's buffer. Even
/// ranks send first and odd ranks receive first, which is deadlock-free for any size even if
/// sends block until received.
inline void send_recv_ring_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  if (n < 2) return;
  const int next = (rank + 1) % n, prev = (rank + n - 1) % n;
  for (std::size_t count : {std::size_t{0}, std::size_t{1}, std::size_t{1001}, std::size_t{300001}}) {
    const std::vector<float> out = inputs<float>(rank, default_seed + 20, count);
    std::vector<float> in(count, -7.0f);
    if (rank % 2 == 0) {
      comm.send(out, next, 7);
      comm.recv(in, prev, 7);
    } else {
      comm.recv(in, prev, 7);
      comm.send(out, next, 7);
    }
    check_equal(in, inputs<float>(prev, default_seed + 20, count), label<float>("ring send/recv", count, comm));
  }
  // int64 values keep their upper bits through send/recv.
  const std::vector<std::int64_t> big = inputs<std::int64_t>(rank, default_seed + 21, 33);
  std::vector<std::int64_t> got(33, 0);
  if (rank % 2 == 0) {
    comm.send(big, next, 8);
    comm.recv(got, prev, 8);
  } else {
    comm.recv(got, prev, 8);
    comm.send(big, next, 8);
  }
  check_equal(got, inputs<std::int64_t>(prev, default_seed + 21, 33), label<std::int64_t>("ring send/recv", 33, comm));
}

/// isend/irecv between every pair of ranks at once, with tags matched independently of the
/// order of posting (the receiver posts tag 2 before tag 1), completed with wait() in an order
/// unrelated to the issue order, and one completed by polling test().
inline void isend_irecv_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  if (n < 2) return;
  for (std::size_t count : {std::size_t{0}, std::size_t{1001}, std::size_t{100003}}) {
    std::vector<std::vector<double>> out(static_cast<std::size_t>(n)), in(static_cast<std::size_t>(n));
    std::vector<Request> reqs;
    for (int peer = 0; peer < n; ++peer) {
      if (peer == rank) continue;
      const auto p = static_cast<std::size_t>(peer);
      in[p].assign(count, -7.0);
      reqs.push_back(comm.irecv(in[p], peer, 100 + peer));
    }
    for (int peer = 0; peer < n; ++peer) {
      if (peer == rank) continue;
      const auto p = static_cast<std::size_t>(peer);
      out[p] = inputs<double>(rank, default_seed + 30 + static_cast<std::uint64_t>(peer), count);
      reqs.push_back(comm.isend(out[p], peer, 100 + rank));
    }
    // Poll the first with test(), wait for the rest from last to first.
    for (int i = 0; i < 10000000 && !reqs.front().test(); ++i) std::this_thread::yield();
    for (auto it = reqs.rbegin(); it != reqs.rend(); ++it) it->wait();
    for (int peer = 0; peer < n; ++peer) {
      if (peer == rank) continue;
      check_equal(in[static_cast<std::size_t>(peer)],
                  inputs<double>(peer, default_seed + 30 + static_cast<std::uint64_t>(rank), count),
                  label<double>(tessera::detail::str("isend/irecv from rank ", peer), count, comm));
    }
  }
  // Tags select the message: rank sends tag 1 then tag 2 to next; next receives tag 2 first.
  const int next = (rank + 1) % n, prev = (rank + n - 1) % n;
  const std::vector<std::int32_t> a = inputs<std::int32_t>(rank, default_seed + 40, 5);
  const std::vector<std::int32_t> b = inputs<std::int32_t>(rank, default_seed + 41, 9);
  std::vector<std::int32_t> ra(5, 0), rb(9, 0);
  Request s1 = comm.isend(a, next, 1), s2 = comm.isend(b, next, 2);
  Request r2 = comm.irecv(rb, prev, 2), r1 = comm.irecv(ra, prev, 1);
  r2.wait();
  r1.wait();
  s1.wait();
  s2.wait();
  check_equal(ra, inputs<std::int32_t>(prev, default_seed + 40, 5), "irecv by tag 1");
  check_equal(rb, inputs<std::int32_t>(prev, default_seed + 41, 9), "irecv by tag 2 (posted first)");
}

// ---- non-blocking collectives -------------------------------------------------------------------

/// Several non-blocking collectives in flight at once (iall_reduce sum/avg/max, iall_gather,
/// ireduce_scatter), completed in reverse order; then a second round completed by test().
inline void nonblocking_overlap_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  const std::size_t un = static_cast<std::size_t>(n);
  for (int round = 0; round < 2; ++round) {
    const std::uint64_t s = default_seed + 50 + static_cast<std::uint64_t>(round) * 10;
    std::vector<float> a = inputs<float>(rank, s, 1001);
    std::vector<double> b = inputs<double>(rank, s + 1, 4099, 0, n);
    std::vector<std::int32_t> c = inputs<std::int32_t>(rank, s + 2, 3);
    const std::vector<std::int64_t> g_in = inputs<std::int64_t>(rank, s + 3, 7);
    std::vector<std::int64_t> g_out(7 * un, -7);
    const std::vector<float> rs_in = inputs<float>(rank, s + 4, 5 * un);
    std::vector<float> rs_out(5, -7.0f);
    std::vector<Request> reqs;
    reqs.push_back(comm.iall_reduce(a, ReduceOp::sum));
    reqs.push_back(comm.iall_reduce(b, ReduceOp::avg));
    reqs.push_back(comm.iall_reduce(c, ReduceOp::max));
    reqs.push_back(comm.iall_gather(g_in, g_out));
    reqs.push_back(comm.ireduce_scatter(rs_in, rs_out, ReduceOp::sum));
    if (round == 0) {
      for (auto it = reqs.rbegin(); it != reqs.rend(); ++it) it->wait();
    } else {
      bool all = false;
      for (int i = 0; i < 10000000 && !all; ++i) {
        all = true;
        for (Request& r : reqs) all = r.test() && all;
        if (!all) std::this_thread::yield();
      }
      for (Request& r : reqs) r.wait();
    }
    check_equal(a, expected_reduce<float>(n, s, 0, 1001, ReduceOp::sum), label<float>("iall_reduce sum", 1001, comm));
    check_values<double>(b, expected_reduce<double>(n, s + 1, 0, 4099, ReduceOp::avg), avg_tolerance<double>(),
                         label<double>("iall_reduce avg", 4099, comm));
    check_equal(c, expected_reduce<std::int32_t>(n, s + 2, 0, 3, ReduceOp::max),
                label<std::int32_t>("iall_reduce max", 3, comm));
    std::vector<std::int64_t> g_want;
    for (int r = 0; r < n; ++r) {
      const auto part = inputs<std::int64_t>(r, s + 3, 7);
      g_want.insert(g_want.end(), part.begin(), part.end());
    }
    check_equal(g_out, g_want, label<std::int64_t>("iall_gather", 7, comm));
    check_equal(rs_out, expected_reduce<float>(n, s + 4, static_cast<std::size_t>(rank) * 5, 5, ReduceOp::sum),
                label<float>("ireduce_scatter sum", 5, comm));
  }
}

// ---- batched point-to-point (CASES C6) --------------------------------------------------------

/// How the two sides of a pair list their batch entries.
enum class BatchOrder { both_send_first, both_recv_first, mixed };

/// One pair exchange through batch_send_recv: rank and rank ^ 1 swap `count` floats, listing
/// their entries in `order`. Ranks without a partner (the last of an odd size) skip.
inline void batch_pair_exchange(Comm& comm, std::size_t count, BatchOrder order, std::uint64_t seed) {
  const int rank = comm.rank(), partner = rank ^ 1;
  if (partner >= comm.size()) return;
  const std::vector<float> out = inputs<float>(rank, seed, count);
  std::vector<float> in(count, -7.0f);
  const P2POp send = P2POp::send(std::span<const float>(out), partner, 3);
  const P2POp recv = P2POp::recv(std::span<float>(in), partner, 3);
  const bool send_first = order == BatchOrder::both_send_first || (order == BatchOrder::mixed && rank % 2 == 0);
  const std::vector<P2POp> ops = send_first ? std::vector<P2POp>{send, recv} : std::vector<P2POp>{recv, send};
  comm.batch_send_recv(ops);
  const char* name = order == BatchOrder::both_send_first ? "both send first"
                     : order == BatchOrder::both_recv_first ? "both receive first"
                                                            : "even sends first, odd receives first";
  check_equal(in, inputs<float>(partner, seed, count),
              label<float>(tessera::detail::str("batch exchange with rank ", partner, ", ", name), count, comm));
}

/// CASES C6: two ranks that both list send-then-receive (and every other order) complete the
/// exchange through batch_isend_irecv; with `big`, the buffers are 64 MiB each way. Also a
/// ring shift listed send-first on every rank, two messages with the same peer and tag
/// (matched in order), an int64 and an empty entry in one group, and batch_isend_irecv's
/// Request completed later.
inline void batch_p2p_exchange_body(Comm& comm, bool big = false) {
  const int n = comm.size(), rank = comm.rank();
  if (n < 2) return;
  if (big) {
    batch_pair_exchange(comm, large_count, BatchOrder::both_send_first, default_seed + 60);
    batch_pair_exchange(comm, large_count, BatchOrder::both_recv_first, default_seed + 61);
    return;
  }
  for (std::size_t count : {std::size_t{1001}, std::size_t{300001}})
    for (BatchOrder order : {BatchOrder::both_send_first, BatchOrder::both_recv_first, BatchOrder::mixed})
      batch_pair_exchange(comm, count, order, default_seed + 62 + count);

  // Ring shift, every rank lists its send first; plus two messages with the same tag.
  const int next = (rank + 1) % n, prev = (rank + n - 1) % n;
  const std::vector<float> out1 = inputs<float>(rank, default_seed + 70, 300001);
  const std::vector<float> out2 = inputs<float>(rank, default_seed + 71, 11);
  const std::vector<std::int64_t> out3 = inputs<std::int64_t>(rank, default_seed + 72, 13);
  const std::vector<double> empty_out;
  std::vector<float> in1(300001, -7.0f), in2(11, -7.0f);
  std::vector<std::int64_t> in3(13, -7);
  std::vector<double> empty_in;
  const std::vector<P2POp> ops{
      P2POp::send(std::span<const float>(out1), next, 5),
      P2POp::send(std::span<const float>(out2), next, 5),
      P2POp::send(std::span<const std::int64_t>(out3), next, 6),
      P2POp::send(std::span<const double>(empty_out), next, 9),
      P2POp::recv(std::span<float>(in1), prev, 5),
      P2POp::recv(std::span<float>(in2), prev, 5),
      P2POp::recv(std::span<std::int64_t>(in3), prev, 6),
      P2POp::recv(std::span<double>(empty_in), prev, 9),
  };
  Request r = comm.batch_isend_irecv(ops);
  r.wait();
  check_equal(in1, inputs<float>(prev, default_seed + 70, 300001), "batch ring shift, first message of tag 5");
  check_equal(in2, inputs<float>(prev, default_seed + 71, 11), "batch ring shift, second message of tag 5");
  check_equal(in3, inputs<std::int64_t>(prev, default_seed + 72, 13), "batch ring shift, int64 message");
}

// ---- barrier, split, control values ---------------------------------------------------------

/// barrier waits for the last rank: rank 0 arrives 100 ms late and every other rank's barrier
/// takes at least 50 ms (the margin absorbs scheduling delays of up to 50 ms between the
/// preceding barrier and the timed one).
inline void barrier_body(Comm& comm) {
  comm.barrier();
  if (comm.size() < 2) return;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  if (comm.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  comm.barrier();
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - t0);
  if (comm.rank() != 0)
    CHECK_MESSAGE(waited.count() >= 50, "barrier on ", comm.name(), " returned on rank ", comm.rank(),
                  " after ", waited.count(), " ms although rank 0 arrived 100 ms late");
}

/// split: even and odd colors with reversed keys give sub-communicators of the right size
/// and order, on which collectives work; a nested split, one communicator per rank, and equal
/// keys (ordered by the old rank) work too.
inline void split_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  const int color = rank % 2;
  Comm sub = comm.split(color, n - rank);  // reversed keys: highest old rank first
  std::vector<std::int32_t> members;  // old ranks of this color, in the new order
  for (int r = n - 1; r >= 0; --r)
    if (r % 2 == color) members.push_back(r);
  CHECK(sub.size() == static_cast<int>(members.size()));
  const auto pos = std::find(members.begin(), members.end(), rank) - members.begin();
  CHECK(sub.rank() == static_cast<int>(pos));

  std::vector<std::int32_t> gathered(members.size(), -1);
  sub.all_gather(std::vector<std::int32_t>{rank}, gathered);
  check_equal(gathered, members, tessera::detail::str("old ranks gathered on split color ", color));

  std::vector<float> data = inputs<float>(rank, default_seed + 80, 1001);
  sub.all_reduce(data, ReduceOp::sum);
  std::vector<float> want(1001, 0.0f);
  for (int r : members) {
    const auto part = inputs<float>(r, default_seed + 80, 1001);
    for (std::size_t i = 0; i < want.size(); ++i) want[i] += part[i];
  }
  check_equal(data, want, tessera::detail::str("all_reduce on split color ", color));

  std::vector<std::int64_t> b(4, rank);
  sub.broadcast(b, 0);  // new rank 0 is the highest old rank of the color
  check_equal(b, std::vector<std::int64_t>(4, members.front()), "broadcast from rank 0 of the split");

  // Nested split keeping the order: same size and rank.
  Comm nested = sub.split(0, sub.rank());
  CHECK(nested.size() == sub.size());
  CHECK(nested.rank() == sub.rank());
  const std::int64_t total = nested.all_reduce_value(std::int64_t{rank}, ReduceOp::sum);
  CHECK(total == std::accumulate(members.begin(), members.end(), std::int64_t{0}));

  // One communicator per rank.
  Comm alone = comm.split(rank, 0);
  CHECK(alone.size() == 1);
  CHECK(alone.rank() == 0);
  CHECK(alone.all_reduce_value(2.5, ReduceOp::sum) == 2.5);

  // Equal keys: ordered by the old rank.
  Comm same = comm.split(0, 0);
  CHECK(same.size() == n);
  CHECK(same.rank() == rank);
  same.barrier();
}

/// CASES C10: a value only one rank knows (its validation loss) reduced with all_reduce_value
/// gives every rank the same value, so every rank takes the same branch.
inline void all_reduce_value_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  auto loss_of = [](int r) { return 2.0 + 0.25 * ((r * 7) % 5); };
  double best = loss_of(0), total_loss = 0.0;
  for (int r = 0; r < n; ++r) {
    best = std::min(best, loss_of(r));
    total_loss += loss_of(r);
  }
  CHECK(comm.all_reduce_value(loss_of(rank), ReduceOp::min) == best);
  CHECK(comm.all_reduce_value(loss_of(rank), ReduceOp::max) >= best);
  CHECK(comm.all_reduce_value(loss_of(rank) * n, ReduceOp::avg) == doctest::Approx(total_loss).epsilon(1e-15));
  CHECK(comm.all_reduce_value(static_cast<float>(loss_of(rank)), ReduceOp::sum) == static_cast<float>(total_loss));
  const std::int64_t tokens = comm.all_reduce_value(std::int64_t{3} + 4 * rank + (std::int64_t{1} << 33), ReduceOp::sum);
  CHECK(tokens == 3 * n + 2 * n * (n - 1) + n * (std::int64_t{1} << 33));
  const std::int32_t any = comm.all_reduce_value(std::int32_t{rank == n - 1 ? 1 : 0}, ReduceOp::max);
  CHECK(any == 1);

  // The decision taken from the shared value is the same on every rank.
  const double shared = comm.all_reduce_value(loss_of(rank), ReduceOp::min);
  const std::int32_t save = shared < 2.3 ? 1 : 0;
  std::vector<std::int32_t> decisions(static_cast<std::size_t>(n), -1);
  comm.all_gather(std::vector<std::int32_t>{save}, decisions);
  check_equal(decisions, std::vector<std::int32_t>(static_cast<std::size_t>(n), save),
              "save-checkpoint decision on every rank");
}

// ---- C9: fused bucket vs per-tensor -----------------------------------------------------------

/// A gradient value with a full fp32 mantissa and an exponent in [-3, 4], so that sums over
/// ranks round (unlike the exact inputs above).
inline float gradient_value(int rank, std::uint64_t seed, std::size_t i) {
  const std::uint64_t h = element(stream(rank, seed), i);
  const double mantissa = static_cast<double>(static_cast<std::int64_t>(h >> 40) - (std::int64_t{1} << 23)) /
                          static_cast<double>(std::int64_t{1} << 23);
  return static_cast<float>(std::ldexp(mantissa, static_cast<int>(h & 7) - 3));
}

/// Sizes of the gradient tensors of CASES C9.
inline const std::vector<std::size_t>& c9_tensor_sizes() {
  static const std::vector<std::size_t> sizes{3, 1001, 64, 4099, 1, 257, 20000};
  return sizes;
}

/// Result of CASES C9 on one rank: the same gradients all-reduced (sum) once as one flat
/// bucket and once tensor by tensor, both laid out flat.
struct FusedVsPerTensor {
  std::vector<float> fused;       ///< one all_reduce of the concatenated gradients
  std::vector<float> per_tensor;  ///< one all_reduce per tensor, concatenated afterwards
};

/// Runs CASES C9 and returns both results, so that a threads-backend test can require them
/// bitwise equal (fixed reduction order). Collective over `comm`.
inline FusedVsPerTensor fused_vs_per_tensor(Comm& comm, std::uint64_t seed = default_seed + 90) {
  const int rank = comm.rank();
  std::vector<std::vector<float>> tensors;
  std::size_t offset = 0;
  for (std::size_t size : c9_tensor_sizes()) {
    std::vector<float> t(size);
    for (std::size_t i = 0; i < size; ++i) t[i] = gradient_value(rank, seed, offset + i);
    offset += size;
    tensors.push_back(std::move(t));
  }
  FusedVsPerTensor r;
  for (const auto& t : tensors) r.fused.insert(r.fused.end(), t.begin(), t.end());
  comm.all_reduce(r.fused, ReduceOp::sum);
  for (auto& t : tensors) {
    comm.all_reduce(t, ReduceOp::sum);
    r.per_tensor.insert(r.per_tensor.end(), t.begin(), t.end());
  }
  return r;
}

/// CASES C9: the fused and per-tensor reductions agree within fp32 round-off. Any order of
/// summing n terms is within (n-1) u sum|x| of the exact sum (u = 2^-24), so two orders differ
/// by at most 2 (n-1) u sum|x|; both are also checked against the exact sum (in double) with
/// (n-1) u sum|x|. Also checks that every rank holds bitwise the same result (replicas stay
/// identical).
inline void fused_vs_per_tensor_body(Comm& comm) {
  const int n = comm.size();
  const std::uint64_t seed = default_seed + 90;
  const FusedVsPerTensor r = fused_vs_per_tensor(comm, seed);
  const double u = std::ldexp(1.0, -24);
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < r.fused.size(); ++i) {
    double exact = 0.0, abs_sum = 0.0;
    for (int q = 0; q < n; ++q) {
      const double g = gradient_value(q, seed, i);
      exact += g;  // exact: a few terms with 24-bit mantissas within 8 binades fit in a double
      abs_sum += std::abs(g);
    }
    const double bound = (n - 1) * u * abs_sum * 1.0000001;
    const bool ok = std::abs(static_cast<double>(r.fused[i]) - r.per_tensor[i]) <= 2 * bound &&
                    std::abs(r.fused[i] - exact) <= bound + std::abs(exact) * u &&
                    std::abs(r.per_tensor[i] - exact) <= bound + std::abs(exact) * u;
    if (!ok && bad++ == 0) first = i;
  }
  CHECK_MESSAGE(bad == 0, "C9 on ", comm.name(), ": ", bad, " elements differ beyond fp32 round-off, first at ",
                first, ": fused ", r.fused[first], ", per-tensor ", r.per_tensor[first]);

  // Replicas stay identical: hash the bits of both results and compare across ranks.
  auto bits_hash = [](const std::vector<float>& v) {
    std::uint64_t h = 0;
    for (float x : v) {
      std::uint32_t b = 0;
      std::memcpy(&b, &x, sizeof b);
      h = mix(h ^ b);
    }
    return static_cast<std::int64_t>(h >> 1);
  };
  const std::vector<std::int64_t> mine{bits_hash(r.fused), bits_hash(r.per_tensor)};
  std::vector<std::int64_t> all(2 * static_cast<std::size_t>(n));
  comm.all_gather(mine, all);
  for (int q = 0; q < n; ++q) {
    CHECK_MESSAGE(all[2 * static_cast<std::size_t>(q)] == mine[0], "fused all_reduce result differs bitwise between rank ",
                  comm.rank(), " and rank ", q, " on ", comm.name());
    CHECK_MESSAGE(all[2 * static_cast<std::size_t>(q) + 1] == mine[1],
                  "per-tensor all_reduce result differs bitwise between rank ", comm.rank(), " and rank ", q,
                  " on ", comm.name());
  }
}

// ---- argument errors (local checks, no communication) -----------------------------------------

/// Bad roots, peers and buffer sizes throw tessera::Error naming the values, before any
/// communication (so the ranks stay in step).
inline void argument_errors_body(Comm& comm) {
  const int n = comm.size();
  const std::string ns = std::to_string(n);
  std::vector<float> v(4, 1.0f), out(4 * static_cast<std::size_t>(n) + 1, 0.0f), small(3, 0.0f);

  check_contains(thrown_message<tessera::Error>([&] { comm.broadcast(v, n); }),
                 {"broadcast", "root " + ns, "out of range", "size " + ns});
  check_contains(thrown_message<tessera::Error>([&] { comm.broadcast(v, -1); }), {"root -1", "out of range"});
  check_contains(thrown_message<tessera::Error>([&] { comm.send(v, n + 2, 0); }),
                 {"send", "peer " + std::to_string(n + 2), "out of range"});
  check_contains(thrown_message<tessera::Error>([&] { comm.send(v, comm.rank(), 0); }),
                 {"send", "peer " + std::to_string(comm.rank()), "this rank"});
  check_contains(thrown_message<tessera::Error>([&] { comm.recv(v, -3, 0); }), {"recv", "peer -3"});
  if (n > 1) {
    const int other = (comm.rank() + 1) % n;
    check_contains(thrown_message<tessera::Error>([&] { comm.send(v, other, -1); }), {"tag", "-1"});
  }
  check_contains(thrown_message<tessera::Error>([&] { comm.all_gather(v, out); }),
                 {"all_gather", std::to_string(out.size()), "4 x " + ns});
  check_contains(thrown_message<tessera::Error>([&] { comm.reduce_scatter(v, small, ReduceOp::sum); }),
                 {"reduce_scatter", "3 x " + ns});
  const std::vector<P2POp> bad{P2POp::send(std::span<const float>(v), n, 0)};
  check_contains(thrown_message<tessera::Error>([&] { comm.batch_send_recv(bad); }),
                 {"batch send", "peer " + ns});
  check_contains(thrown_message<tessera::Error>([&] { static_cast<void>(comm.split(-1, 0)); }),
                 {"split", "color", "-1"});
  comm.barrier();  // the ranks are still in step
}

// ---- large buffers ----------------------------------------------------------------------------

/// 64 MiB of float through all_reduce, all_gather, reduce_scatter and broadcast (counts not
/// divisible by the world size), checked against the serial result.
inline void large_body(Comm& comm) {
  const int n = comm.size(), rank = comm.rank();
  const std::size_t un = static_cast<std::size_t>(n);
  const std::uint64_t s = default_seed + 100;
  {
    std::vector<float> data = inputs<float>(rank, s, large_count);
    comm.all_reduce(data, ReduceOp::sum);
    check_equal(data, expected_reduce<float>(n, s, 0, large_count, ReduceOp::sum),
                label<float>("large all_reduce sum", large_count, comm));
  }
  const std::size_t per_rank = large_count / un + 1;
  {
    const std::vector<float> in = inputs<float>(rank, s + 1, per_rank);
    std::vector<float> out(per_rank * un, -7.0f);
    comm.all_gather(in, out);
    for (int r = 0; r < n; ++r) {
      const std::vector<float> part(out.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * per_rank),
                                    out.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r + 1) * per_rank));
      check_equal(part, inputs<float>(r, s + 1, per_rank),
                  label<float>(tessera::detail::str("large all_gather, block of rank ", r), per_rank, comm));
    }
  }
  {
    const std::vector<float> in = inputs<float>(rank, s + 2, per_rank * un);
    std::vector<float> out(per_rank, -7.0f);
    comm.reduce_scatter(in, out, ReduceOp::sum);
    check_equal(out, expected_reduce<float>(n, s + 2, static_cast<std::size_t>(rank) * per_rank, per_rank, ReduceOp::sum),
                label<float>("large reduce_scatter sum", per_rank, comm));
  }
  {
    const int root = n - 1;
    std::vector<float> data = rank == root ? inputs<float>(root, s + 3, large_count) : std::vector<float>(large_count, -7.0f);
    comm.broadcast(data, root);
    check_equal(data, inputs<float>(root, s + 3, large_count), label<float>("large broadcast", large_count, comm));
  }
}

// ---- everything -------------------------------------------------------------------------------

/// Runs every body above in a fixed order; with `big`, also the 64 MiB bodies (large_body and
/// the 64 MiB C6 exchange). Collective over `comm`.
inline void run_all_bodies(Comm& comm, bool big) {
  all_reduce_sum_body(comm);
  all_reduce_avg_body(comm);
  all_reduce_max_min_body(comm);
  all_gather_body(comm);
  reduce_scatter_body(comm);
  in_place_body(comm);
  broadcast_body(comm);
  send_recv_ring_body(comm);
  isend_irecv_body(comm);
  nonblocking_overlap_body(comm);
  batch_p2p_exchange_body(comm, false);
  barrier_body(comm);
  split_body(comm);
  all_reduce_value_body(comm);
  fused_vs_per_tensor_body(comm);
  argument_errors_body(comm);
  if (big) {
    large_body(comm);
    batch_p2p_exchange_body(comm, true);
  }
}

}  // namespace collective_bodies
