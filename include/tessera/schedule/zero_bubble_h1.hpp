#pragma once
/// @file
/// ZeroBubbleH1: the ZB-H1 schedule of Qi et al., "Zero Bubble Pipeline Parallelism" (ICLR
/// 2024): 1F1B with every backward split into its input-gradient pass (I) and its
/// weight-gradient pass (W), the W passes deferred into what 1F1B leaves idle, at 1F1B's peak
/// activation memory.

#include <algorithm>
#include <cstddef>
#include <limits>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::schedule {

/// ZB-H1 (Qi et al., ICLR 2024, sec. 3.1, "handcrafted schedule H1"): rank r runs 1F1B's
/// warm-up of num_warmup = min(p - r - 1, m) forwards, then per micro-batch an F and an I (the
/// input gradient, what the previous stage waits for), and the W (weight gradient) of the
/// micro-batch `r` I's back: rank r defers its first r W passes, so the later stages, which in
/// 1F1B sit idle at the start of the cool-down, send their input gradients back sooner, and
/// every rank ends with the r + 1 W passes left over filling its cool-down. Each (stage,
/// micro-batch) is in flight from its F to its W: at most min(p, m) at once on every rank,
/// 1F1B's peak (rank 0's) (schedule::check's peak_in_flight). With t_F = t_I = t_W the bubble
/// is (p - 1)(t_F + t_I - t_W) per rank instead of 1F1B's (p - 1)(t_F + t_I + t_W): a third
/// (zero_bubble_h1_bubble_ratio).
///
/// Ticks: each transfer is placed where both of its ranks reach it at the same moment of the
/// ideal timeline (t_F = t_I = t_W, free communication): the receive just before the compute
/// that needs it, the send at that same moment on the producing rank (attached to the compute
/// ending then, or in a tick of its own while that rank idles). The executor's sends complete
/// only when the peer has posted the receive (NCCL, MPI rendezvous), so a send placed right
/// after its producer would hold the producer until the consumer needs the data, and the W
/// passes could not fill that wait; placed this way, simulate() with equal times reproduces
/// the paper's bubble exactly and no rank waits on a transfer beyond its idle time. Any m >= 1
/// builds a valid schedule; the bubble formula holds for m >= p.
///
/// Stages: one per rank (v = 1, loop placement). A stage whose layers cannot split their
/// backward still runs it: the executor runs the whole backward in I and nothing in W
/// (PipelineStage::backward_input's default).
///
/// Options are set with designated initializers: `ZeroBubbleH1{.num_microbatches = 8}.build(4)`.
struct ZeroBubbleH1 {
  int num_microbatches = 1;  ///< m, micro-batches per step (>= 1)

  /// The number of W passes rank `rank` defers before its first: `rank` (capped at m).
  static int num_deferred_weight_passes(int rank, int num_microbatches) { return std::min(rank, num_microbatches); }

  /// The compute order of `rank` (F, I and W actions of stage `rank`): min(p - rank - 1, m)
  /// forwards, then for each micro-batch i an F (while forwards remain) and I(i), each I(i)
  /// with i >= deferred followed by the oldest W not yet run, then the remaining W's.
  /// Throws Error if pp_size < 1, rank is outside [0, pp_size) or num_microbatches < 1.
  std::vector<Action> compute_order(int pp_size, int rank) const {
    TESSERA_EXPECTS(pp_size >= 1, "ZeroBubbleH1: pp_size must be >= 1, got ", pp_size);
    TESSERA_EXPECTS(num_microbatches >= 1, "ZeroBubbleH1: num_microbatches must be >= 1, got ", num_microbatches);
    TESSERA_EXPECTS(rank >= 0 && rank < pp_size, "ZeroBubbleH1: rank ", rank, " is outside [0, ", pp_size, ")");
    const int p = pp_size, m = num_microbatches, r = rank;
    const int warmup = std::min(p - r - 1, m), deferred = num_deferred_weight_passes(r, m);
    std::vector<Action> out;
    int next_w = 0;
    for (int i = 0; i < warmup; ++i) out.push_back(Action::forward(i, r));
    for (int i = 0; i < m; ++i) {
      if (warmup + i < m) out.push_back(Action::forward(warmup + i, r));
      out.push_back(Action::backward_input(i, r));
      if (i >= deferred) out.push_back(Action::backward_weight(next_w++, r));
    }
    while (next_w < m) out.push_back(Action::backward_weight(next_w++, r));
    return out;
  }

