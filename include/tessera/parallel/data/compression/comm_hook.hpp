#pragma once
/// @file
/// CommHook: how a data-parallel replica reduces one gradient bucket, replaceable per model,
/// as PyTorch DDP's `register_comm_hook` (a hook sees a bucket's flat gradient and returns its
/// reduction). The built-in hooks are AllReduceHook (no compression), HalfPrecisionHook
/// (bf16 / fp16 transport), PowerSGDHook and TopKHook (compression with error feedback);
/// a user-written compressor derives from CommHook the same way.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/parallel/data/compression/dp_rank_state.hpp"

namespace tessera {

/// One parameter's gradient inside a bucket: its first element in the bucket's flat buffer and
/// its shape (PowerSGD sees a gradient of rank >= 2 as a matrix (shape[0], numel / shape[0])).
struct GradBucketTensor {
  std::int64_t offset = 0;  ///< first element in GradBucketView::grad
  Shape shape;              ///< the parameter's shape
};

/// What a CommHook sees of one bucket in one reduction.
template <std::floating_point T>
struct GradBucketView {
  std::size_t index = 0;                  ///< bucket index: the same bucket has the same index on every rank, every step
  std::span<T> grad;                      ///< this rank's flat gradients (the elements in use, no padding)
  std::vector<GradBucketTensor> tensors;  ///< its parameters, in bucket order
};

/// A bucket's reduction over the dp ranks. GradBuckets calls `reduce` for every bucket, in
/// bucket order, on every rank, where it would otherwise start the bucket's all-reduce (see
/// GradBuckets::set_comm_hook). The hook replaces `bucket.grad` in place with the *sum* over
/// the ranks of their gradients, or the compressor's estimate of it; tessera's gradients are
/// already divided by the global sample count (DataParallel::loss_scale), so the sum is DDP's
/// average. Every rank must end with bitwise the same values (the replicas stay identical).
///
/// State (an error-feedback residual, a warm-started factor) is kept per `bucket.index`.
/// A hook runs its collectives blocking, so a compressed bucket is not overlapped with the
/// rest of backward. One hook object serves one replica (one rank); it is not shared between
/// ranks' threads.
template <std::floating_point T>
class CommHook {
 public:
  virtual ~CommHook() = default;
  /// Replaces `bucket.grad` with the (estimated) sum over the ranks of `comm`. Collective over
  /// `comm`: every rank calls it for the same bucket, with the same size and tensor list.
  /// Throws what the communicator throws, and tessera::Error for a bucket it cannot handle.
  virtual void reduce(GradBucketView<T>& bucket, Comm& comm) = 0;
  /// Short name for logs: "none", "bf16", "powersgd:4", "topk:0.01", ...
  virtual std::string name() const = 0;
  /// Reductions of each bucket that are the plain fp32 all-reduce before compression starts
  /// (PowerSGD's and top-k's `warmup=N`; 0 for the others): an optimizer whose state must see
  /// only uncompressed gradients (AdamW's frozen variance) checks against it.
  virtual std::int64_t warmup_steps() const noexcept { return 0; }

  /// Whether the hook has a point-to-point form (encode / decode): a sender encodes its values,
  /// a receiver decodes and sums them, as a parameter server's push (ParameterServer::
  /// set_push_hook). AllReduceHook (identity) and HalfPrecisionHook (16-bit values) have one;
  /// PowerSGD and top-k need the ranks' collectives and do not.
  virtual bool point_to_point() const { return false; }
  /// Point-to-point form: the number of T elements that carry `n` encoded values. Throws
  /// tessera::Error when point_to_point() is false. Local.
  virtual std::size_t encoded_size(std::size_t n) const {
    TESSERA_EXPECTS(false, "CommHook ", name(), " has no point-to-point form (", n, " values)");
    return 0;
  }
  /// Point-to-point form: encodes `values` into `out` (encoded_size(values.size()) elements).
  /// Throws as encoded_size. Local.
  virtual void encode(std::span<const T> values, std::span<T> out) {
    TESSERA_EXPECTS(false, "CommHook ", name(), " has no point-to-point form (", values.size(), " -> ", out.size(), ")");
  }
  /// Point-to-point form: decodes `in` (encode's output) into `values`. Throws as
  /// encoded_size. Local.
  virtual void decode(std::span<const T> in, std::span<T> values) const {
    TESSERA_EXPECTS(false, "CommHook ", name(), " has no point-to-point form (", in.size(), " -> ", values.size(), ")");
  }

  /// This rank's state across steps (error-feedback residuals, warm starts, warm-up counts),
  /// for a checkpoint: load_state of it into a fresh hook of the same options continues
  /// bitwise as this one would. Stateless hooks return nothing. Local.
  virtual DpRankState<T> state() const { return {}; }
  /// Restores a state() of a hook of the same kind and options (on the same bucket layout).
  /// Call before the first reduction. Throws tessera::Error when the state does not fit (a
  /// stateless hook given state, a tensor of another size, naming it). Local.
  virtual void load_state(const DpRankState<T>& state) {
    TESSERA_EXPECTS(state.empty(), "CommHook ", name(), ": keeps no state, but was given ", state.tensors.size(),
                    " tensors and ", state.counters.size(), " counters");
  }

  /// Bytes this rank has sent in the hook's collectives so far, counted with the ring
  /// algorithms' volumes (all-reduce of B bytes over p ranks: 2 (p - 1) / p B; all-gather of B
  /// bytes per rank: (p - 1) B; point-to-point: the bytes sent), so hooks compare on one scale.
  std::int64_t bytes_sent() const noexcept { return bytes_sent_; }

 protected:
  /// Counts a ring all-reduce of `count` elements of `elem_bytes` over `ranks`.
  void count_all_reduce(std::size_t count, std::size_t elem_bytes, int ranks) noexcept {
    bytes_sent_ += static_cast<std::int64_t>(2 * static_cast<double>(ranks - 1) / ranks * static_cast<double>(count * elem_bytes));
  }
  /// Counts a ring all-gather of `count` elements of `elem_bytes` per rank over `ranks`.
  void count_all_gather(std::size_t count, std::size_t elem_bytes, int ranks) noexcept {
    bytes_sent_ += static_cast<std::int64_t>(count * elem_bytes) * (ranks - 1);
  }
  /// Counts `bytes` sent point-to-point.
  void count_sent(std::size_t bytes) noexcept { bytes_sent_ += static_cast<std::int64_t>(bytes); }

 private:
  std::int64_t bytes_sent_ = 0;
};

}  // namespace tessera
