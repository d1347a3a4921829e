#pragma once
// comm_benchmark: times tessera's collectives on a communicator for `tessera-plan calibrate`
// (nccl-tests' idea: each collective at a few sizes, every rank calling it the same number of
// times, the time of rank 0 between two barriers).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/plan/calibration.hpp"

namespace tessera_plan {

// Collective over `world`: every rank calls it with the same sizes. Times all_reduce,
// all_gather, reduce_scatter (float buffers of each of `sizes` bytes: the all-reduce's buffer,
// the gathered buffer) and, between ranks 0 and 1, a ping-pong of send/recv (half a round trip
// is one message). Returns the samples on rank 0 (the median of `batches` batches of calls),
// nothing on the other ranks.
inline std::vector<tessera::plan::CommSample> measure_comm(tessera::Comm& world, const std::vector<double>& sizes,
                                                           int batches = 3) {
  using Clock = std::chrono::steady_clock;
  const int n = world.size(), me = world.rank();
  std::vector<tessera::plan::CommSample> out;
  auto time_it = [&](const std::string& name, double bytes, auto&& call) {
    // Enough calls for ~4 MB of traffic per batch, at least 2 and at most 50.
    const int calls = std::clamp(static_cast<int>(4e6 / bytes), 2, 50);
    call();  // warm up (buffers, worker threads)
    std::vector<double> per_call;
    for (int b = 0; b < batches; ++b) {
      world.barrier();
      const auto t0 = Clock::now();
      for (int c = 0; c < calls; ++c) call();
      world.barrier();
      per_call.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / calls);
    }
    std::sort(per_call.begin(), per_call.end());
    if (me == 0)
      out.push_back({.collective = name, .ranks = n, .bytes = bytes,
                     .seconds = per_call[per_call.size() / 2]});
  };
  for (double bytes : sizes) {
    const std::size_t count = static_cast<std::size_t>(bytes / sizeof(float)) / static_cast<std::size_t>(n) *
                              static_cast<std::size_t>(n);  // a multiple of n, for the gathers
    const double b = static_cast<double>(count * sizeof(float));
    std::vector<float> full(count, 1.0f), block(count / static_cast<std::size_t>(n), 1.0f);
    time_it("all_reduce", b, [&] { world.all_reduce(full); });
    time_it("all_gather", b, [&] { world.all_gather(block, full); });
    time_it("reduce_scatter", b, [&] { world.reduce_scatter(full, block); });
    if (n >= 2) {
      // Ping-pong between ranks 0 and 1; the others only join the barriers. Two messages per call.
      std::vector<double> per_call;
      const int calls = std::clamp(static_cast<int>(4e6 / b), 2, 50);
      for (int k = 0; k <= batches; ++k) {
        world.barrier();
        const auto t0 = Clock::now();
        for (int c = 0; c < calls; ++c) {
          if (me == 0) {
            world.send(full, 1);
            world.recv(full, 1);
          } else if (me == 1) {
            world.recv(full, 0);
            world.send(full, 0);
          }
        }
        world.barrier();
        if (k > 0) per_call.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / (2.0 * calls));
      }
      std::sort(per_call.begin(), per_call.end());
      if (me == 0)
        out.push_back({.collective = "send_recv", .ranks = n, .bytes = b, .seconds = per_call[per_call.size() / 2]});
    }
  }
  return out;
}

// Collective over `world`: the share of a core a rank uses while it waits for a message
// (0: it blocks and gives the core away, as the threads backend's condition variables do; near
// 1: it polls, as Open MPI does by default). Rank 0 sleeps 100 ms while the others wait for it
// in a barrier; the CPU time spent meanwhile over the wall time, per waiting rank. With
// `one_process` (threads backend) the process clock covers every rank; otherwise each process
// measures its own and the largest share is taken. Returns it on every rank.
inline double measure_waiting_share(tessera::Comm& world, bool one_process) {
  using Clock = std::chrono::steady_clock;
  const int n = world.size();
  if (n < 2) return 0.0;
  auto cpu = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  world.barrier();
  const double c0 = cpu();
  const auto t0 = Clock::now();
  if (world.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  world.barrier();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count(), used = cpu() - c0;
  double share = 0;
  if (one_process) share = world.rank() == 0 ? used / wall / (n - 1) : 0.0;
  else share = world.rank() == 0 ? 0.0 : used / wall;
  share = world.all_reduce_value(share, tessera::ReduceOp::max);
  return std::clamp(share, 0.0, 1.0);
}

}  // namespace tessera_plan