  /// The schedule for `pp_size` ranks. Throws Error if pp_size < 1 or num_microbatches < 1.
  Schedule build(int pp_size) const {
    TESSERA_EXPECTS(pp_size >= 1, "ZeroBubbleH1: pp_size must be >= 1, got ", pp_size);
    TESSERA_EXPECTS(num_microbatches >= 1, "ZeroBubbleH1: num_microbatches must be >= 1, got ", num_microbatches);
    const int p = pp_size, m = num_microbatches;
    const std::size_t up = static_cast<std::size_t>(p), um = static_cast<std::size_t>(m);
    std::vector<std::vector<Action>> order(up);
    for (int r = 0; r < p; ++r) order[static_cast<std::size_t>(r)] = compute_order(p, r);
    // The ideal timeline in unit steps: each compute starts when its rank is free and its input
    // (the previous stage's F, the next stage's I) has been computed.
    constexpr int none = -1;
    std::vector<int> f_end(up * um, none), i_end(up * um, none), start_of;
    std::vector<std::vector<int>> starts(up);
    auto at = [&](std::vector<int>& v, int r, int mb) -> int& {
      return v[static_cast<std::size_t>(r) * um + static_cast<std::size_t>(mb)];
    };
    std::vector<std::size_t> pos(up, 0);
    std::vector<int> clock(up, 0);
    for (bool progress = true; progress;) {
      progress = false;
      for (int r = 0; r < p; ++r) {
        const std::size_t ur = static_cast<std::size_t>(r);
        while (pos[ur] < order[ur].size()) {
          const Action& a = order[ur][pos[ur]];
          int ready = 0;
          if (a.kind == ActionKind::forward && r > 0) ready = at(f_end, r - 1, a.microbatch);
          if (a.kind == ActionKind::backward_input && r + 1 < p) ready = at(i_end, r + 1, a.microbatch);
          if (ready == none) break;
          const int begin = std::max(clock[ur], ready);
          starts[ur].push_back(begin);
          clock[ur] = begin + 1;
          if (a.kind == ActionKind::forward) at(f_end, r, a.microbatch) = begin + 1;
          if (a.kind == ActionKind::backward_input) at(i_end, r, a.microbatch) = begin + 1;
          ++pos[ur];
          progress = true;
        }
      }
    }
    for (int r = 0; r < p; ++r)
      TESSERA_EXPECTS(pos[static_cast<std::size_t>(r)] == order[static_cast<std::size_t>(r)].size(), "ZeroBubbleH1 (p=", p,
                      ", m=", m, "): internal error, rank ", r, " cannot finish its compute order");
    // Each transfer at the moment its consumer starts, on both ranks.
    struct Point {
      int time;
      Action action;
    };
    std::vector<std::vector<Point>> points(up);
    for (int r = 0; r < p; ++r) {
      const std::size_t ur = static_cast<std::size_t>(r);
      for (std::size_t k = 0; k < order[ur].size(); ++k) {
        const Action& a = order[ur][k];
        const int t = starts[ur][k];
        if (a.kind == ActionKind::forward && r > 0) {
          points[ur].push_back({t, Action::recv_forward(a.microbatch, r, r - 1)});
          points[ur - 1].push_back({t, Action::send_forward(a.microbatch, r - 1, r)});
        }
        if (a.kind == ActionKind::backward_input && r + 1 < p) {
          points[ur].push_back({t, Action::recv_backward(a.microbatch, r, r + 1)});
          points[ur + 1].push_back({t, Action::send_backward(a.microbatch, r + 1, r)});
        }
      }
    }
    Schedule s{.name = "ZB-H1", .pp_size = p, .num_microbatches = m, .virtual_stages = 1,
               .ticks = std::vector<std::vector<Tick>>(up), .stage_ranks = {}};
    for (int r = 0; r < p; ++r) {
      const std::size_t ur = static_cast<std::size_t>(r);
      // Computes (keyed by their end) and transfer points in time order; at equal times the
      // compute that ends then comes first and the transfers join its tick.
      std::vector<Point>& pts = points[ur];
      std::stable_sort(pts.begin(), pts.end(), [](const Point& x, const Point& y) {
        return x.time != y.time ? x.time < y.time : static_cast<int>(x.action.kind) < static_cast<int>(y.action.kind);
      });
      std::vector<Tick>& ticks = s.ticks[ur];
      int tick_time = none;  // the moment the last tick's transfers are issued
      std::size_t next = 0;
      auto flush_until = [&](int limit) {  // transfer points at times <= limit
        for (; next < pts.size() && pts[next].time <= limit; ++next) {
          if (ticks.empty() || tick_time != pts[next].time) {
            ticks.emplace_back();
            tick_time = pts[next].time;
          }
          ticks.back().push_back(pts[next].action);
        }
      };
      for (std::size_t k = 0; k < order[ur].size(); ++k) {
        flush_until(starts[ur][k]);
        ticks.push_back(Tick{order[ur][k]});
        tick_time = starts[ur][k] + 1;
      }
      flush_until(std::numeric_limits<int>::max());
    }
    return s;
  }
};

}  // namespace tessera::schedule
