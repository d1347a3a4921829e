// The threads backend: every collective against a serial computation in rank order, at world
// sizes 1..8; bitwise reproducibility; mismatch, timeout and abort paths; the Mesh.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "tessera/tessera.hpp"

using namespace tessera;
using testing::run_ranks;

namespace {

// Deterministic, rank- and index-dependent values with non-trivial fp32 rounding.
template <class T>
T value(int rank, std::size_t i, int seed = 1) {
  std::uint64_t z = (static_cast<std::uint64_t>(rank) * 0x9E3779B97F4A7C15ull) ^ (i * 0xBF58476D1CE4E5B9ull) ^
                    static_cast<std::uint64_t>(seed);
  z ^= z >> 31;
  z *= 0x94D049BB133111EBull;
  z ^= z >> 29;
  if constexpr (std::is_floating_point_v<T>)
    return static_cast<T>(static_cast<double>(z % 2000003) / 1000001.0 - 1.0);
  else
    return static_cast<T>(static_cast<std::int64_t>(z % 2001) - 1000);
}

template <class T>
std::vector<T> input(int rank, std::size_t n, int seed = 1) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = value<T>(rank, i, seed);
  return v;
}

// The serial reduction in rank order 0, 1, ..., n-1: what the threads backend must equal bitwise.
template <class T>
std::vector<T> serial_reduce(int n, std::size_t count, ReduceOp op, int seed = 1) {
  std::vector<T> acc = input<T>(0, count, seed);
  for (int r = 1; r < n; ++r) {
    auto x = input<T>(r, count, seed);
    for (std::size_t i = 0; i < count; ++i) {
      if (op == ReduceOp::sum || op == ReduceOp::avg) acc[i] += x[i];
      if (op == ReduceOp::max) acc[i] = std::max(acc[i], x[i]);
      if (op == ReduceOp::min) acc[i] = std::min(acc[i], x[i]);
    }
  }
  if (op == ReduceOp::avg)
    for (auto& a : acc) a = static_cast<T>(a / static_cast<T>(n));
  return acc;
}

const std::size_t kCounts[] = {0, 1, 7, 1001, 4099};

template <class T>
void check_all_reduce(int n) {
  for (std::size_t count : kCounts)
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::avg, ReduceOp::max, ReduceOp::min}) {
      auto out = run_ranks(n, [&](Comm& c) {
        auto x = input<T>(c.rank(), count);
        c.all_reduce(x, op);
        return x;
      });
      const auto want = serial_reduce<T>(n, count, op);
      for (int r = 0; r < n; ++r) REQUIRE(out[static_cast<std::size_t>(r)] == want);  // bitwise
    }
}

}  // namespace

TEST_CASE("all_reduce: every op and type at world sizes 1..8 equals the serial reduction in rank order, bitwise") {
  for (int n = 1; n <= 8; ++n) {
    CAPTURE(n);
    check_all_reduce<float>(n);
    check_all_reduce<double>(n);
    check_all_reduce<std::int32_t>(n);
    check_all_reduce<std::int64_t>(n);
  }
}

TEST_CASE("all_gather and reduce_scatter at world sizes 1..8 equal the serial result") {
  for (int n = 1; n <= 8; ++n)
    for (std::size_t count : kCounts) {
      CAPTURE(n);
      CAPTURE(count);
      auto gathered = run_ranks(n, [&](Comm& c) {
        auto x = input<float>(c.rank(), count);
        std::vector<float> out(count * static_cast<std::size_t>(n), -7.f);
        c.all_gather(x, out);
        return out;
      });
      std::vector<float> want;
      for (int r = 0; r < n; ++r) {
        auto x = input<float>(r, count);
        want.insert(want.end(), x.begin(), x.end());
      }
      for (auto& g : gathered) REQUIRE(g == want);

      auto scattered = run_ranks(n, [&](Comm& c) {
        auto x = input<double>(c.rank(), count * static_cast<std::size_t>(n));
        std::vector<double> out(count);
        c.reduce_scatter(x, out, ReduceOp::sum);
        return out;
      });
      auto full = serial_reduce<double>(n, count * static_cast<std::size_t>(n), ReduceOp::sum);
      for (int r = 0; r < n; ++r) {
        std::vector<double> block(full.begin() + static_cast<std::ptrdiff_t>(count) * r,
                                  full.begin() + static_cast<std::ptrdiff_t>(count) * (r + 1));
        REQUIRE(scattered[static_cast<std::size_t>(r)] == block);
      }
    }
}

