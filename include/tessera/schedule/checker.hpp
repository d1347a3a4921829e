#pragma once
/// @file
/// schedule::check: validates any pipeline schedule (the provided ones or a hand-written one) by
/// simulating it across all ranks with batched-group semantics.

#include <algorithm>
#include <vector>

#include "tessera/schedule/detail/engine.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::schedule {

/// What schedule::check found out about a valid schedule.
struct CheckReport {
  /// Per rank: the largest number of (stage, micro-batch) pairs whose F has run and whose B (or
  /// W, for a split backward) has not yet -- the activation sets the rank must keep alive (per micro-batch without
  /// interleaving). 1F1B: min(pp_size - rank, m); GPipe: m.
  std::vector<int> peak_in_flight{};
  /// Per rank: number of ticks.
  std::vector<int> num_ticks{};

  /// The largest peak_in_flight over all ranks.
  int max_peak_in_flight() const {
    return peak_in_flight.empty() ? 0 : *std::max_element(peak_in_flight.begin(), peak_in_flight.end());
  }
};

/// Checks that `s` runs to completion on every backend. It verifies, in this order, and throws
/// tessera::Error naming the ranks, ticks and actions at the first failure:
///  - the shape: pp_size, num_microbatches, virtual_stages >= 1, one tick list per rank, a
///    valid stage_ranks;
///  - every action: micro-batch and stage in range, the stage lives on the acting rank, a
///    transfer names the rank of its peer stage (not its own rank), compute listed before
///    transfers in a tick, nothing done twice ("rank 0 does F(mb=1, stage=0) twice, ...");
///  - completeness: one F and one backward per (stage, micro-batch), fused (B) or split (I and
///    W, never both) ("... is incomplete: rank 1 never runs B(mb=3, stage=1) (or its split
///    I + W)"; "rank 0 runs I(mb=2, stage=0) but never W(mb=2, stage=0) ..."), and a
///    SEND/RECV pair for every hand-off between ranks;
///  - pairing: every RECV has its SEND ("rank 1 is stuck at tick 3 waiting for
///    RECV_F(mb=2, stage=1, from rank 0), which rank 0 never sends") and every SEND its RECV;
///  - order inside a rank: F after its input (the previous stage's F on the same rank, or its
///    RECV_F in an earlier tick), B or I after its F and its output gradient, W after its I
///    ("... W(mb=0, stage=0) needs I(mb=0, stage=0), which rank 0 runs only at tick 5 ..."),
///    SEND after the compute that produces what it sends (SEND_B: the B or the I);
///  - order between two ranks: the transfers from one rank to another are received in the
///    order they are sent (NCCL matches them in issue order);
///  - no deadlock: simulating all ranks, each tick's transfers issued as one batched group that
///    completes only when every peer has issued the matching operation (a send waits for its
///    receive, as large messages do on NCCL and MPI), every rank reaches its last tick
///    ("... deadlocks: rank 0 is stuck at tick 1 waiting for RECV_B(mb=0, stage=0, from rank 1):
///    rank 1 posts SEND_B only at its tick 2 and is itself stuck at tick 0; ...").
/// Purely local: no communication. Cost O(number of actions * pp_size).
inline CheckReport check(const Schedule& s) {
  detail::Engine engine(s);
  detail::EngineResult r = engine.run(nullptr);
  return CheckReport{.peak_in_flight = std::move(r.peak_in_flight), .num_ticks = std::move(r.num_ticks)};
}

/// Builds `builder`'s schedule for `pp_size` ranks and checks it (see check(const Schedule&)).
/// Throws what build() or check() throws.
template <ScheduleBuilder B>
CheckReport check(const B& builder, int pp_size) {
  return check(Schedule(builder.build(pp_size)));
}

}  // namespace tessera::schedule
