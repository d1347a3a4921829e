#pragma once
/// @file
/// MemoryTracker: live and peak bytes of one rank, by category (parameters, gradients,
/// optimizer state, activations, communication buffers), fed by the places that allocate
/// model state (GradBuckets, ZeroOptimizer, DistributedOptimizer) and by the pipeline executor
/// (PipelineParallel: the bytes its micro-batches' contexts hold, measured with an
/// AllocationCounter per micro-batch) through MemoryTracker::Entry.
/// The categories are those of the ZeRO paper's accounting (Rajbhandari et al., SC 2020,
/// sec. 3: model states = parameters + gradients + optimizer states; residual states =
/// activations + temporary buffers).

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "tessera/core/error.hpp"

namespace tessera {

/// What a tracked allocation holds.
enum class MemoryCategory {
  parameters,      ///< parameter values (the model's own tensors)
  gradients,       ///< gradients the optimizer reads (full, or this rank's shards under ZeRO-2)
  optimizer_state, ///< optimizer state (AdamW's two moments)
  activations,     ///< tensors saved for backward (the contexts of the micro-batches in flight)
  comm_buffers,    ///< buffers that exist for communication (ZeRO-2 buckets, ZeRO gathered parameters)
};
/// Number of MemoryCategory values.
inline constexpr std::size_t memory_category_count = 5;

/// The category's name as train_gpt --memory-report prints it ("parameters", "comm_buffers", ...).
inline constexpr std::string_view name_of(MemoryCategory c) noexcept {
  switch (c) {
    case MemoryCategory::parameters: return "parameters";
    case MemoryCategory::gradients: return "gradients";
    case MemoryCategory::optimizer_state: return "optimizer_state";
    case MemoryCategory::activations: return "activations";
    case MemoryCategory::comm_buffers: return "comm_buffers";
  }
  return "?";
}

/// Live and peak bytes of one rank by MemoryCategory. There is one per thread
/// (MemoryTracker::this_rank()): a rank of the threads backend is a thread, an MPI rank is a
/// process, so each rank has its own. Not thread-safe: a rank's allocations are accounted on
/// its own thread.
///
/// Peaks: peak(c) is the largest live(c) seen; peak_total() the largest sum over all
/// categories at one moment (what a memory budget must hold), which is at most the sum of the
/// per-category peaks. reset_peaks() sets every peak to the live value (e.g. after setup).
class MemoryTracker {
 public:
  /// A tracked allocation: holds `bytes()` bytes in its category of the tracker of the thread
  /// that made it, until set to another size or destroyed. Move-only.
  class Entry {
   public:
    /// An entry of 0 bytes in `category` of this thread's tracker.
    explicit Entry(MemoryCategory category) : tracker_(&this_rank()), category_(category) {}
    /// An entry of `bytes` in `category` of this thread's tracker.
    Entry(MemoryCategory category, std::size_t bytes) : Entry(category) { set(bytes); }
    Entry(const Entry&) = delete;             ///< not copyable: the bytes are counted once
    Entry& operator=(const Entry&) = delete;  ///< not copyable
    /// Takes over `other`'s bytes (other holds 0 afterwards).
    Entry(Entry&& other) noexcept : tracker_(other.tracker_), category_(other.category_), bytes_(other.bytes_) {
      other.bytes_ = 0;
    }
    /// Gives back this entry's bytes, then takes over `other`'s.
    Entry& operator=(Entry&& other) noexcept {
      if (this != &other) {
        set(0);
        tracker_ = other.tracker_;
        category_ = other.category_;
        bytes_ = other.bytes_;
        other.bytes_ = 0;
      }
      return *this;
    }
    /// Gives the bytes back.
    ~Entry() { set(0); }
    /// Sets the bytes this entry holds (the tracker's live and peak figures follow). Local.
    void set(std::size_t bytes) noexcept {
      if (tracker_) tracker_->change(category_, static_cast<std::int64_t>(bytes) - static_cast<std::int64_t>(bytes_));
      bytes_ = bytes;
    }
    /// Bytes held.
    std::size_t bytes() const noexcept { return bytes_; }
    /// The category.
    MemoryCategory category() const noexcept { return category_; }

   private:
    MemoryTracker* tracker_;
    MemoryCategory category_;
    std::size_t bytes_ = 0;
  };

  /// The tracker of the calling thread (the calling rank).
  static MemoryTracker& this_rank() noexcept {
    thread_local MemoryTracker tracker;
    return tracker;
  }

  /// Bytes live now in `c`.
  std::size_t live(MemoryCategory c) const noexcept { return static_cast<std::size_t>(live_[index(c)]); }
  /// Largest live(c) since construction or reset_peaks().
  std::size_t peak(MemoryCategory c) const noexcept { return static_cast<std::size_t>(peak_[index(c)]); }
  /// Bytes live now, all categories.
  std::size_t live_total() const noexcept { return static_cast<std::size_t>(total_); }
  /// Largest live_total() since construction or reset_peaks().
  std::size_t peak_total() const noexcept { return static_cast<std::size_t>(peak_total_); }
  /// Sets every peak to its live value.
  void reset_peaks() noexcept {
    peak_ = live_;
    peak_total_ = total_;
  }

  /// Adds `delta` bytes (negative: frees) to `c`. Entry calls it; a negative live figure means
  /// an accounting error and is clamped to 0 in the peaks (never reported negative).
  void change(MemoryCategory c, std::int64_t delta) noexcept {
    const std::size_t i = index(c);
    live_[i] += delta;
    total_ += delta;
    if (live_[i] > peak_[i]) peak_[i] = live_[i];
    if (total_ > peak_total_) peak_total_ = total_;
  }

  /// A table of the categories, one line each: "name live_MiB peak_MiB", and the total line,
  /// with `prefix` before each line (e.g. "rank 3: "). Local.
  std::string report(std::string_view prefix = {}) const {
    std::string out;
    auto line = [&](std::string_view name, std::int64_t live, std::int64_t peak) {
      out += detail::str(prefix, name, std::string(name.size() < 16 ? 16 - name.size() : 1, ' '), "live ",
                         mib(live), " MiB  peak ", mib(peak), " MiB\n");
    };
    for (std::size_t i = 0; i < memory_category_count; ++i)
      line(name_of(static_cast<MemoryCategory>(i)), live_[i], peak_[i]);
    line("total", total_, peak_total_);
    return out;
  }

 private:
  static constexpr std::size_t index(MemoryCategory c) noexcept { return static_cast<std::size_t>(c); }
  static std::string mib(std::int64_t bytes) {
    const double m = static_cast<double>(bytes) / (1024.0 * 1024.0);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%9.3f", m);
    return buf;
  }
  std::array<std::int64_t, memory_category_count> live_{};
  std::array<std::int64_t, memory_category_count> peak_{};
  std::int64_t total_ = 0;
  std::int64_t peak_total_ = 0;
};

}  // namespace tessera