TEST_CASE("broadcast from every root, barrier, and all_reduce_value give every rank the same value") {
  for (int n = 1; n <= 7; ++n)
    for (int root = 0; root < n; ++root) {
      auto out = run_ranks(n, [&](Comm& c) {
        auto x = input<std::int64_t>(c.rank(), 33);
        c.broadcast(x, root);
        c.barrier();
        const double loss = c.all_reduce_value(static_cast<double>(c.rank() + 1), ReduceOp::max);
        return std::pair{x, loss};
      });
      for (auto& [x, loss] : out) {
        REQUIRE(x == input<std::int64_t>(root, 33));
        REQUIRE(loss == static_cast<double>(n));
      }
    }
}

TEST_CASE("send/recv around a ring and isend/irecv deliver exactly the sent values") {
  for (int n = 2; n <= 5; ++n) {
    auto out = run_ranks(n, [&](Comm& c) {
      const int next = (c.rank() + 1) % n, prev = (c.rank() + n - 1) % n;
      auto x = input<float>(c.rank(), 1001);
      std::vector<float> y(1001), z(5);
      if (c.rank() % 2 == 0) {
        c.send(x, next, 3);
        c.recv(y, prev, 3);
      } else {
        c.recv(y, prev, 3);
        c.send(x, next, 3);
      }
      // Non-blocking: post the receive first, then send; two messages with different tags.
      Request r = c.irecv(z, prev, 9);
      std::vector<float> small(5, static_cast<float>(c.rank()));
      c.isend(small, next, 9).wait();
      r.wait();
      return std::pair{y, z};
    });
    for (int r = 0; r < n; ++r) {
      REQUIRE(out[static_cast<std::size_t>(r)].first == input<float>((r + n - 1) % n, 1001));
      REQUIRE(out[static_cast<std::size_t>(r)].second == std::vector<float>(5, static_cast<float>((r + n - 1) % n)));
    }
  }
}

TEST_CASE("batch_isend_irecv: two ranks that both list send before recv exchange 64 MiB without deadlock (C6)") {
  const std::size_t count = 64u << 20 >> 2;  // 64 MiB of float
  auto out = run_ranks(2, [&](Comm& c) {
    std::vector<float> mine(count, static_cast<float>(c.rank() + 1)), theirs(count, 0.f);
    const int peer = 1 - c.rank();
    std::vector<P2POp> ops{P2POp::send<float>(mine, peer), P2POp::recv<float>(theirs, peer)};
    c.batch_send_recv(ops);
    return theirs[0] + theirs[count - 1];
  });
  CHECK(out[0] == 4.f);
  CHECK(out[1] == 2.f);
}

TEST_CASE("all_reduce of 64 MiB on 4 ranks equals the serial sum in rank order, bitwise") {
  const std::size_t count = 64u << 20 >> 2;
  auto out = run_ranks(4, [&](Comm& c) {
    std::vector<float> x(count);
    for (std::size_t i = 0; i < count; ++i) x[i] = value<float>(c.rank(), i % 9973);
    c.all_reduce(x);
    return std::vector<float>(x.begin(), x.begin() + 20011);
  });
  for (std::size_t i = 0; i < 20011; ++i) {
    float acc = value<float>(0, i % 9973);
    for (int r = 1; r < 4; ++r) acc += value<float>(r, i % 9973);
    REQUIRE(out[0][i] == acc);
    REQUIRE(out[3][i] == acc);
  }
}

