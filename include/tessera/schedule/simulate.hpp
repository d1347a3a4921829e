#pragma once
/// @file
/// schedule::simulate: the timeline of a schedule -- when each F and B would run given
/// compute durations, with free communication or with a duration per transfer.

#include <functional>
#include <utility>

#include "tessera/schedule/detail/engine.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/timeline.hpp"

namespace tessera::schedule {

/// Durations for schedule::simulate. Set with designated initializers:
/// `SimulateOptions{.t_forward = 1.0, .t_backward = 2.0}`.
struct SimulateOptions {
  double t_forward = 1.0;   ///< seconds per F of one stage (t_F)
  double t_backward = 2.0;  ///< seconds per B of one stage (t_B; about 2 t_F in practice)
  /// Seconds per I of one stage (the input-gradient half of a split backward; zero-bubble's
  /// T_B). The default splits the default t_backward in halves.
  double t_backward_input = 1.0;
  /// Seconds per W of one stage (the weight-gradient half of a split backward; zero-bubble's
  /// T_W).
  double t_backward_weight = 1.0;
  /// When set, the duration in seconds of each F, B, I or W (overrides t_forward, t_backward,
  /// t_backward_input, t_backward_weight), e.g.
  /// to model unbalanced stages.
  std::function<double(const Action&)> duration{};
  /// When set, the duration in seconds of each transfer (SEND_F, RECV_F, SEND_B, RECV_B); it
  /// should give a SEND and its RECV the same time. A tick's batched group then ends when its
  /// last transfer ends, each transfer starting once both sides have issued it, and the
  /// timeline also holds one event per transfer (bubble_stats counts them as idle). Unset:
  /// communication is free and the timeline holds only F and B.
  std::function<double(const Action&)> transfer_duration{};
};

/// Simulates `s` with the checker's semantics (ticks in order; a tick's compute runs
/// back-to-back, then its transfers complete together once every peer has issued the matching
/// operation) with the given compute durations and, unless opts.transfer_duration is set,
/// zero-cost communication, starting every rank at time 0. Returns the F and B events of all
/// ranks, and the transfers' when they have durations (titled s.description()).
/// With t_B = 2 t_F the bubble ratio (bubble_stats) is (p-1)/m for GPipe and 1F1B and
/// (p-1)/(v m) for interleaved 1F1B (Narayanan et al. 2021); with t_I = t_W = t_F it is
/// (p-1)/(3 m) for ZB-H1 (zero_bubble_h1_bubble_ratio). Throws what check() throws for an
/// invalid schedule, and Error if a duration is negative.
inline Timeline simulate(const Schedule& s, const SimulateOptions& opts = {}) {
  std::function<double(const Action&)> duration = opts.duration;
  if (!duration) {
    const double tf = opts.t_forward, tb = opts.t_backward, ti = opts.t_backward_input, tw = opts.t_backward_weight;
    duration = [tf, tb, ti, tw](const Action& a) {
      switch (a.kind) {
        case ActionKind::forward: return tf;
        case ActionKind::backward_input: return ti;
        case ActionKind::backward_weight: return tw;
        default: return tb;
      }
    };
  }
  detail::Engine engine(s);
  detail::EngineResult r = engine.run(&duration, opts.transfer_duration ? &opts.transfer_duration : nullptr);
  return Timeline{.title = s.description(), .num_ranks = s.pp_size, .events = std::move(r.events)};
}

}  // namespace tessera::schedule
