#pragma once
/// @file
/// GemmEfficiency: the fraction of a device's peak FLOP/s that one matrix multiplication
/// reaches, as a curve over its size.

#include <cmath>
#include <cstddef>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"

namespace tessera::plan {

/// A GEMM-efficiency curve: points (flops of one GEMM, fraction of peak reached), flops
/// increasing; between points the fraction is interpolated linearly in log(flops), outside
/// them it is the nearest point's. A GEMM of `f` flops then takes f / (peak * at(f)) seconds.
struct GemmEfficiency {
  std::vector<std::pair<double, double>> points{};  ///< (flops, fraction in (0, 1]), flops ascending

  /// Throws Error naming the point when the curve is empty, a flop count is not > 0 and
  /// increasing, or a fraction is outside (0, 1].
  void validate() const {
    TESSERA_EXPECTS(!points.empty(), "GemmEfficiency: the curve has no points");
    for (std::size_t i = 0; i < points.size(); ++i) {
      TESSERA_EXPECTS(points[i].first > 0, "GemmEfficiency: point ", i, " has flops ", points[i].first,
                      "; must be > 0");
      TESSERA_EXPECTS(points[i].second > 0 && points[i].second <= 1, "GemmEfficiency: point ", i, " has fraction ",
                      points[i].second, "; must lie in (0, 1]");
      TESSERA_EXPECTS(i == 0 || points[i].first > points[i - 1].first, "GemmEfficiency: point ", i, " has flops ",
                      points[i].first, ", not above point ", i - 1, "'s ", points[i - 1].first);
    }
  }

  /// The fraction of peak reached by a GEMM of `flops` (> 0) floating-point operations.
  /// Throws Error if the curve is empty.
  double at(double flops) const {
    TESSERA_EXPECTS(!points.empty(), "GemmEfficiency: the curve has no points");
    if (flops <= points.front().first) return points.front().second;
    if (flops >= points.back().first) return points.back().second;
    std::size_t i = 1;
    while (points[i].first < flops) ++i;
    const auto& [x0, y0] = points[i - 1];
    const auto& [x1, y1] = points[i];
    const double w = (std::log(flops) - std::log(x0)) / (std::log(x1) - std::log(x0));
    return y0 + w * (y1 - y0);
  }
};

}  // namespace tessera::plan