TEST_CASE("threads backend results are bitwise equal over 3 runs") {
  auto once = [] {
    return run_ranks(7, [](Comm& c) {
      auto x = input<float>(c.rank(), 10007, 5);
      c.all_reduce(x, ReduceOp::avg);
      std::vector<float> out(1429);
      c.reduce_scatter(std::span<const float>(x).first(1429 * 7), out);
      return out;
    });
  };
  auto a = once(), b = once(), c = once();
  CHECK(a == b);
  CHECK(b == c);
}

// What "overlap" means observably: the threads backend runs non-blocking collectives on a
// progress thread of its own, so a request completes -- test() turns true -- while the issuing
// rank computes, before it calls wait() or any other communication. What "issue order" means:
// a request is never complete before one issued earlier. Each poll tests the requests from the
// last to the first, so when request j + 1 is seen complete, request j, tested just after, must
// be complete too; the set of complete requests is always a prefix of the issue order.
TEST_CASE("non-blocking collectives complete while the rank computes, before any wait(), in issue order, and equal "
          "the serial results") {
  constexpr int kReduces = 6;
  constexpr ReduceOp kOps[kReduces] = {ReduceOp::sum, ReduceOp::avg, ReduceOp::max,
                                       ReduceOp::min, ReduceOp::sum, ReduceOp::sum};
  // Heavy and light requests alternate, so that a backend completing out of issue order shows
  // it: the light ones would overtake the heavy ones in front of them.
  auto count_of = [](int k) { return (k % 2 == 0 ? std::size_t{1} << 19 : 1000) + 37 * static_cast<std::size_t>(k); };
  constexpr std::size_t kGather = 50, kScatter = 13;
  constexpr int kRequests = kReduces + 2;  // the all-reduces, one all-gather, one reduce-scatter
  struct Observed {
    std::vector<std::vector<double>> reduced;  // the kReduces all-reduced buffers
    std::vector<double> gathered, scattered;
    bool all_done_before_wait = false;         // every test() turned true while computing
    bool always_prefix = true;                 // completions never ran ahead of issue order
    std::vector<long> completed_at_poll;       // the poll that first saw each request complete
    bool queued_behind = false;                // a pending request completed by a later blocking call
    std::vector<double> after_blocking;        // that request's result
  };
  for (int n : {1, 2, 3, 4, 7}) {
    CAPTURE(n);
    auto out = run_ranks(n, [&](Comm& c) {
      Observed o;
      for (int k = 0; k < kReduces; ++k) o.reduced.push_back(input<double>(c.rank(), count_of(k), k));
      const auto mine = input<double>(c.rank(), kGather, 99);
      const auto to_scatter = input<double>(c.rank(), kScatter * static_cast<std::size_t>(n), 77);
      o.gathered.assign(kGather * static_cast<std::size_t>(n), 0.0);
      o.scattered.assign(kScatter, 0.0);
      std::vector<Request> reqs;
      for (int k = 0; k < kReduces; ++k) reqs.push_back(c.iall_reduce(o.reduced[static_cast<std::size_t>(k)], kOps[k]));
      reqs.push_back(c.iall_gather(mine, o.gathered));
      reqs.push_back(c.ireduce_scatter(to_scatter, o.scattered));

      // Computation, in short chunks, with a poll of every request before each chunk; no
      // barrier, no wait(), no other communication. A backend that progressed only inside
      // wait() would leave the requests pending until the deadline.
      o.completed_at_poll.assign(kRequests, -1);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      double acc = 0;
      for (long poll = 0;; ++poll) {
        bool later_done = false;
        for (int j = kRequests; j-- > 0;) {
          const bool done = reqs[static_cast<std::size_t>(j)].test();
          if (done && o.completed_at_poll[static_cast<std::size_t>(j)] < 0)
            o.completed_at_poll[static_cast<std::size_t>(j)] = poll;
          if (later_done && !done) o.always_prefix = false;
          later_done = later_done || done;
        }
        if (std::ranges::all_of(o.completed_at_poll, [](long p) { return p >= 0; })) break;
        if (std::chrono::steady_clock::now() > deadline) break;
        for (int i = 1; i <= 2000; ++i) acc += std::sqrt(static_cast<double>(i) + acc * 1e-12);
      }
      o.all_done_before_wait = std::ranges::all_of(o.completed_at_poll, [](long p) { return p >= 0; });
      for (auto& r : reqs) r.wait();
      REQUIRE(std::isfinite(acc));

      // A blocking collective issued while a non-blocking one is pending runs after it.
      o.after_blocking = input<double>(c.rank(), 301, 5);
      Request pending = c.iall_reduce(o.after_blocking);
      std::vector<double> blocking = input<double>(c.rank(), 7, 6);
      c.all_reduce(blocking);
      o.queued_behind = pending.test();
      pending.wait();
      return o;
    });
    for (int r = 0; r < n; ++r) {
      CAPTURE(r);
      const Observed& o = out[static_cast<std::size_t>(r)];
      CHECK(o.all_done_before_wait);
      CHECK(o.always_prefix);
      CHECK(std::ranges::is_sorted(o.completed_at_poll));
      CHECK(o.queued_behind);
      for (int k = 0; k < kReduces; ++k) {
        CAPTURE(k);
        CHECK(o.reduced[static_cast<std::size_t>(k)] == serial_reduce<double>(n, count_of(k), kOps[k], k));
      }
      for (int q = 0; q < n; ++q)
        for (std::size_t i = 0; i < kGather; ++i)
          REQUIRE(o.gathered[static_cast<std::size_t>(q) * kGather + i] == value<double>(q, i, 99));
      const auto sum = serial_reduce<double>(n, kScatter * static_cast<std::size_t>(n), ReduceOp::sum, 77);
      CHECK(o.scattered == std::vector<double>(sum.begin() + r * static_cast<std::ptrdiff_t>(kScatter),
                                               sum.begin() + (r + 1) * static_cast<std::ptrdiff_t>(kScatter)));
      CHECK(o.after_blocking == serial_reduce<double>(n, 301, ReduceOp::sum, 5));
    }
  }
}

