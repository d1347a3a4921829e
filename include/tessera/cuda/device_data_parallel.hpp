#pragma once
/// @file
/// DeviceDataParallel: data parallelism over a flat gradient buffer on a device. Each bucket
/// (device_grad_buckets) is all-reduced on a communication stream as soon as backward has
/// queued its last gradient, so the reduction overlaps the rest of backward, as PyTorch DDP and
/// llm.c's multi-GPU path do; finish() orders the compute stream after the last reduction.
/// Under ZeRO-2 each bucket is instead reduced onto the owners of its elements (each rank keeps
/// its shard's gradients only: DeviceBucketGradients). Host code: the device work is
/// DeviceComm's.

#include <cstdint>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_bucket_gradients.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda {

/// The reduction of one rank's flat gradients over a DeviceComm whose stream() is a
/// communication stream (not the compute stream). Per step: each micro-batch's backward calls
/// gradients_final_from(offset) at each of its ready offsets (DeviceGPT::set_backward_hook);
/// with sync on (the last micro-batch of an accumulation) every bucket whose elements are all
/// final is then sum-reduced in place: the communication stream waits for an event recorded on
/// the compute stream and the DeviceComm all-reduces the bucket there. finish() reduces what is
/// left and makes the compute stream wait for the communication stream, so the optimizer step
/// queued after it sees the sums. The gradients are summed, not averaged: scale the loss
/// gradient by 1 / the global batch's tokens (as tessera's CPU DataParallel pre-divides).
class DeviceDataParallel {
 public:
  /// Over `comm` (collective calls on comm.stream()), reducing `grad` (the flat gradients on
  /// `compute`'s work) in `buckets` (covering [0, grad.numel()) in backward's order). Throws
  /// tessera::Error when comm's stream is the compute stream or the buckets do not cover the
  /// buffer once, naming the numbers.
  DeviceDataParallel(DeviceComm& comm, const Stream& compute, DeviceView<float> grad,
                     std::vector<DeviceGradBucket> buckets)
      : comm_(comm), compute_(compute), grad_(grad), buckets_(std::move(buckets)) {
    TESSERA_EXPECTS(comm.stream().get() != compute.get(),
                    "DeviceDataParallel: the communicator must run on its own stream, not the compute stream");
    std::int64_t expect = grad.numel();
    for (const DeviceGradBucket& b : buckets_) {
      TESSERA_EXPECTS(b.hi == expect && b.lo < b.hi, "DeviceDataParallel: bucket [", b.lo, ", ", b.hi,
                      ") does not continue the buckets down from ", expect, " (buffer of ", grad.numel(), ")");
      expect = b.lo;
    }
    TESSERA_EXPECTS(expect == 0, "DeviceDataParallel: the buckets end at ", expect, ", not 0");
  }
  /// ZeRO-2 (Rajbhandari et al. 2020, P_os+g): over `comm` as above, reducing the bucket
  /// buffers of `grads` (not owned; DeviceGPT::shard_gradients), each bucket onto the owners of
  /// its elements (DeviceComm::reduce_scatter_v over zero2_piece_counts: rank r owns the flat
  /// elements [r x n / p, (r + 1) x n / p)), added into the owner's shard of `grads` and its
  /// buffer handed back. Every backward that calls gradients_final_from (DeviceGPT's hook)
  /// reduces, whatever set_sync says (a micro-batch's buckets are not kept for the next: with m
  /// micro-batches m times the bytes of a reduction after the step, as DeepSpeed's stage 2
  /// reduces every micro-step), except the deferred buckets (defer_bucket; the one
  /// `grads.deferred_offset()` names, a pipeline stage's tied wte, is deferred here), held over
  /// the step and reduced by finish(). With no hook the buckets accumulate over the step's
  /// micro-batches, all held at once (as much memory as a whole-model gradient buffer), and
  /// finish() reduces them once. Throws tessera::Error when comm's stream
  /// is the compute stream, or `grads`' shard is not this rank's 1 / size() of its buckets'
  /// elements, naming the numbers.
  DeviceDataParallel(DeviceComm& comm, const Stream& compute, DeviceBucketGradients& grads)
      : comm_(comm), compute_(compute), buckets_(grads.buckets()), zero2_(&grads) {
    TESSERA_EXPECTS(comm.stream().get() != compute.get(),
                    "DeviceDataParallel: the communicator must run on its own stream, not the compute stream");
    const std::int64_t numel = buckets_.empty() ? 0 : buckets_.front().hi;
    shard_ = numel / comm.size();
    TESSERA_EXPECTS(numel > 0 && numel % comm.size() == 0 && grads.shard_begin() == shard_ * comm.rank() &&
                        grads.shard_end() == shard_ * (comm.rank() + 1),
                    "DeviceDataParallel (ZeRO-2): rank ", comm.rank(), " of ", comm.size(), " holds the shard [",
                    grads.shard_begin(), ", ", grads.shard_end(), ") of ", numel, " flat elements; expected [",
                    shard_ * comm.rank(), ", ", shard_ * (comm.rank() + 1), ") (a model built with shards = ",
                    comm.size(), ")");
    if (const auto tied = grads.deferred_offset()) defer_bucket(*tied);  // a stage's tied wte
  }

