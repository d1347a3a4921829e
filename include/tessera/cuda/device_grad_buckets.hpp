#pragma once
/// @file
/// device_grad_buckets: the reduction buckets of a flat gradient buffer for data parallelism on
/// a device, as PyTorch DDP forms them (Li et al., VLDB 2020, sec. 3.2.3): consecutive ranges in
/// the order backward finishes them, each closed before it would exceed a size cap, so the
/// first bucket's reduction starts while backward computes the rest. Host code (no CUDA needed).

#include <algorithm>
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

/// ZeRO-2's reduction of one bucket to the owners of its elements: rank r owns the flat
/// elements [r x shard, (r + 1) x shard) (the optimizer's shard, DeviceGPT::shard_optimizer), so
/// the bucket [lo, hi) is cut into `ranks` consecutive pieces, piece r its part inside rank r's
/// shard (possibly empty), and each piece is reduced onto its owner alone, as DeepSpeed's
/// stage 2 reduces a bucket's partitions (DeviceComm::reduce_scatter_v's counts). Returns the
/// pieces' element counts, in rank order (they sum to hi - lo). Throws tessera::Error naming
/// the numbers when the bucket is empty or leaves [0, ranks x shard), or shard or ranks is below 1.
inline std::vector<std::int64_t> zero2_piece_counts(const DeviceGradBucket& bucket, std::int64_t shard, int ranks) {
  TESSERA_EXPECTS(shard >= 1 && ranks >= 1, "zero2_piece_counts: shard ", shard, " elements over ", ranks,
                  " ranks; both must be at least 1");
  TESSERA_EXPECTS(bucket.lo >= 0 && bucket.lo < bucket.hi && bucket.hi <= shard * ranks, "zero2_piece_counts: bucket [",
                  bucket.lo, ", ", bucket.hi, ") is not a non-empty range of the ", ranks, " x ", shard, " = ",
                  shard * ranks, " sharded elements");
  std::vector<std::int64_t> counts(static_cast<std::size_t>(ranks), 0);
  for (int r = 0; r < ranks; ++r) {
    const std::int64_t b = std::max(bucket.lo, shard * r), e = std::min(bucket.hi, shard * (r + 1));
    if (b < e) counts[static_cast<std::size_t>(r)] = e - b;
  }
  return counts;
}

/// Rank `rank`'s piece of a bucket under ZeRO-2: its first flat element (counts[0] + ... +
/// counts[rank - 1] past the bucket's lo, so for an empty piece where it would start) and its
/// length, with `counts` = zero2_piece_counts(bucket, shard, ranks). Throws tessera::Error as
/// zero2_piece_counts, and for a rank out of range.
struct ZeroPiece {
  std::int64_t lo = 0;     ///< first flat element
  std::int64_t count = 0;  ///< elements (0: this rank owns none of the bucket)
};
/// (See ZeroPiece.)
inline ZeroPiece zero2_piece(const DeviceGradBucket& bucket, std::int64_t shard, int ranks, int rank) {
  TESSERA_EXPECTS(rank >= 0 && rank < ranks, "zero2_piece: rank ", rank, " of ", ranks);
  const std::vector<std::int64_t> counts = zero2_piece_counts(bucket, shard, ranks);
  ZeroPiece p{bucket.lo, counts[static_cast<std::size_t>(rank)]};
  for (int r = 0; r < rank; ++r) p.lo += counts[static_cast<std::size_t>(r)];
  return p;
}

}  // namespace tessera::cuda
