#pragma once
/// @file
/// TimeEstimate: the predicted time of one training step for a layout, by kind, from a
/// replay of the layout's own pipeline schedule with predicted per-action times.

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "tessera/plan/cost_model.hpp"
#include "tessera/schedule/bubble.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/simulate.hpp"
#include "tessera/schedule/timeline.hpp"

namespace tessera::plan {

/// Predicted seconds of one training step, by kind; total() is the step time.
struct TimeEstimate {
  double compute = 0;             ///< GEMMs and kernels on the busiest pipeline rank, seconds
  double tp_comm = 0;             ///< tensor-parallel collectives on that rank, seconds
  double pp_p2p = 0;              ///< pipeline hand-offs on the critical path, seconds
  double bubble = 0;              ///< pipeline idle time of the busiest rank, seconds
  double dp_comm_exposed = 0;     ///< dp reduction (and tied-embedding sum) not hidden, seconds
  double dp_comm_overlapped = 0;  ///< dp reduction hidden behind the last backward, seconds
  double optimizer = 0;           ///< optimizer step, seconds
  double bubble_ratio = 0;        ///< Megatron's bubble ratio of the replay with free transfers
  long long p2p_messages = 0;     ///< point-to-point sends per step in one pipeline (the schedule's SEND actions)
  double p2p_bytes = 0;           ///< bytes each of those sends carries on one device
  schedule::Timeline timeline{};  ///< the replayed pipeline step (F, B and transfers), seconds

  /// The step time: compute + tp_comm + pp_p2p + bubble + dp_comm_exposed + optimizer.
  double total() const { return compute + tp_comm + pp_p2p + bubble + dp_comm_exposed + optimizer; }

  /// Replays `sched` (the layout's schedule) with CostModel's durations for every F, B and
  /// transfer, once with free transfers (the bubble) and once with them (their exposed part),
  /// and adds the dp reduction and the optimizer step after the pipeline flush.
  static TimeEstimate of(const CostModel& cm, const schedule::Schedule& sched) {
    const Layout& L = cm.layout;
    const int S = L.num_stages();
    std::vector<WorkTime> fwd, bwd;
    for (int s = 0; s < S; ++s) {
      fwd.push_back(cm.stage_forward(s));
      bwd.push_back(cm.stage_backward(s));
    }
    std::function<double(const schedule::Action&)> duration = [&](const schedule::Action& a) {
      const auto s = static_cast<std::size_t>(a.stage_index);
      return a.kind == schedule::ActionKind::forward ? fwd[s].total() : bwd[s].total();
    };
    std::function<double(const schedule::Action&)> transfer = [&](const schedule::Action& a) {
      return cm.p2p_seconds(sched.rank_of(a.stage_index), a.peer);
    };
    const schedule::Timeline free_run = schedule::simulate(sched, {.t_forward = 0, .t_backward = 0,
                                                                   .duration = duration, .transfer_duration = {}});
    TimeEstimate t;
    t.timeline = schedule::simulate(sched, {.t_forward = 0, .t_backward = 0, .duration = duration,
                                            .transfer_duration = transfer});
    t.timeline.title = L.to_string();
    const schedule::BubbleStats b = schedule::bubble_stats(free_run);
    t.bubble_ratio = b.bubble_ratio;
    int busiest = 0;
    for (int r = 1; r < L.pp; ++r)
      if (b.busy[static_cast<std::size_t>(r)] > b.busy[static_cast<std::size_t>(busiest)]) busiest = r;
    for (const schedule::Action& a : sched.compute_order(busiest)) {
      const WorkTime& w = (a.kind == schedule::ActionKind::forward ? fwd : bwd)[static_cast<std::size_t>(a.stage_index)];
      t.compute += w.compute;
      t.tp_comm += w.tp_comm;
    }
    t.bubble = std::max(0.0, free_run.span() - (t.compute + t.tp_comm));
    t.pp_p2p = std::max(0.0, t.timeline.span() - free_run.span());
    for (int r = 0; r < L.pp; ++r)
      for (const schedule::Tick& tick : sched.ticks[static_cast<std::size_t>(r)])
        for (const schedule::Action& a : tick) t.p2p_messages += a.is_send() ? 1 : 0;
    t.p2p_bytes = cm.p2p_bytes();
    // After the flush: each pp rank reduces its gradients over dp (the last backward of its
    // first chunk can hide it when overlapped), the embedding group sums the tied gradient,
    // then the optimizer steps; the slowest rank sets the time.
    for (int r = 0; r < L.pp; ++r) {
      const double reduce = cm.dp_reduce_seconds(r);
      const double hidden = L.overlap_grad_reduce ? std::min(reduce, bwd[static_cast<std::size_t>(r)].total()) : 0.0;
      const bool tied_rank = r == 0 || r == L.pp - 1;
      const double exposed = reduce - hidden + (tied_rank ? cm.tied_embedding_seconds() : 0.0);
      if (exposed + cm.optimizer_seconds(r) > t.dp_comm_exposed + t.optimizer) {
        t.dp_comm_exposed = exposed;
        t.dp_comm_overlapped = hidden;
        t.optimizer = cm.optimizer_seconds(r);
      }
    }
    return t;
  }

  /// One line in seconds, e.g. "24.1 s: compute 19.0, tp 2.1, p2p 0.3, bubble 1.6, dp 0.8
  /// (+0.0 hidden), optimizer 0.05".
  std::string to_string() const {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "%.3f s: compute %.3f, tp %.3f, p2p %.3f, bubble %.3f, dp %.3f (+%.3f hidden), optimizer %.3f",
                  total(), compute, tp_comm, pp_p2p, bubble, dp_comm_exposed, dp_comm_overlapped, optimizer);
    return buf;
  }
};

}  // namespace tessera::plan
