// ThrottledComm (comm/throttled_comm.hpp): bytes counted with the ring volumes, transfers no
// faster than latency x steps + bytes / bandwidth, queued on one link, and the results those of
// the wrapped communicator. Threads backend.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "tessera/comm/throttled_comm.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;
using testing::run_ranks;

TEST_CASE("throttled: ring-model bytes, at least bytes / bandwidth + latency per call, results unchanged") {
  // 4 ranks, an all-reduce of 250000 floats (1 MB): 2 (p - 1) / p = 1.5 MB sent by each rank;
  // at 1 Gb/s and 1 ms per step: 12 ms + 6 ms = 18 ms at least. Then two non-blocking
  // all-gathers of 1000 floats queued behind each other: 2 x (3 x 4000 B x 8 / 1e9 + 3 ms).
  auto out = run_ranks(4, [](Comm& world) {
    auto counters = std::make_shared<LinkCounters>();
    Comm c = throttled(world, {.bandwidth_gbit_s = 1.0, .latency_s = 1e-3}, counters);
    std::vector<float> x(250000, static_cast<float>(c.rank() + 1));
    const auto t0 = std::chrono::steady_clock::now();
    c.all_reduce(x);
    const double t_reduce = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::vector<float> in(1000, 1.0f), out1(4000), out2(4000);
    const auto t1 = std::chrono::steady_clock::now();
    Request r1 = c.iall_gather(in, out1), r2 = c.iall_gather(in, out2);
    r1.wait();
    r2.wait();
    const double t_gathers = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    Comm sub = c.split(c.rank() % 2, 0);  // shares the counters
    std::vector<double> y(10, 1.0);
    sub.all_reduce(y);
    return std::vector<double>{x[7], t_reduce, t_gathers, static_cast<double>(counters->bytes_sent),
                               static_cast<double>(counters->calls), counters->link_seconds, y[0]};
  });
  for (const auto& r : out) {
    CHECK(r[0] == 10.0);                       // 1 + 2 + 3 + 4
    CHECK(r[1] >= 0.018);
    CHECK(r[2] >= 2 * (3 * 4000 * 8 / 1e9 + 3e-3));
    CHECK(r[3] == 1500000 + 2 * 12000 + 80);   // all-reduce, 2 all-gathers, the 2-rank all-reduce of 80 B
    CHECK(r[4] == 4);
    CHECK(r[5] == doctest::Approx(0.018 + 2 * (0.000096 + 0.003) + (2 * 1e-3 + 80 * 8 / 1e9)).epsilon(1e-9));
    CHECK(r[6] == 2.0);
  }
  CHECK_THROWS_WITH_AS(run_ranks(1, [](Comm& w) { throttled(w, {.bandwidth_gbit_s = 0}, std::make_shared<LinkCounters>()); }),
                       doctest::Contains("bandwidth 0 Gb/s"), Error);
}
