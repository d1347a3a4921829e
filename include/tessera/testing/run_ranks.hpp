#pragma once
/// @file
/// run_ranks: the test harness. Starts n ranks on the threads backend, joins them, rethrows the
/// first failure and returns each rank's result, so assertions run on the main thread.

#include <utility>

#include "tessera/comm/thread/thread_communicator.hpp"

namespace tessera::testing {

/// Runs `fn(Comm& world)` on `n` thread ranks and returns their results in rank order
/// (std::vector<R>, nothing for void). Rethrows the first rank's exception; the other ranks
/// then fail with AbortedError instead of hanging. Same as threads::run.
template <class F>
auto run_ranks(int n, F&& fn, threads::RunOptions opts = {}) {
  return threads::run(n, std::forward<F>(fn), opts);
}

}  // namespace tessera::testing
