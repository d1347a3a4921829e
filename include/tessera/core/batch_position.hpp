#pragma once
/// @file
/// BatchPosition: where the rows a rank is computing sit in the global batch, and whether it
/// is training, as the layers whose randomness must not depend on the layout read it
/// (Dropout: a mask keyed by the step and the global row, so every dp x pp x tp layout and
/// every micro-batch count draws the single-rank run's masks). It is ambient, per thread (a
/// rank of the threads backend is a thread), as torch's and Megatron's RNG state is: the
/// pipeline sets it around each micro-batch's forward, a serial loop with BatchPositionScope.

#include <cstdint>

namespace tessera {

/// The position of the rows being computed (see the file comment).
struct BatchPosition {
  std::uint64_t step = 0;      ///< the optimizer step (the same for every micro-batch and accumulation call of it)
  std::int64_t first_row = 0;  ///< the global batch row of the first row being computed
  bool training = true;        ///< false: evaluation (dropout is the identity)
};

namespace detail {
/// The position set on this thread.
inline BatchPosition& current_batch_position_ref() noexcept {
  thread_local BatchPosition position{};
  return position;
}
}  // namespace detail

/// The position set on this thread (by a BatchPositionScope, PipelineParallel or Hybrid);
/// BatchPosition{} (step 0, row 0, training) when none is. Local.
inline BatchPosition current_batch_position() noexcept { return detail::current_batch_position_ref(); }

/// Sets this thread's BatchPosition while it lives and restores the previous one:
/// `BatchPositionScope at({.step = s, .first_row = 0}); model.forward(x);`.
class [[nodiscard]] BatchPositionScope {
 public:
  /// Sets `position`.
  explicit BatchPositionScope(const BatchPosition& position) noexcept : previous_(current_batch_position()) {
    detail::current_batch_position_ref() = position;
  }
  BatchPositionScope(const BatchPositionScope&) = delete;             ///< not copyable
  BatchPositionScope& operator=(const BatchPositionScope&) = delete;  ///< not copyable
  /// Restores the previous position.
  ~BatchPositionScope() { detail::current_batch_position_ref() = previous_; }

 private:
  BatchPosition previous_;
};

}  // namespace tessera
