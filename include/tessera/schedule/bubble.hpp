#pragma once
/// @file
/// bubble_stats: how much of a pipeline step each rank spends idle, from a Timeline.

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/timeline.hpp"

namespace tessera::schedule {

/// Idle time of a pipeline step, measured on a Timeline.
struct BubbleStats {
  double span = 0.0;                    ///< seconds from the first event's start to the last event's end
  std::vector<double> busy{};             ///< per rank: seconds spent in F, B, I or W (overlaps counted once)
  std::vector<double> bubble_fraction{};  ///< per rank: idle time / span = (span - busy) / span
  /// Megatron-LM's bubble ratio: total idle time / total compute time,
  /// sum_r (span - busy_r) / sum_r busy_r. (p-1)/m for GPipe and 1F1B, (p-1)/(v m) interleaved,
  /// (p-1)/(3m) for ZB-H1 with t_F = t_I = t_W.
  double bubble_ratio = 0.0;
  /// Fraction of all ranks' wall time that is idle: sum_r (span - busy_r) / (p span)
  /// = bubble_ratio / (1 + bubble_ratio).
  double idle_fraction = 0.0;
};

/// The bubble ratio (idle / compute, BubbleStats::bubble_ratio) of GPipe and 1F1B with p ranks
/// and m micro-batches: (p - 1) / m (Huang et al. 2019; Narayanan et al. 2021), whatever
/// t_F and t_B. Throws Error unless p >= 1 and m >= 1.
inline double one_f_one_b_bubble_ratio(int p, int m) {
  TESSERA_EXPECTS(p >= 1 && m >= 1, "one_f_one_b_bubble_ratio: p = ", p, " and m = ", m, " must be >= 1");
  return (p - 1.0) / m;
}

/// The bubble ratio of ZB-H1 (schedule::ZeroBubbleH1; Qi et al., ICLR 2024, sec. 3.1) with p
/// ranks, m >= p micro-batches and per-stage times t_F (forward), t_B (input gradient, I) and
/// t_W (weight gradient, W): each rank idles (p - 1)(t_F + t_B - t_W) of a step that computes
/// m (t_F + t_B + t_W), so the ratio is (p - 1)(t_F + t_B - t_W) / (m (t_F + t_B + t_W)):
/// (p - 1) / (3 m) with equal times, a third of 1F1B's (p - 1) / m. Holds for t_W <= t_F + t_B,
/// where the deferred W passes fit in the cool-down. Throws Error unless p >= 1, m >= p and
/// the times are >= 0 with a positive sum.
inline double zero_bubble_h1_bubble_ratio(int p, int m, double t_f = 1.0, double t_b = 1.0, double t_w = 1.0) {
  TESSERA_EXPECTS(p >= 1 && m >= p, "zero_bubble_h1_bubble_ratio: needs p >= 1 and m >= p, got p = ", p, ", m = ", m);
  TESSERA_EXPECTS(t_f >= 0 && t_b >= 0 && t_w >= 0 && t_f + t_b + t_w > 0, "zero_bubble_h1_bubble_ratio: times t_F = ",
                  t_f, ", t_B = ", t_b, ", t_W = ", t_w, " must be >= 0 with a positive sum");
  return (p - 1.0) * std::max(t_f + t_b - t_w, 0.0) / (m * (t_f + t_b + t_w));
}

/// Measures the bubble of `t`: per rank, the time within the timeline's span not covered by F,
/// B, I or W events (transfers and waits count as idle), and the ratios above. Ranks are
/// 0..t.num_ranks-1; a rank without events is idle for the whole span. Ratios are 0 when there
/// is no compute.
inline BubbleStats bubble_stats(const Timeline& t) {
  BubbleStats out;
  out.span = t.span();
  const std::size_t p = static_cast<std::size_t>(std::max(t.num_ranks, 0));
  out.busy.assign(p, 0.0);
  out.bubble_fraction.assign(p, 0.0);
  double idle_sum = 0.0, busy_sum = 0.0;
  for (std::size_t r = 0; r < p; ++r) {
    std::vector<std::pair<double, double>> iv;
    for (const TimelineEvent& e : t.events)
      if (e.rank == static_cast<int>(r) && e.action.is_compute()) iv.emplace_back(e.start, e.end);
    std::sort(iv.begin(), iv.end());
    double busy = 0.0, cur_b = 0.0, cur_e = 0.0;
    bool open = false;
    for (const auto& [b, e] : iv) {
      if (open && b <= cur_e) {
        cur_e = std::max(cur_e, e);
      } else {
        if (open) busy += cur_e - cur_b;
        cur_b = b;
        cur_e = e;
        open = true;
      }
    }
    if (open) busy += cur_e - cur_b;
    out.busy[r] = busy;
    out.bubble_fraction[r] = out.span > 0.0 ? (out.span - busy) / out.span : 0.0;
    idle_sum += out.span - busy;
    busy_sum += busy;
  }
  out.bubble_ratio = busy_sum > 0.0 ? idle_sum / busy_sum : 0.0;
  out.idle_fraction = busy_sum > 0.0 ? idle_sum / (static_cast<double>(p) * out.span) : 0.0;
  return out;
}

/// The bubble per rank and overall, one line each, for logs:
/// "rank 0: idle 27.3% of the step (busy 1.203 ms of 1.655 ms)" ... then
/// "bubble ratio 0.375 (idle / compute); idle 27.3% of all ranks' time".
/// Times are printed in ms.
inline std::string to_string(const BubbleStats& b) {
  std::string out;
  char line[160];
  for (std::size_t r = 0; r < b.busy.size(); ++r) {
    std::snprintf(line, sizeof line, "rank %zu: idle %.1f%% of the step (busy %.3f ms of %.3f ms)\n", r,
                  100.0 * b.bubble_fraction[r], 1e3 * b.busy[r], 1e3 * b.span);
    out += line;
  }
  std::snprintf(line, sizeof line, "bubble ratio %.4f (idle / compute); idle %.1f%% of all ranks' time\n",
                b.bubble_ratio, 100.0 * b.idle_fraction);
  return out + line;
}

}  // namespace tessera::schedule
