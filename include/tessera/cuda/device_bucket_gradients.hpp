#pragma once
/// @file
/// DeviceBucketGradients: the gradients of a flat parameter buffer under ZeRO-2 on a device
/// (Rajbhandari et al., SC 2020, P_os+g). No buffer of the whole model's gradients exists:
/// backward writes each reduction bucket's gradients into a buffer of that bucket alone, taken
/// from the caching allocator when the bucket is first written and handed back once the
/// bucket's reduction onto the owners of its elements has run (DeviceDataParallel's ZeRO-2
/// mode); each rank keeps the reduced gradients of its shard of the flat buffer only, summed
/// over the step's micro-batches. So a rank holds its shard plus the buckets backward is writing
/// or the communication stream is reducing (DeepSpeed's stage 2 keeps its partition plus the
/// reduction buckets alike) -- when each backward reduces as it goes (DeviceDataParallel with
/// DeviceGPT's backward hook); a step whose buckets are reduced only at its end holds them all
/// until then. Host code (no nvcc): the one kernel it needs, dst += src, is
/// passed in (ops::add_into).

#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda {

/// One rank's ZeRO-2 gradients (file comment): per-bucket buffers while backward writes and the
/// reduction reads them, and the reduced, accumulated gradients of this rank's shard.
class DeviceBucketGradients {
 public:
  /// dst[i] += src[i] (fp32, same length) on the stream: ops::add_into.
  using Accumulate = void (*)(const Stream&, DeviceView<const float> src, DeviceView<float> dst);

  /// The gradients of a flat buffer cut into `buckets` (device_grad_buckets: descending,
  /// covering [0, numel)), written by work on `compute` (not owned; it must outlive this);
  /// this rank's shard is the flat elements [shard_begin, shard_end) (its reduced gradients
  /// zeroed). Throws tessera::Error naming the numbers when the buckets do not cover [0, numel)
  /// once, the shard is not within it, or `add` is null.
  DeviceBucketGradients(const Stream& compute, std::vector<DeviceGradBucket> buckets, std::int64_t numel,
                        std::int64_t shard_begin, std::int64_t shard_end, Accumulate add)
      : compute_(compute), buckets_(std::move(buckets)), held_(buckets_.size()), shard_begin_(shard_begin),
        shard_end_(shard_end), add_(add) {
    TESSERA_EXPECTS(add_ != nullptr, "DeviceBucketGradients: no accumulation kernel");
    TESSERA_EXPECTS(0 <= shard_begin && shard_begin <= shard_end && shard_end <= numel, "DeviceBucketGradients: shard [",
                    shard_begin, ", ", shard_end, ") is not within the ", numel, " flat elements");
    std::int64_t expect = numel;
    for (const DeviceGradBucket& b : buckets_) {
      TESSERA_EXPECTS(b.hi == expect && b.lo < b.hi, "DeviceBucketGradients: bucket [", b.lo, ", ", b.hi,
                      ") does not continue the buckets down from ", expect, " (", numel, " elements)");
      expect = b.lo;
    }
    TESSERA_EXPECTS(expect == 0, "DeviceBucketGradients: the buckets end at ", expect, ", not 0");
    shard_ = DeviceTensor<float>::zeros(Shape{shard_end - shard_begin}, compute_);
  }

