#pragma once
/// @file
/// Timeline: when each rank ran each action of a pipeline schedule, measured (Recorder) or
/// simulated (simulate), for traces (chrome_trace), pictures (to_svg) and bubble measurements
/// (bubble_stats).

#include <algorithm>
#include <cstddef>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"

namespace tessera::schedule {

/// One action as it ran on one rank: start and end in seconds since the timeline's epoch
/// (common to all ranks).
struct TimelineEvent {
  Action action{};       ///< what ran (F, B, or a transfer)
  int rank = 0;        ///< pipeline rank that ran it
  int chunk = 0;       ///< model chunk of action.stage_index on that rank (0 without interleaving)
  double start = 0.0;  ///< seconds since the epoch
  double end = 0.0;    ///< seconds since the epoch (>= start)
};

/// The events of all ranks of one pipeline step (or several). Events may be in any order.
struct Timeline {
  std::string title{};                  ///< shown in pictures and traces, e.g. "1F1B (p=4, m=8)"
  int num_ranks = 0;                  ///< pipeline ranks (rows of the picture)
  std::vector<TimelineEvent> events{};  ///< all ranks' events

  /// Joins per-rank event lists (index = rank; each event's `rank` is set to its list's index).
  static Timeline from_ranks(std::vector<std::vector<TimelineEvent>> per_rank, std::string title = {}) {
    Timeline t{.title = std::move(title), .num_ranks = static_cast<int>(per_rank.size()), .events = {}};
    for (std::size_t r = 0; r < per_rank.size(); ++r)
      for (TimelineEvent& e : per_rank[r]) {
        e.rank = static_cast<int>(r);
        t.events.push_back(e);
      }
    return t;
  }

  /// Earliest start over all events (0 when there are none).
  double begin() const {
    if (events.empty()) return 0.0;
    double b = std::numeric_limits<double>::infinity();
    for (const TimelineEvent& e : events) b = std::min(b, e.start);
    return b;
  }
  /// Latest end over all events (0 when there are none).
  double end() const {
    if (events.empty()) return 0.0;
    double x = -std::numeric_limits<double>::infinity();
    for (const TimelineEvent& e : events) x = std::max(x, e.end);
    return x;
  }
  /// end() - begin(), seconds.
  double span() const { return end() - begin(); }

  /// The events of `rank`, sorted by start time.
  std::vector<TimelineEvent> of_rank(int rank) const {
    std::vector<TimelineEvent> out;
    for (const TimelineEvent& e : events)
      if (e.rank == rank) out.push_back(e);
    std::stable_sort(out.begin(), out.end(),
                     [](const TimelineEvent& a, const TimelineEvent& b) { return a.start < b.start; });
    return out;
  }

  /// Number of model chunks seen: 1 + the largest chunk of any event (1 when empty).
  int num_chunks() const {
    int c = 0;
    for (const TimelineEvent& e : events) c = std::max(c, e.chunk);
    return c + 1;
  }
};

}  // namespace tessera::schedule
