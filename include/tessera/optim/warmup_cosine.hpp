#pragma once
/// @file
/// WarmupCosine: linear learning-rate warmup then cosine decay (Loshchilov and Hutter, "SGDR",
/// ICLR 2017; the schedule of GPT-3 and nanoGPT / llm.c).

#include <cmath>
#include <cstdint>
#include <numbers>

#include "tessera/core/error.hpp"

namespace tessera::optim {

/// Learning rate at step s (0-based): max_lr (s + 1) / warmup_steps while s < warmup_steps;
/// then min_lr + (max_lr - min_lr) (1 + cos(pi (s - warmup_steps) / (total_steps -
/// warmup_steps))) / 2; min_lr from total_steps on.
struct WarmupCosine {
  double max_lr = 6e-4;           ///< peak learning rate, reached at the end of warmup
  double min_lr = 0.0;            ///< floor reached at total_steps
  std::int64_t warmup_steps = 0;  ///< steps of linear warmup
  std::int64_t total_steps = 1;   ///< steps until min_lr (warmup included)

  /// The learning rate at `step`. Throws tessera::Error when warmup_steps exceeds total_steps,
  /// a step count is negative, or step is negative.
  double operator()(std::int64_t step) const {
    TESSERA_EXPECTS(warmup_steps >= 0 && total_steps >= warmup_steps && step >= 0, "WarmupCosine: step ", step,
                    " with warmup_steps=", warmup_steps, " total_steps=", total_steps,
                    " (need 0 <= warmup_steps <= total_steps and step >= 0)");
    if (step < warmup_steps) return max_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
    if (step >= total_steps) return min_lr;
    const double ratio = static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * ratio));
  }
};

}  // namespace tessera::optim
