#pragma once
/// @file
/// BucketLayout: how a data-parallel unit's parameters are packed into flat gradient buckets
/// (and, under ZeRO-3, parameter buckets), for counting the messages and bytes of the dp
/// collectives without building the model: GradBuckets' packing rule (tessera/parallel/data/
/// grad_buckets.hpp), restated on parameter sizes.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "tessera/core/error.hpp"

namespace tessera::plan {

/// The buckets of one unit (the parameters one GradBuckets holds: a DataParallel's model or a
/// DataParallelStage) over `world` dp ranks, as GradBuckets lays them out: the distinct
/// parameters in reverse list order, packed into a bucket until it holds at least
/// first_bucket_bytes (the first bucket) or bucket_bytes (the others); a tied parameter whose
/// elements are a multiple of `world` gets a bucket of its own (its own gradient tensor, no
/// padding); every other bucket is padded to a multiple of `world` elements. The test
/// `plan_counts` checks it against GradBuckets on the GPT's parameters and against the
/// all-gathers and reduce-scatters an instrumented ZeRO-3 run issues.
struct BucketLayout {
  /// One distinct parameter of the unit, in the unit's parameters() order.
  struct Param {
    std::int64_t numel = 0;  ///< elements
    bool tied = false;       ///< shared with another Parameter object (GradBuckets copies or aliases it)
  };
  std::vector<std::int64_t> padded{};  ///< elements of each bucket's buffer (padded), launch order
  std::vector<std::int64_t> numel{};   ///< elements in use per bucket (padded less the zero padding)

  /// Packs `params` (list order) for `world` ranks with buckets of `bucket_bytes` (the first
  /// `first_bucket_bytes`) of `element_bytes`-byte gradients. GradBucketsOptions' defaults:
  /// 25 MiB and 1 MiB. Throws Error when world < 1, element_bytes < 1 or a parameter has no
  /// elements.
  static BucketLayout of(const std::vector<Param>& params, int world, std::size_t bucket_bytes = std::size_t{25} << 20,
                         std::size_t first_bucket_bytes = std::size_t{1} << 20, std::size_t element_bytes = 4) {
    TESSERA_EXPECTS(world >= 1 && element_bytes >= 1, "BucketLayout: world ", world, " and element_bytes ",
                    element_bytes, " must be >= 1");
    BucketLayout out;
    std::vector<bool> alias;
    std::size_t cap = first_bucket_bytes, packed = 0;
    std::int64_t filled = 0;
    bool open = false;
    for (std::size_t k = params.size(); k-- > 0;) {
      const Param& p = params[k];
      TESSERA_EXPECTS(p.numel >= 1, "BucketLayout: parameter ", k, " has ", p.numel, " elements; each needs >= 1");
      if (p.tied && p.numel % world == 0) {  // its own gradient tensor is the bucket
        out.numel.push_back(p.numel);
        alias.push_back(true);
        open = false;
        continue;
      }
      if (!open || static_cast<std::size_t>(filled) * element_bytes >= cap) {
        if (packed++ > 0) cap = bucket_bytes;
        out.numel.push_back(0);
        alias.push_back(false);
        filled = 0;
        open = true;
      }
      filled += p.numel;
      out.numel.back() = filled;
    }
    for (std::size_t b = 0; b < out.numel.size(); ++b)
      out.padded.push_back(alias[b] ? out.numel[b] : (out.numel[b] + world - 1) / world * world);
    return out;
  }

  /// Buckets: one collective each per all-gather or reduce-scatter of the unit.
  std::size_t size() const { return padded.size(); }
  /// Elements of all buckets' buffers, padding included.
  std::int64_t padded_elements() const {
    std::int64_t n = 0;
    for (std::int64_t e : padded) n += e;
    return n;
  }
};

}  // namespace tessera::plan