TEST_CASE("C9: one fused bucket and one all_reduce per tensor give bitwise equal gradients") {
  const std::vector<std::size_t> sizes{3, 1000, 17, 4096, 1};
  auto out = run_ranks(3, [&](Comm& c) {
    std::vector<std::vector<float>> grads;
    std::vector<float> bucket;
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      grads.push_back(input<float>(c.rank(), sizes[k], static_cast<int>(k) + 10));
      bucket.insert(bucket.end(), grads.back().begin(), grads.back().end());
    }
    for (auto& g : grads) c.all_reduce(g);
    c.all_reduce(bucket);
    std::vector<float> flat;
    for (auto& g : grads) flat.insert(flat.end(), g.begin(), g.end());
    return flat == bucket;
  });
  CHECK(out == std::vector<bool>{true, true, true});
}

TEST_CASE("split: colors form groups ordered by key, and collectives run on each group") {
  for (int n = 1; n <= 8; ++n) {
    auto out = run_ranks(n, [&](Comm& c) {
      Comm sub = c.split(c.rank() % 2, -c.rank());  // reversed order inside each color
      std::vector<std::int32_t> who(static_cast<std::size_t>(sub.size()));
      std::int32_t me = c.rank();
      sub.all_gather(std::span<const std::int32_t>(&me, 1), who);
      return std::pair{sub.rank(), who};
    });
    for (int r = 0; r < n; ++r) {
      std::vector<std::int32_t> want;
      for (int q = n - 1; q >= 0; --q)
        if (q % 2 == r % 2) want.push_back(q);
      CHECK(out[static_cast<std::size_t>(r)].second == want);
      CHECK(want[static_cast<std::size_t>(out[static_cast<std::size_t>(r)].first)] == r);
    }
  }
}

