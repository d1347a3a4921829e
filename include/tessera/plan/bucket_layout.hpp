#pragma once
/// @file
/// BucketLayout: how a data-parallel unit's parameters are packed into flat gradient buckets
/// (and, under ZeRO-3, parameter buckets), for counting the messages and bytes of the dp
/// collectives without building the model: GradBuckets' own packing code
/// (tessera/parallel/data/bucket_packing.hpp), run on parameter sizes.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/parallel/data/bucket_packing.hpp"

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
  /// elements (pack_buckets).
  static BucketLayout of(const std::vector<Param>& params, int world, std::size_t bucket_bytes = std::size_t{25} << 20,
                         std::size_t first_bucket_bytes = std::size_t{1} << 20, std::size_t element_bytes = 4) {
    std::vector<std::int64_t> sizes;
    std::vector<bool> own;
    for (std::size_t k = 0; k < params.size(); ++k)
      TESSERA_EXPECTS(params[k].numel >= 1, "BucketLayout: parameter ", k, " has ", params[k].numel,
                      " elements; each needs >= 1");
    for (const Param& p : params) {
      sizes.push_back(p.numel);
      own.push_back(p.tied);
    }
    BucketLayout out;
    for (const PackedBucket& b : pack_buckets(sizes, own, world, bucket_bytes, first_bucket_bytes, element_bytes)) {
      out.padded.push_back(b.padded);
      out.numel.push_back(b.numel);
    }
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
