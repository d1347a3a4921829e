#pragma once
/// @file
/// Copies the elements a loading rank needs from saved pieces of any layout: both sides are
/// lists of runs of consecutive global elements (ShardGeometry::runs), intersected in one
/// sweep over the saved runs sorted by global index.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tessera/checkpoint/safetensors_file.hpp"
#include "tessera/checkpoint/tensor_shard.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::checkpoint::detail {

/// A saved piece: a tensor of a file holding `geometry`'s elements.
struct SourcePiece {
  const SafetensorsFile* file = nullptr;  ///< the open file
  const TensorInfo* info = nullptr;       ///< the tensor in it
  ShardGeometry geometry;                 ///< which global elements it holds
};

/// What loading one TensorShard needs: its runs and the saved pieces that overlap them.
struct LoadPlan {
  std::string name;                  ///< the tensor
  std::string where;                 ///< the checkpoint or file, for errors
  ShardGeometry target;              ///< what the loading rank holds
  std::vector<SourcePiece> sources;  ///< overlapping saved pieces
};

/// Calls fn(source index, source element, target element, count) for every overlap of the
/// target's runs with the sources' runs, and returns the number of target elements covered.
template <class Fn>
std::int64_t sweep(const LoadPlan& plan, Fn&& fn) {
  struct Tagged {
    Run run;
    std::size_t source;
  };
  std::vector<Tagged> src;
  for (std::size_t i = 0; i < plan.sources.size(); ++i)
    for (const Run& r : plan.sources[i].geometry.runs()) src.push_back({r, i});
  std::sort(src.begin(), src.end(), [](const Tagged& a, const Tagged& b) { return a.run.global < b.run.global; });
  std::int64_t covered = 0;
  for (const Run& t : plan.target.runs()) {
    const std::int64_t t_end = t.global + t.length;
    // First source run ending after t.global (sources are disjoint, so sorted by end as well).
    auto it = std::partition_point(src.begin(), src.end(),
                                   [&](const Tagged& s) { return s.run.global + s.run.length <= t.global; });
    for (; it != src.end() && it->run.global < t_end; ++it) {
      const std::int64_t lo = std::max(t.global, it->run.global);
      const std::int64_t hi = std::min(t_end, it->run.global + it->run.length);
      if (lo >= hi) continue;
      fn(it->source, it->run.local + (lo - it->run.global), t.local + (lo - t.global), hi - lo);
      covered += hi - lo;
    }
  }
  return covered;
}

/// Throws tessera::Error naming the tensor unless the sources cover every element the target
/// needs exactly once.
inline void check_coverage(const LoadPlan& plan) {
  const std::int64_t covered = sweep(plan, [](std::size_t, std::int64_t, std::int64_t, std::int64_t) {});
  std::int64_t need = 0;  // the target's elements (a padded shard's padding is not needed)
  for (const Run& r : plan.target.runs()) need += r.length;
  TESSERA_EXPECTS(covered == need, plan.where, ": tensor '", plan.name, "': the saved pieces cover ", covered,
                  " of the ", need, " elements this rank needs",
                  covered > need ? " (pieces overlap)" : " (some elements were saved by no rank)");
}

/// Copies the planned elements into `dst` (target.numel() elements, the target's data order),
/// converting from the stored dtype.
template <TensorScalar T>
void execute(const LoadPlan& plan, T* dst) {
  sweep(plan, [&](std::size_t s, std::int64_t src_at, std::int64_t dst_at, std::int64_t n) {
    const SourcePiece& p = plan.sources[s];
    const std::size_t esize = size_of(p.info->dtype);
    convert_elements(p.file->bytes(*p.info).data() + static_cast<std::size_t>(src_at) * esize, p.info->dtype,
                     dst + dst_at, static_cast<std::size_t>(n));
  });
}

/// Copies the planned elements into the tensor `value` (any strides; target.numel() elements).
template <TensorScalar T>
void execute(const LoadPlan& plan, const Tensor<T>& value) {
  TESSERA_EXPECTS(value.numel() == plan.target.numel(), plan.where, ": tensor '", plan.name, "': destination holds ",
                  value.numel(), " elements, the plan ", plan.target.numel());
  if (value.is_contiguous()) {
    execute(plan, value.data());
    return;
  }
  Tensor<T> tmp = value.clone();  // keeps what the plan does not write (a padded shard's padding)
  execute(plan, tmp.data());
  value.copy_from(tmp);
}

}  // namespace tessera::checkpoint::detail