  /// The index of the bucket holding flat element `offset`. Throws tessera::Error when no
  /// bucket does.
  std::size_t bucket_of(std::int64_t offset) const {
    // Buckets are descending: the first whose lo <= offset.
    const auto it = std::partition_point(buckets_.begin(), buckets_.end(),
                                         [offset](const DeviceGradBucket& b) { return b.lo > offset; });
    TESSERA_EXPECTS(it != buckets_.end() && offset < it->hi, "DeviceBucketGradients: flat element ", offset,
                    " is in no bucket (", buckets_.empty() ? 0 : buckets_.front().hi, " elements)");
    return static_cast<std::size_t>(it - buckets_.begin());
  }
  /// Where flat element `offset`'s gradient is written by the current backward: in its
  /// bucket's buffer, which this takes (zeroed on the compute stream) if the bucket has none
  /// yet. A parameter lies in one bucket, so its gradient is contiguous from here.
  float* at(std::int64_t offset) {
    const std::size_t b = bucket_of(offset);
    return bucket(b).data + (offset - buckets_[b].lo);
  }
  /// Bucket `b`'s buffer (hi - lo elements), taken and zeroed on the compute stream if it has
  /// none yet (a bucket no gradient was written to reduces zeros). Throws tessera::Error for
  /// an index out of range.
  DeviceView<float> bucket(std::size_t b) {
    TESSERA_EXPECTS(b < buckets_.size(), "DeviceBucketGradients: bucket ", b, " of ", buckets_.size());
    if (held_[b].numel() == 0) {
      collect();
      held_[b] = DeviceTensor<float>::zeros(Shape{buckets_[b].hi - buckets_[b].lo}, compute_);
      live_ += held_[b].numel();
      held_now_ += held_[b].numel();
      peak_ = std::max(peak_, live_);
      peak_held_ = std::max(peak_held_, held_now_);
    }
    return held_[b].view();
  }
  /// Whether bucket `b` holds a buffer (written since its last release).
  bool holds(std::size_t b) const { return b < held_.size() && held_[b].numel() > 0; }
  /// dst = this rank's reduced gradients of the flat elements [flat_lo, flat_lo + piece's
  /// length) += `piece`, on `s` (the communication stream, after the reduction that wrote
  /// `piece`); nothing for an empty piece. Throws tessera::Error naming the range when a
  /// non-empty piece leaves the shard.
  void accumulate(const Stream& s, DeviceView<const float> piece, std::int64_t flat_lo) {
    if (piece.numel() == 0) return;  // a rank that owns none of the bucket
    TESSERA_EXPECTS(flat_lo >= shard_begin_ && flat_lo + piece.numel() <= shard_end_, "DeviceBucketGradients: piece [",
                    flat_lo, ", ", flat_lo + piece.numel(), ") leaves the shard [", shard_begin_, ", ", shard_end_, ")");
    add_(s, piece, DeviceView<float>(shard_.data() + (flat_lo - shard_begin_), Shape{piece.numel()}));
  }
  /// Hands bucket `b`'s buffer back once the work queued on `s` so far (its reduction) is done:
  /// its memory returns to the allocator at a later bucket() or release_all() that finds that
  /// work finished, so no later work can reuse it while the reduction still reads it. The next
  /// write to the bucket takes a new buffer. Nothing when it holds none.
  void release(std::size_t b, const Stream& s) {
    TESSERA_EXPECTS(b < buckets_.size(), "DeviceBucketGradients: bucket ", b, " of ", buckets_.size());
    if (held_[b].numel() == 0) return;
    held_now_ -= held_[b].numel();
    std::unique_ptr<Event> e;
    if (spare_.empty()) {
      e = std::make_unique<Event>();
    } else {
      e = std::move(spare_.back());
      spare_.pop_back();
    }
    Pending p{std::move(held_[b]), std::move(e)};
    held_[b] = DeviceTensor<float>();
    p.done->record(s);
    pending_.push_back(std::move(p));
  }
  /// Frees every released buffer: call it once the compute stream waits for the streams that
  /// reduced them (DeviceDataParallel::finish), so later work on it cannot overtake them.
  void release_all() {
    for (Pending& p : pending_) {
      live_ -= p.buffer.numel();
      spare_.push_back(std::move(p.done));
    }
    pending_.clear();
  }
  /// Zeroes this rank's reduced gradients (a step's start), on the compute stream, and drops the
  /// buffers of buckets written and never reduced (e.g. a micro-batch of a step abandoned after
  /// an error), so nothing of them reaches the next reduction.
  void zero_shard() {
    shard_.fill_zero(compute_);
    for (DeviceTensor<float>& h : held_)
      if (h.numel() > 0) {
        live_ -= h.numel();
        held_now_ -= h.numel();
        h = DeviceTensor<float>();  // back to the compute stream's cache: only its later work reuses it
      }
  }
  /// This rank's reduced gradients, flat elements [shard_begin(), shard_end()).
  DeviceView<float> shard() const noexcept { return shard_.view(); }
  /// First flat element of the shard.
  std::int64_t shard_begin() const noexcept { return shard_begin_; }
  /// One past the shard's last element.
  std::int64_t shard_end() const noexcept { return shard_end_; }
  /// The buckets, in backward's (reduction) order.
  const std::vector<DeviceGradBucket>& buckets() const noexcept { return buckets_; }
  /// A flat element whose bucket the reduction holds over the step and reduces only in its
  /// finish() (a pipeline stage's tied wte, summed over the embedding group first:
  /// DeviceDataParallel's ZeRO-2 constructor defers it); nullopt: none. Set by
  /// DeviceGPT::shard_gradients. Throws tessera::Error for an element in no bucket.
  void set_deferred_offset(std::optional<std::int64_t> offset) {
    if (offset) (void)bucket_of(*offset);
    deferred_offset_ = offset;
  }
  /// (See set_deferred_offset.)
  std::optional<std::int64_t> deferred_offset() const noexcept { return deferred_offset_; }
  /// Elements of the bucket buffers held or awaiting their reduction now, and the most at once
  /// since construction (the shard not counted): the memory ZeRO-2 keeps of the gradients
  /// beside its shard.
  std::int64_t live_elements() const noexcept { return live_; }
  /// (See live_elements.)
  std::int64_t peak_elements() const noexcept { return peak_; }
  /// The most elements of bucket buffers taken and not yet released at once (those awaiting
  /// their reduction not counted): set by backward's order alone, where live_elements() also
  /// depends on how far the GPU lags the host. Under DeviceDataParallel's hooks, the bucket of
  /// the tied wte (written by the head, first, and by the embedding, last) plus one other.
  std::int64_t peak_held_elements() const noexcept { return peak_held_; }

 private:
  struct Pending {
    DeviceTensor<float> buffer;
    std::unique_ptr<Event> done;  // recorded after its reduction
  };
  // Frees the released buffers whose reductions are done (in release order; never blocks).
  void collect() {
    while (!pending_.empty() && pending_.front().done->done()) {
      live_ -= pending_.front().buffer.numel();
      spare_.push_back(std::move(pending_.front().done));
      pending_.pop_front();
    }
  }

  const Stream& compute_;
  std::vector<DeviceGradBucket> buckets_;
  std::vector<DeviceTensor<float>> held_;  // per bucket: its buffer while written (empty: none)
  std::deque<Pending> pending_;
  std::vector<std::unique_ptr<Event>> spare_;  // events of freed buffers, for the next release
  DeviceTensor<float> shard_;
  std::int64_t shard_begin_, shard_end_;
  Accumulate add_;
  std::int64_t live_ = 0, peak_ = 0, held_now_ = 0, peak_held_ = 0;
  std::optional<std::int64_t> deferred_offset_;
};

}  // namespace tessera::cuda
