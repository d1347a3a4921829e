#pragma once
/// @file
/// Recorder: each rank records when it ran each action of a schedule; gather() collects all
/// ranks' records into one Timeline.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/timeline.hpp"

namespace tessera::schedule {

/// Records, on one rank, the start and end of each action it runs, in seconds since an epoch
/// shared by all ranks (std::chrono::steady_clock). An executor creates one per rank with
/// Recorder::synchronized, wraps each action in time() (or calls record()), and calls gather()
/// after the step.
class Recorder {
 public:
  /// The clock: monotonic, so measured durations never go negative.
  using Clock = std::chrono::steady_clock;

  /// A recorder for pipeline rank `rank` measuring from `epoch`. Events get chunk =
  /// schedule.chunk_of(stage) when a schedule is given, else 0. Throws Error if rank < 0.
  explicit Recorder(int rank, Clock::time_point epoch = Clock::now(), const Schedule* schedule = nullptr)
      : rank_(rank), epoch_(epoch) {
    TESSERA_EXPECTS(rank >= 0, "Recorder: rank must be >= 0, got ", rank);
    if (schedule)
      for (int s = 0; s < schedule->num_stages(); ++s) chunk_of_stage_.push_back(schedule->chunk_of(s));
  }

  /// A recorder for this rank of `comm` (the pipeline communicator) whose epoch is the moment
  /// all ranks leave a barrier, so the ranks' clocks line up (exactly on the threads backend;
  /// to the barrier's skew across processes, and only on one machine: steady_clock is per
  /// machine). Chunks are taken from `schedule`. Collective over `comm`: every rank calls it.
  static Recorder synchronized(Comm& comm, const Schedule& schedule) {
    comm.barrier();
    return Recorder(comm.rank(), Clock::now(), &schedule);
  }

  /// This recorder's rank.
  int rank() const { return rank_; }
  /// Seconds elapsed since the epoch.
  double now() const { return std::chrono::duration<double>(Clock::now() - epoch_).count(); }

  /// Records that `a` ran from `start` to `end` (seconds since the epoch). Throws Error if
  /// end < start.
  void record(const Action& a, double start, double end) {
    TESSERA_EXPECTS(end >= start, "Recorder::record: ", to_string(a), " ends (", end, " s) before it starts (",
                    start, " s)");
    const std::size_t s = static_cast<std::size_t>(a.stage_index);
    const int chunk = a.stage_index >= 0 && s < chunk_of_stage_.size() ? chunk_of_stage_[s] : 0;
    events_.push_back(TimelineEvent{.action = a, .rank = rank_, .chunk = chunk, .start = start, .end = end});
  }

  /// Runs `fn()`, records it as `a` (also when it throws), and returns its result.
  template <class F>
  decltype(auto) time(const Action& a, F&& fn) {
    struct Guard {
      Recorder& rec;
      const Action& action;
      double start;
      ~Guard() { rec.record(action, start, std::max(start, rec.now())); }
    } guard{*this, a, now()};
    return std::forward<F>(fn)();
  }

  /// This rank's events in recording order.
  const std::vector<TimelineEvent>& events() const { return events_; }
  /// Forgets the recorded events (keeps the epoch).
  void clear() { events_.clear(); }

  /// Collects every rank's events into one Timeline (num_ranks = comm.size()), using two
  /// all_gathers of doubles (the counts, then the events padded to the largest count).
  /// Collective over `comm`: every rank calls it, after recording; every rank gets the whole
  /// timeline. The recorder's rank must be this rank of `comm`; throws Error otherwise.
  Timeline gather(Comm& comm, std::string title = {}) const {
    TESSERA_EXPECTS(comm.rank() == rank_, "Recorder::gather: the recorder belongs to rank ", rank_, " but rank ",
                    comm.rank(), " of ", comm.name(), " gathers it");
    constexpr std::size_t fields = 7;  // kind, microbatch, stage, peer, chunk, start, end
    const std::size_t n = static_cast<std::size_t>(comm.size());
    std::vector<double> mine{static_cast<double>(events_.size())}, counts(n);
    comm.all_gather(mine, counts);
    std::size_t most = 0;
    for (double c : counts) most = std::max(most, static_cast<std::size_t>(c));
    std::vector<double> packed(most * fields, std::numeric_limits<double>::quiet_NaN());
    for (std::size_t i = 0; i < events_.size(); ++i) {
      const TimelineEvent& e = events_[i];
      double* f = packed.data() + i * fields;
      f[0] = static_cast<double>(e.action.kind);
      f[1] = e.action.microbatch;
      f[2] = e.action.stage_index;
      f[3] = e.action.peer;
      f[4] = e.chunk;
      f[5] = e.start;
      f[6] = e.end;
    }
    std::vector<double> all(packed.size() * n);
    comm.all_gather(packed, all);
    std::vector<std::vector<TimelineEvent>> per_rank(n);
    for (std::size_t r = 0; r < n; ++r)
      for (std::size_t i = 0; i < static_cast<std::size_t>(counts[r]); ++i) {
        const double* f = all.data() + (r * most + i) * fields;
        const Action a{static_cast<ActionKind>(static_cast<int>(f[0])), static_cast<int>(f[1]),
                       static_cast<int>(f[2]), static_cast<int>(f[3])};
        per_rank[r].push_back(TimelineEvent{
            .action = a, .rank = static_cast<int>(r), .chunk = static_cast<int>(f[4]), .start = f[5], .end = f[6]});
      }
    return Timeline::from_ranks(std::move(per_rank), std::move(title));
  }

 private:
  int rank_;
  Clock::time_point epoch_;
  std::vector<int> chunk_of_stage_;
  std::vector<TimelineEvent> events_;
};

}  // namespace tessera::schedule
