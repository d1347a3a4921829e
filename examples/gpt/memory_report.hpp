#pragma once
// train_gpt --memory-report: every rank's MemoryTracker figures (live and peak bytes by
// category), gathered to world rank 0, which prints one table row per rank. Activations are
// what the pipeline executor measures its micro-batches' contexts to hold (PipelineParallel,
// PipelineStepStats::peak_activation_bytes): live is 0 after a step.

#include <cstdio>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/memory_tracker.hpp"

namespace train_gpt {

using namespace tessera;

/// Prints every rank's live and peak MiB per MemoryCategory, and the peak of their sum, on
/// world rank 0 when `print`. Collective over `world` (one all-gather). The activations' peak
/// is the largest number of bytes the contexts of this rank's micro-batches held at once
/// (with --recompute selective or full it drops; docs/memory.md, "Activations").
inline void print_memory_report(Comm& world, bool print) {
  const MemoryTracker& t = MemoryTracker::this_rank();
  constexpr std::size_t n = memory_category_count;
  std::vector<double> mine;
  for (std::size_t i = 0; i < n; ++i) mine.push_back(static_cast<double>(t.peak(static_cast<MemoryCategory>(i))));
  for (std::size_t i = 0; i < n; ++i) mine.push_back(static_cast<double>(t.live(static_cast<MemoryCategory>(i))));
  mine.push_back(static_cast<double>(t.peak_total()));
  std::vector<double> all(mine.size() * static_cast<std::size_t>(world.size()));
  world.all_gather(mine, all);
  if (!print) return;
  constexpr double mib = 1024.0 * 1024.0;
  std::printf("memory per rank, MiB (peak / live at the end of the run):\n");
  std::printf("%6s", "rank");
  for (std::size_t i = 0; i < n; ++i) std::printf(" %19s", std::string(name_of(static_cast<MemoryCategory>(i))).c_str());
  std::printf(" %10s\n", "peak total");
  for (int r = 0; r < world.size(); ++r) {
    const double* f = all.data() + static_cast<std::size_t>(r) * mine.size();
    std::printf("%6d", r);
    for (std::size_t i = 0; i < n; ++i) std::printf(" %9.3f /%9.3f", f[i] / mib, f[n + i] / mib);
    std::printf(" %10.3f\n", f[2 * n] / mib);
  }
}

}  // namespace train_gpt