TEST_CASE("Mesh: 8 ranks as dp2 x pp2 x tp2 give Megatron's groups, tp fastest and pp slowest") {
  auto out = run_ranks(8, [](Comm& c) {
    Mesh mesh(c, MeshShape{.dp = 2, .pp = 2, .tp = 2});
    auto members = [](Comm& axis, int me) {
      std::vector<std::int32_t> m(static_cast<std::size_t>(axis.size()));
      std::int32_t x = me;
      axis.all_gather(std::span<const std::int32_t>(&x, 1), m);
      return m;
    };
    REQUIRE(mesh.rank_of(mesh.coord()) == c.rank());
    REQUIRE(mesh.tp().rank() == mesh.coord().tp);
    REQUIRE(mesh.dp().rank() == mesh.coord().dp);
    REQUIRE(mesh.pp().rank() == mesh.coord().pp);
    return std::tuple{members(mesh.tp(), c.rank()), members(mesh.dp(), c.rank()), members(mesh.pp(), c.rank())};
  });
  using V = std::vector<std::int32_t>;
  CHECK(std::get<0>(out[0]) == V{0, 1});
  CHECK(std::get<0>(out[5]) == V{4, 5});
  CHECK(std::get<1>(out[0]) == V{0, 2});
  CHECK(std::get<1>(out[5]) == V{5, 7});
  CHECK(std::get<2>(out[1]) == V{1, 5});
  CHECK(std::get<2>(out[6]) == V{2, 6});
}

TEST_CASE("Mesh: a world size that does not fit the mesh fails on every rank, naming the numbers") {
  std::string msg;
  try {
    run_ranks(6, [](Comm& c) { Mesh mesh(c, MeshShape{.dp = 4, .pp = 2, .tp = 1}); });
  } catch (const Error& e) {
    msg = e.what();
  }
  CHECK(msg.find("Mesh: world size 6 is not dp(4) x pp(2) x tp(1) = 8") != std::string::npos);
}

TEST_CASE("bad input: wrong output size, peer and root out of range are errors naming the values") {
  run_ranks(3, [](Comm& c) {
    std::vector<float> in(4), out(11);
    try {
      c.all_gather(in, out);
      FAIL("no throw");
    } catch (const Error& e) {
      REQUIRE(std::string(e.what()).find("output has 11 elements but input has 4 x 3 ranks = 12") != std::string::npos);
    }
    try {
      c.reduce_scatter(out, in);
      FAIL("no throw");
    } catch (const Error& e) {
      REQUIRE(std::string(e.what()).find("input has 11 elements but output has 4 x 3 ranks = 12") != std::string::npos);
    }
    try {
      c.send(in, 3);
      FAIL("no throw");
    } catch (const Error& e) {
      REQUIRE(std::string(e.what()).find("peer 3 is out of range for threads:world of size 3") != std::string::npos);
    }
    try {
      c.broadcast(in, -1);
      FAIL("no throw");
    } catch (const Error& e) {
      REQUIRE(std::string(e.what()).find("root -1 is out of range") != std::string::npos);
    }
  });
}

TEST_CASE("mismatch: ranks calling different collectives or counts fail on every rank naming both calls") {
  std::vector<std::string> msgs(3);
  CHECK_THROWS_AS(run_ranks(3,
                            [&](Comm& c) {
                              std::vector<float> x(c.rank() == 2 ? 5 : 10);
                              try {
                                c.all_reduce(x);
                              } catch (const MismatchError& e) {
                                msgs[static_cast<std::size_t>(c.rank())] = e.what();
                                throw;
                              }
                            }),
                  MismatchError);
  for (auto& m : msgs)
    CHECK(m.find("rank 0 called all_reduce(float32, count=10, sum) but rank 2 called all_reduce(float32, count=5, sum)") !=
          std::string::npos);

  std::string msg;
  try {
    run_ranks(2, [&](Comm& c) {
      std::vector<float> x(4), y(8);
      if (c.rank() == 0) c.all_reduce(x);
      else c.all_gather(x, y);
    });
  } catch (const MismatchError& e) {
    msg = e.what();
  }
  CHECK(msg.find("rank 0 called all_reduce(float32, count=4, sum) but rank 1 called all_gather(float32, count=4 per rank)") !=
        std::string::npos);
}

