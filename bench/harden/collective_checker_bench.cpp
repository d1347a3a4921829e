// What the collective-checking debug mode (CollectiveChecker, TESSERA_DEBUG_COLLECTIVES=detail)
// costs when it is off, and what it costs when it is on. With the mode off, Comm's collectives
// only add a relaxed load of one flag (the call site is recorded only once a checker exists):
// this times a 1-element all_reduce on 2 thread ranks, the smallest collective, where a fixed
// overhead shows most, through Comm (off) against the backend called directly, alternating in
// blocks, and reports the ratio of the medians. Then the same through a CollectiveChecker (on).
// Target: off / direct <= 1.05. Exits 0 (target met), 1 (missed) or 2 (a result is wrong).
//   OPENBLAS_NUM_THREADS=1 build/bench/harden/collective_checker_bench [blocks] [calls per block]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

#include "tessera/comm/collective_checker.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"

using namespace tessera;
using Clock = std::chrono::steady_clock;

namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Times {
  std::vector<double> direct, off, on;
  bool ok = true;
};

// Times the three paths on `n` thread ranks; returns rank 0's block times.
Times measure(int n, int blocks, int calls) {
  const auto out = threads::run(n, [&](Comm& world) {
    Times t;
    float x = 0;
    auto direct = [&] { world.backend().all_reduce(&x, 1, DType::f32, ReduceOp::sum, false); };
    auto front = [&] { world.all_reduce(std::span<float>(&x, 1)); };
    // Check the results first: 1 summed over n ranks on both paths.
    x = 1;
    direct();
    t.ok = t.ok && x == float(n);
    x = 1;
    front();
    t.ok = t.ok && x == float(n);
    auto time = [&](auto&& fn) {
      const auto t0 = Clock::now();
      for (int i = 0; i < calls; ++i) {
        x = 0;
        fn();
      }
      return std::chrono::duration<double>(Clock::now() - t0).count() / calls;
    };
    for (int b = 0; b < blocks; ++b) {  // alternating, so the machine's load falls on both
      if (b % 2 == 0) {
        t.direct.push_back(time(direct));
        t.off.push_back(time(front));
      } else {
        t.off.push_back(time(front));
        t.direct.push_back(time(direct));
      }
    }
    Comm checked = check_collectives(world);  // from here on Comm records call sites
    x = 1;
    checked.all_reduce(std::span<float>(&x, 1));
    t.ok = t.ok && x == float(n);
    for (int b = 0; b < std::max(1, blocks / 4); ++b) t.on.push_back(time([&] { checked.all_reduce(std::span<float>(&x, 1)); }));
    return t;
  });
  Times r = out[0];
  for (const Times& t : out) r.ok = r.ok && t.ok;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const int blocks = argc > 1 ? std::atoi(argv[1]) : 41, calls = argc > 2 ? std::atoi(argv[2]) : 2000;
  if (blocks < 1 || calls < 1) {
    std::fprintf(stderr, "collective_checker_bench: blocks and calls must be >= 1\n");
    return 2;
  }
  bool met = true;
  std::printf("all_reduce of 1 float, median of %d alternating blocks of %d calls (rank 0); the ratio is the median of\n"
              "the adjacent blocks' ratios\n", blocks, calls);
  for (int n : {1, 2}) {
    const Times t = measure(n, blocks, calls);
    if (!t.ok) {
      std::fprintf(stderr, "collective_checker_bench: an all_reduce of 1 over %d ranks did not give %d\n", n, n);
      return 2;
    }
    std::vector<double> ratios;
    for (std::size_t b = 0; b < t.off.size(); ++b) ratios.push_back(t.off[b] / t.direct[b]);
    const double direct = median(t.direct), off = median(t.off), on = median(t.on), ratio = median(ratios);
    std::printf("%d thread rank%s:\n", n, n > 1 ? "s" : "");
    std::printf("  backend called directly   %8.3f us\n", direct * 1e6);
    std::printf("  Comm, checker off         %8.3f us   ratio %.3f (target <= 1.05)\n", off * 1e6, ratio);
    std::printf("  Comm, CollectiveChecker   %8.3f us   ratio %.3f (an all_gather more per call)\n", on * 1e6, on / direct);
    met = met && ratio <= 1.05;
  }
  return met ? 0 : 1;
}