  /// Whether the next micro-batch's backward reduces (true: the last of an accumulation; the
  /// others only accumulate, as DDP's no_sync). Default true.
  void set_sync(bool sync) { sync_ = sync; }
  /// Backward has queued every gradient at flat offsets >= `offset` (DeviceGPT's hook): starts
  /// the reduction of each bucket not yet reduced whose lo >= offset, in bucket order (under
  /// ZeRO-2 in every backward; after the last bucket the next backward starts over).
  /// Collective (the DeviceComm's all-reduces): every rank's backward calls it alike.
  /// Without ZeRO-2, throws tessera::Error when a second synchronized backward arrives before
  /// finish() (its gradients would be added after the sums and never reduced).
  void gradients_final_from(std::int64_t offset) {
    if (zero2_ != nullptr) {
      hooked_ = true;
      while (next_ < buckets_.size() && buckets_[next_].lo >= offset) {
        if (is_deferred(next_))
          ++next_;  // held over the step: finish() reduces it
        else
          reduce_next();
      }
      if (next_ == buckets_.size()) next_ = 0;
      return;
    }
    if (!sync_) return;
    TESSERA_EXPECTS(next_ < buckets_.size(), "DeviceDataParallel: a second synchronized backward before finish(): "
                    "set_sync(false) for every micro-batch of a step but the last, and call finish() once per step");
    while (next_ < buckets_.size() && buckets_[next_].lo >= offset) reduce_next();
  }
  /// Reduces the buckets not yet reduced (a backward without hooks reduces all here; under
  /// ZeRO-2 with hooks, the deferred buckets only, unless a backward stopped midway) and makes
  /// the compute stream wait for the reductions. Call it after the step's last backward and before reading the
  /// gradients. Collective.
  void finish() {
    if (zero2_ == nullptr) {
      while (next_ < buckets_.size()) reduce_next();
    } else {
      // Decided from the host's calls alone (the same on every rank): without hook calls this
      // step every bucket reduces here; with them the hooks reduced all but the deferred ones,
      // and a backward the hooks left midway (next_ > 0) has the rest reduced here.
      const std::size_t from = !hooked_ ? 0 : next_ > 0 ? next_ : buckets_.size();
      for (std::size_t k = from; k < buckets_.size(); ++k)
        if (!is_deferred(k)) reduce_bucket(k);
      for (const std::size_t k : deferred_) reduce_bucket(k);
      hooked_ = false;
    }
    next_ = 0;
    done_.record(comm_.stream());
    done_.wait_on(compute_);
    if (zero2_ != nullptr) zero2_->release_all();  // the compute stream now waits for their reductions
  }
  /// x <- the sum over the ranks of x, ordered after the compute stream's work and before its
  /// later work (e.g. ZeRO-2's squared gradient norm, each rank's shard's part). Collective.
  void all_reduce(DeviceView<float> x) {
    ready_.record(compute_);
    ready_.wait_on(comm_.stream());
    comm_.all_reduce(x, ReduceOp::sum);
    done_.record(comm_.stream());
    done_.wait_on(compute_);
  }
  /// Whether this reduces ZeRO-2's bucket buffers (the second constructor).
  bool sharded_gradients() const noexcept { return zero2_ != nullptr; }
  /// ZeRO-2's gradients this reduces (the second constructor); nullptr otherwise.
  const DeviceBucketGradients* bucket_gradients() const noexcept { return zero2_; }
  /// ZeRO-3 (the second constructor): out (bucket `k`'s hi - lo elements) <- its flat elements
  /// gathered from every rank's shard of the weights (`shard`: this rank's elements
  /// [r x n / p, (r + 1) x n / p), fp32), each rank giving its piece (DeviceComm::all_gather_v
  /// over zero2_piece_counts), ordered after the compute stream's work; on the communication
  /// stream, after the reductions queued there. Without `done`, the compute stream's later work
  /// waits for it; with `done`, the event is recorded after it instead and the caller makes the
  /// compute stream wait when it needs `out` (a prefetch). Collective. Throws tessera::Error
  /// without ZeRO-2's buckets, for a bucket out of range, or a shard or output of another length.
  void gather_bucket(std::size_t k, DeviceView<const float> shard, DeviceView<float> out, Event* done = nullptr) {
    TESSERA_EXPECTS(zero2_ != nullptr && k < buckets_.size() && shard.numel() == shard_,
                    "DeviceDataParallel::gather_bucket: bucket ", k, " of ", buckets_.size(), ", a shard of ",
                    shard.numel(), " elements (", shard_, " expected; ZeRO-2's constructor)");
    const DeviceGradBucket& b = buckets_[k];
    TESSERA_EXPECTS(out.numel() == b.hi - b.lo, "DeviceDataParallel::gather_bucket: an output of ", out.numel(),
                    " elements for bucket [", b.lo, ", ", b.hi, ")");
    const std::vector<std::int64_t> counts = zero2_piece_counts(b, shard_, comm_.size());
    const ZeroPiece piece = zero2_piece(b, shard_, comm_.size(), comm_.rank());
    ready_.record(compute_);
    ready_.wait_on(comm_.stream());
    comm_.all_gather_v(DeviceView<const float>(shard.data + (piece.lo - shard_ * comm_.rank()), Shape{piece.count}),
                       counts, out);
    if (done != nullptr) {
      done->record(comm_.stream());
      return;
    }
    done_.record(comm_.stream());
    done_.wait_on(compute_);
  }
  /// ZeRO-2: the bucket holding flat element `offset` is not reduced by the backward hooks but
  /// held over the step and reduced by finish(), after the caller changed it (the constructor
  /// defers a pipeline stage's tied wte so, summed over the embedding group first:
  /// DevicePipeline::reduce_tied_embedding). Every rank defers alike. Throws tessera::Error
  /// without ZeRO-2 or for an offset in no bucket.
  void defer_bucket(std::int64_t offset) {
    TESSERA_EXPECTS(zero2_ != nullptr, "DeviceDataParallel::defer_bucket: only ZeRO-2's reduction defers buckets");
    const std::size_t k = zero2_->bucket_of(offset);
    if (!is_deferred(k)) deferred_.push_back(k);
  }
  /// ZeRO-1's gather: out (size() x in.numel() elements) <- every rank's `in` in rank order,
  /// ordered after the compute stream's work and before its later work, e.g. each rank's shard
  /// of the master weights after its optimizer step into the whole buffer (`in` may be `out`'s
  /// rank-th block: in place). Collective.
  void gather(DeviceView<const float> in, DeviceView<float> out) {
    ready_.record(compute_);
    ready_.wait_on(comm_.stream());
    comm_.all_gather(in, out);
    done_.record(comm_.stream());
    done_.wait_on(compute_);
  }
  /// Reductions issued since construction (one per bucket per synchronized step; under ZeRO-2
  /// per backward that calls gradients_final_from).
  std::int64_t reductions() const noexcept { return reductions_; }
  /// The buckets, in reduction order.
  const std::vector<DeviceGradBucket>& buckets() const noexcept { return buckets_; }

