#pragma once
/// @file
/// schedule::simulate: the ideal timeline of a schedule -- when each F and B would run given
/// fixed compute durations and free communication.

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
  /// When set, the duration in seconds of each F or B (overrides t_forward / t_backward), e.g.
  /// to model unbalanced stages.
  std::function<double(const Action&)> duration{};
};

/// Simulates `s` with the checker's semantics (ticks in order; a tick's compute runs
/// back-to-back, then its transfers complete together once every peer has issued the matching
/// operation) with the given compute durations and zero-cost communication, starting every
/// rank at time 0. Returns the F and B events of all ranks (titled s.description()).
/// With t_B = 2 t_F the bubble ratio (bubble_stats) is (p-1)/m for GPipe and 1F1B and
/// (p-1)/(v m) for interleaved 1F1B (Narayanan et al. 2021). Throws what check() throws for an
/// invalid schedule, and Error if a duration is negative.
inline Timeline simulate(const Schedule& s, const SimulateOptions& opts = {}) {
  std::function<double(const Action&)> duration = opts.duration;
  if (!duration) {
    const double tf = opts.t_forward, tb = opts.t_backward;
    duration = [tf, tb](const Action& a) { return a.kind == ActionKind::forward ? tf : tb; };
  }
  detail::Engine engine(s);
  detail::EngineResult r = engine.run(&duration);
  return Timeline{.title = s.description(), .num_ranks = s.pp_size, .events = std::move(r.events)};
}

}  // namespace tessera::schedule
