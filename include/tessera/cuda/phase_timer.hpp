#pragma once
/// @file
/// PhaseTimer: where a stream's time goes, by phase, measured with CUDA events (no profiler
/// needed: the GPU machines tessera is checked on may not let Nsight read counters). A model
/// marks the start of each phase on its stream; at the end of a step the timer waits for the
/// stream and adds each span between consecutive marks to its phase's total. Off by default:
/// then mark() does nothing. Host code (CUDA runtime API; no nvcc needed).

#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda {

/// The per-phase totals of PhaseTimer (and the arithmetic it does on them, apart from the
/// events, so that it is tested without a device).
class PhaseTotals {
 public:
  /// Adds `ms` milliseconds to `phase` (a new phase is appended to the order of first use).
  void add(const std::string& phase, double ms) {
    auto [it, fresh] = index_.try_emplace(phase, totals_.size());
    if (fresh) totals_.emplace_back(phase, 0.0);
    totals_[it->second].second += ms;
  }
  /// Adds the spans of one step: `marks[i]` opened phase `marks[i].first` at time
  /// `marks[i].second` (ms, non-decreasing), and the step ended at `end_ms`; phase i's span
  /// runs to the next mark (or the end). Counts one step.
  void add_step(const std::vector<std::pair<std::string, double>>& marks, double end_ms) {
    for (std::size_t i = 0; i < marks.size(); ++i)
      add(marks[i].first, (i + 1 < marks.size() ? marks[i + 1].second : end_ms) - marks[i].second);
    ++steps_;
  }
  /// Each phase's total (ms), in the order phases were first marked.
  const std::vector<std::pair<std::string, double>>& totals() const noexcept { return totals_; }
  /// The sum over phases (ms).
  double total_ms() const noexcept {
    double t = 0;
    for (const auto& [name, ms] : totals_) t += ms;
    return t;
  }
  /// Steps added.
  int steps() const noexcept { return steps_; }
  /// Forgets every total.
  void clear() {
    totals_.clear();
    index_.clear();
    steps_ = 0;
  }

 private:
  std::vector<std::pair<std::string, double>> totals_;
  std::map<std::string, std::size_t> index_;
  int steps_ = 0;
};

/// Times phases of the work queued on one stream with CUDA events. Not thread-safe (one per
/// stream). Throws CudaError naming the call when an event call fails.
class PhaseTimer {
 public:
  PhaseTimer() = default;
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;
  /// Destroys the events.
  ~PhaseTimer() {
    for (cudaEvent_t e : events_) (void)cudaEventDestroy(e);
  }

  /// Turns timing on or off (off: mark() and end_step() do nothing). Turning it on forgets the
  /// marks of an unfinished step.
  void enable(bool on) {
    on_ = on;
    marks_.clear();
  }
  /// Whether timing is on.
  bool enabled() const noexcept { return on_; }

  /// Phase `phase` starts now on `s` (an event recorded there); a mark with the name of the open
  /// phase continues it. `phase` must outlive end_step() (a string literal).
  void mark(const Stream& s, const char* phase) {
    if (!on_) return;
    if (!marks_.empty() && std::string(marks_.back().first) == phase) return;
    marks_.emplace_back(phase, event(marks_.size()));
    detail::check(cudaEventRecord(marks_.back().second, s.get()), "cudaEventRecord", "PhaseTimer::mark(", phase, ")");
  }
  /// Ends the step: records an event on `s`, waits for it (a host synchronization) and adds each
  /// phase's span to the totals.
  void end_step(const Stream& s) {
    if (!on_ || marks_.empty()) return;
    cudaEvent_t end = event(marks_.size());
    detail::check(cudaEventRecord(end, s.get()), "cudaEventRecord", "PhaseTimer::end_step");
    detail::check(cudaEventSynchronize(end), "cudaEventSynchronize", "PhaseTimer::end_step");
    std::vector<std::pair<std::string, double>> at;
    at.reserve(marks_.size());
    for (const auto& [name, e] : marks_) at.emplace_back(name, elapsed(marks_.front().second, e));
    totals_.add_step(at, elapsed(marks_.front().second, end));
    marks_.clear();
  }
  /// The totals so far.
  const PhaseTotals& totals() const noexcept { return totals_; }
  /// Forgets the totals.
  void clear() { totals_.clear(); }

 private:
  cudaEvent_t event(std::size_t i) {
    while (events_.size() <= i) {
      cudaEvent_t e = nullptr;
      detail::check(cudaEventCreate(&e), "cudaEventCreate", "PhaseTimer");
      events_.push_back(e);
    }
    return events_[i];
  }
  static double elapsed(cudaEvent_t from, cudaEvent_t to) {
    float ms = 0;
    detail::check(cudaEventElapsedTime(&ms, from, to), "cudaEventElapsedTime", "PhaseTimer");
    return ms;
  }

  bool on_ = false;
  std::vector<cudaEvent_t> events_;  // reused every step
  std::vector<std::pair<const char*, cudaEvent_t>> marks_;
  PhaseTotals totals_;
};

}  // namespace tessera::cuda