TEST_CASE("a rank that skips a collective: the others fail at once naming it, no hang") {
  const auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    run_ranks(3, [](Comm& c) {
      std::vector<float> x(8);
      if (c.rank() != 1) c.all_reduce(x);
    });
  } catch (const TimeoutError& e) {
    msg = e.what();
  }
  CHECK(msg.find("all_reduce(float32, count=8, sum) on threads:world") != std::string::npos);
  CHECK(msg.find("can never complete") != std::string::npos);
  CHECK(msg.find("rank 1 (world rank 1) had returned from its function") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
}

TEST_CASE("a collective that waits past its timeout throws, naming who did not arrive and what it was doing") {
  const auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    run_ranks(
        2,
        [](Comm& c) {
          std::vector<double> x(3);
          if (c.rank() == 0) {
            c.all_reduce(x);
          } else {
            std::vector<double> y(1);
            c.set_timeout(std::chrono::seconds(20));  // so that rank 0 times out first
            c.recv(y, 0, 5);  // waits for a send that never comes
          }
        },
        threads::RunOptions{.timeout = std::chrono::milliseconds(300)});
  } catch (const TimeoutError& e) {
    msg = e.what();
  } catch (const AbortedError& e) {
    msg = e.what();
  }
  CHECK(msg.find("timed out") != std::string::npos);
  CHECK(msg.find("was waiting in recv(float64, count=1, from peer 0)") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
}

TEST_CASE("a rank that throws makes every other rank throw AbortedError; run rethrows the original") {
  std::vector<std::string> seen(4);
  std::string first;
  try {
    run_ranks(4, [&](Comm& c) {
      std::vector<float> x(16);
      c.all_reduce(x);
      if (c.rank() == 2) throw std::runtime_error("boom on rank two");
      try {
        c.all_reduce(x);
      } catch (const AbortedError& e) {
        seen[static_cast<std::size_t>(c.rank())] = e.what();
        throw;
      }
    });
  } catch (const std::runtime_error& e) {
    first = e.what();
  }
  CHECK(first == "boom on rank two");
  for (int r : {0, 1, 3}) {
    CHECK(seen[static_cast<std::size_t>(r)].find("world rank 2 failed") != std::string::npos);
    CHECK(seen[static_cast<std::size_t>(r)].find("boom on rank two") != std::string::npos);
  }
}

TEST_CASE("a failure elsewhere during a collective: every rank finishes reading its peers' buffers before any leaves "
          "(no use after free), then the next collective throws AbortedError; posted receives are withdrawn") {
  // Ranks 0 and 1 gather large buffers in a loop (each iteration's buffers freed after it) on a
  // communicator of their own while rank 2 fails: a rank that left the "done reading"
  // rendezvous early would free its buffer under its peer's copy (AddressSanitizer reports it;
  // CI's sanitizer stage runs this test). Rank 3 has a receive posted when rank 2 fails.
  std::vector<std::string> seen(4);
  std::vector<int> gathers_ok(4, 0);
  std::string first;
  try {
    run_ranks(4, [&](Comm& c) {
      Comm pair = c.split(c.rank() < 2 ? 0 : 1, c.rank());
      const std::size_t r = static_cast<std::size_t>(c.rank());
      try {
        if (c.rank() == 2) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
          throw std::runtime_error("boom on rank two");
        }
        if (c.rank() == 3) {
          std::vector<float> in(1024);
          pair.recv(in, 0, 7);  // rank 2 never sends
          return;
        }
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);  // rank 2 fails long before
        for (int it = 0; std::chrono::steady_clock::now() < until; ++it) {
          std::vector<float> mine(1 << 16, static_cast<float>(c.rank() + it)), all(2 << 16);
          pair.all_gather(mine, all);
          if (all[0] != static_cast<float>(it) || all[1 << 16] != static_cast<float>(1 + it)) return;
          ++gathers_ok[r];
        }
      } catch (const AbortedError& e) {
        seen[r] = e.what();
        throw;
      }
    });
  } catch (const std::runtime_error& e) {
    first = e.what();
  }
  CHECK(first == "boom on rank two");
  for (int r : {0, 1, 3}) {
    CAPTURE(r);
    CHECK(seen[static_cast<std::size_t>(r)].find("world rank 2 failed") != std::string::npos);
  }
  CHECK(gathers_ok[0] == gathers_ok[1]);  // every gather either completed on both ranks or on neither
}

