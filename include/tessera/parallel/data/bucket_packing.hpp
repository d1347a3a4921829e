#pragma once
/// @file
/// pack_buckets: the rule by which GradBuckets packs a data-parallel unit's parameters into flat
/// buckets, on sizes alone. GradBuckets (grad_buckets.hpp) builds its buckets from it, and the
/// planner (plan/bucket_layout.hpp) counts the dp collectives' messages and bytes from it, so both
/// use one piece of code.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "tessera/core/error.hpp"

namespace tessera {

/// One bucket of pack_buckets' result.
struct PackedBucket {
  /// The bucket's parameters, as indices into pack_buckets' `numel` list, in packing order
  /// (reverse list order: the last layers' gradients are final first).
  std::vector<std::size_t> params{};
  /// Each parameter's offset in the bucket's flat buffer (elements), parallel to `params`.
  std::vector<std::int64_t> offsets{};
  /// Elements in use (the parameters' elements, no padding).
  std::int64_t numel = 0;
  /// Elements of the bucket's buffer: numel rounded up to a multiple of the world size, or
  /// numel itself for an aliased bucket.
  std::int64_t padded = 0;
  /// True when the bucket is one tied parameter's own gradient tensor (no copy, no padding).
  bool alias = false;
};

/// Packs parameters of `numel[k]` elements (list order) into buckets for `world` ranks, the way
/// GradBuckets lays them out: in reverse list order, each bucket filled until it holds at least
/// `first_bucket_bytes` (the first bucket) or `bucket_bytes` (the others) of `element_bytes`-byte
/// elements; a parameter with `own_bucket[k]` set (a tied parameter whose gradient tensor is
/// contiguous) whose elements are a multiple of `world` is a bucket of its own (aliased: its
/// gradient tensor is the buffer) and closes the open bucket. Every other bucket's buffer is
/// padded to a multiple of `world` elements (the reduce-scatter's equal blocks).
/// A parameter of 0 elements takes an offset and adds nothing. Throws Error when world < 1,
/// element_bytes < 1, the lists differ in length or a size is negative. Local.
inline std::vector<PackedBucket> pack_buckets(const std::vector<std::int64_t>& numel,
                                              const std::vector<bool>& own_bucket, int world,
                                              std::size_t bucket_bytes, std::size_t first_bucket_bytes,
                                              std::size_t element_bytes) {
  TESSERA_EXPECTS(world >= 1 && element_bytes >= 1, "pack_buckets: world ", world, " and element_bytes ",
                  element_bytes, " must be >= 1");
  TESSERA_EXPECTS(numel.size() == own_bucket.size(), "pack_buckets: ", numel.size(), " sizes but ",
                  own_bucket.size(), " own-bucket flags");
  std::vector<PackedBucket> out;
  std::size_t cap = first_bucket_bytes;
  bool open = false;       // a bucket of views is open
  std::size_t packed = 0;  // buckets of views made so far
  for (std::size_t k = numel.size(); k-- > 0;) {
    TESSERA_EXPECTS(numel[k] >= 0, "pack_buckets: parameter ", k, " has ", numel[k], " elements");
    if (own_bucket[k] && numel[k] % world == 0) {
      PackedBucket b;
      b.params.push_back(k);
      b.offsets.push_back(0);
      b.numel = b.padded = numel[k];
      b.alias = true;
      out.push_back(std::move(b));
      open = false;
      continue;
    }
    if (!open || static_cast<std::size_t>(out.back().numel) * element_bytes >= cap) {
      if (packed++ > 0) cap = bucket_bytes;
      out.emplace_back();
      open = true;
    }
    PackedBucket& b = out.back();
    b.params.push_back(k);
    b.offsets.push_back(b.numel);
    b.numel += numel[k];
  }
  const std::int64_t w = world;
  for (PackedBucket& b : out)
    if (!b.alias) b.padded = (b.numel + w - 1) / w * w;
  return out;
}

}  // namespace tessera