 private:
  bool is_deferred(std::size_t k) const {
    for (const std::size_t d : deferred_)
      if (d == k) return true;
    return false;
  }
  void reduce_next() { reduce_bucket(next_++); }
  void reduce_bucket(std::size_t k) {
    const DeviceGradBucket& b = buckets_[k];
    if (zero2_ != nullptr) {
      const DeviceView<float> buf = zero2_->bucket(k);  // taken (and zeroed) before the event if unwritten
      ready_.record(compute_);
      ready_.wait_on(comm_.stream());
      const std::vector<std::int64_t> counts = zero2_piece_counts(b, shard_, comm_.size());
      const ZeroPiece piece = zero2_piece(b, shard_, comm_.size(), comm_.rank());
      const DeviceView<float> mine(buf.data + (piece.lo - b.lo), Shape{piece.count});
      comm_.reduce_scatter_v(buf, counts, mine, ReduceOp::sum);
      if (piece.count > 0) zero2_->accumulate(comm_.stream(), mine, piece.lo);  // a rank may own none of it
      zero2_->release(k, comm_.stream());
      ++reductions_;
      return;
    }
    ready_.record(compute_);
    ready_.wait_on(comm_.stream());
    comm_.all_reduce(DeviceView<float>(grad_.data + b.lo, Shape{b.hi - b.lo}), ReduceOp::sum);
    ++reductions_;
  }

  DeviceComm& comm_;
  const Stream& compute_;
  DeviceView<float> grad_;
  std::vector<DeviceGradBucket> buckets_;
  DeviceBucketGradients* zero2_ = nullptr;  // ZeRO-2: the bucket buffers and the shard (not owned)
  std::vector<std::size_t> deferred_;       // ZeRO-2: buckets reduced by finish() only (defer_bucket)
  bool hooked_ = false;                     // ZeRO-2: gradients_final_from called since the last finish()
  std::int64_t shard_ = 0;                  // ZeRO-2: elements per rank
  std::size_t next_ = 0;
  bool sync_ = true;
  std::int64_t reductions_ = 0;
  Event ready_{}, done_{};
};

}  // namespace tessera::cuda
