#pragma once
/// @file
/// device_grad_buckets: the reduction buckets of a flat gradient buffer for data parallelism on
/// a device, as PyTorch DDP forms them (Li et al., VLDB 2020, sec. 3.2.3): consecutive ranges in
/// the order backward finishes them, each closed before it would exceed a size cap, so the
/// first bucket's reduction starts while backward computes the rest. Host code (no CUDA needed).

#include <cstdint>
#include <span>
#include <vector>

#include "tessera/core/error.hpp"

namespace tessera::cuda {

/// One bucket: the flat elements [lo, hi), final once backward passed offset lo.
struct DeviceGradBucket {
  std::int64_t lo = 0;  ///< first element
  std::int64_t hi = 0;  ///< one past the last
};

/// The buckets of a flat buffer of `numel` elements whose gradients become final from the
/// offsets `ready` (descending, each in [0, numel), the last 0: DeviceGPT::ready_offsets()),
/// in that order: the units [ready[k], ready[k-1]) (ready[-1] = numel) joined while a bucket
/// stays within `cap_elements` (a unit larger than the cap is a bucket alone). Together they
/// cover [0, numel) once. Throws tessera::Error naming the numbers when `ready` is not
/// descending, not within [0, numel), or does not end at 0, or the cap is below 1.
inline std::vector<DeviceGradBucket> device_grad_buckets(std::int64_t numel, std::span<const std::int64_t> ready,
                                                         std::int64_t cap_elements) {
  TESSERA_EXPECTS(cap_elements >= 1, "device_grad_buckets: the cap must be at least 1 element, got ", cap_elements);
  TESSERA_EXPECTS(!ready.empty() && ready.back() == 0, "device_grad_buckets: the ready offsets must end at 0 (got ",
                  ready.empty() ? -1 : ready.back(), " last)");
  std::vector<DeviceGradBucket> out;
  std::int64_t prev = numel;
  for (std::size_t k = 0; k < ready.size(); ++k) {
    TESSERA_EXPECTS(ready[k] >= 0 && ready[k] < prev, "device_grad_buckets: ready offset ", k, " is ", ready[k],
                    "; each must lie below the one before (", prev, ", the first below numel ", numel, ")");
    if (!out.empty() && out.back().hi - ready[k] <= cap_elements)
      out.back().lo = ready[k];  // the unit joins the open bucket
    else
      out.push_back({ready[k], prev});
    prev = ready[k];
  }
  return out;
}

}  // namespace tessera::cuda