TEST_CASE("recv with a count other than the send's is an error naming both counts") {
  std::string msg;
  try {
    run_ranks(2, [](Comm& c) {
      std::vector<float> x(c.rank() == 0 ? 10 : 12);
      if (c.rank() == 0) c.send(x, 1);
      else c.recv(x, 0);
    });
  } catch (const CommError& e) {
    msg = e.what();
  }
  CHECK(msg.find("rank 1 expected 12 float32 from rank 0 (tag 0) but the matching send has 10 float32") !=
        std::string::npos);
}

TEST_CASE("threads::run returns each rank's result in rank order and rejects n < 1") {
  auto r = run_ranks(5, [](Comm& c) { return c.rank() * 10 + c.size(); });
  CHECK(r == std::vector<int>{5, 15, 25, 35, 45});
  CHECK_THROWS_WITH_AS(run_ranks(0, [](Comm&) {}), doctest::Contains("must be >= 1, got 0"), Error);
}

TEST_CASE("instrumented communicator counts calls and bytes per kind, also on split communicators") {
  auto counts = run_ranks(2, [](Comm& world) {
    auto counters = std::make_shared<testing::CommCounters>();
    Comm c = testing::instrument(world, counters);
    std::vector<float> x(10), g(20), s(5);
    c.all_reduce(x);
    c.all_gather(x, g);
    c.reduce_scatter(x, s);
    Comm sub = c.split(0, c.rank());
    sub.all_reduce(g);
    using K = testing::CallKind;
    return std::tuple{counters->calls(K::all_reduce), counters->elements(K::all_reduce), counters->bytes(K::all_gather),
                      counters->elements(K::reduce_scatter), counters->calls(K::split)};
  });
  CHECK(counts[0] == std::tuple<std::size_t, std::size_t, std::size_t, std::size_t, std::size_t>{2, 30, 40, 10, 1});
}

TEST_CASE("Request::test on a receive whose sender returned without sending fails at once instead of polling forever") {
  std::string msg;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    run_ranks(2, [](Comm& c) {
      if (c.rank() == 1) return;  // never sends
      std::vector<float> x(4);
      Request r = c.irecv(x, 1, 7);
      while (!r.test()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    });
  } catch (const TimeoutError& e) {
    msg = e.what();
  }
  CHECK(msg.find("can never complete") != std::string::npos);
  CHECK(msg.find("never sent tag 7") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
}

TEST_CASE("a blocking collective right after non-blocking ones completes before it returns") {
  // Regression: a blocking call issued while the progress thread still counted a finished
  // non-blocking op as pending was queued behind it and returned before running, so its
  // output was unwritten and a peer could read its freed input (found by Hybrid's ZeRO-1).
  for (int iter = 0; iter < 200; ++iter) {
    const auto ok = tessera::threads::run(2, [](tessera::Comm& w) {
      std::vector<float> full(1000, 0.0f);
      for (int i = 0; i < 500; ++i) full[static_cast<std::size_t>(w.rank() * 500 + i)] = static_cast<float>(w.rank() + 1);
      std::vector<tessera::Request> reqs;
      reqs.push_back(w.iall_gather(std::span<const float>(full.data() + w.rank() * 500, 500), std::span<float>(full)));
      for (auto& r : reqs) r.wait();
      bool good = true;
      for (int k = 0; k < 4; ++k) {
        std::vector<float> mine(300, static_cast<float>(10 * (w.rank() + 1) + k)), all(600, -1.0f);
        w.all_gather(mine, all);
        for (int q = 0; q < 2; ++q)
          for (int i = 0; i < 300; ++i) good = good && all[static_cast<std::size_t>(q * 300 + i)] == static_cast<float>(10 * (q + 1) + k);
        std::vector<double> x{static_cast<double>(w.rank() + 1)};
        w.all_reduce(x);
        good = good && x[0] == 3.0;
      }
      return good;
    });
    REQUIRE(ok[0]);
    REQUIRE(ok[1]);
  }
}
