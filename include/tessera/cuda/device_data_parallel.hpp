#pragma once
/// @file
/// DeviceDataParallel: data parallelism over a flat gradient buffer on a device. Each bucket
/// (device_grad_buckets) is all-reduced on a communication stream as soon as backward has
/// queued its last gradient, so the reduction overlaps the rest of backward, as PyTorch DDP and
/// llm.c's multi-GPU path do; finish() orders the compute stream after the last reduction.
/// Host code: the device work is DeviceComm's.

#include <cstdint>
#include <vector>

#include "tessera/core/error.hpp"
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

  /// Whether the next micro-batch's backward reduces (true: the last of an accumulation; the
  /// others only accumulate, as DDP's no_sync). Default true.
  void set_sync(bool sync) { sync_ = sync; }
  /// Backward has queued every gradient at flat offsets >= `offset` (DeviceGPT's hook): starts
  /// the reduction of each bucket not yet reduced whose lo >= offset, in bucket order.
  /// Collective (the DeviceComm's all-reduces): every rank's backward calls it alike.
  /// Throws tessera::Error when a second synchronized backward arrives before finish() (its
  /// gradients would be added after the sums and never reduced).
  void gradients_final_from(std::int64_t offset) {
    if (!sync_) return;
    TESSERA_EXPECTS(next_ < buckets_.size(), "DeviceDataParallel: a second synchronized backward before finish(): "
                    "set_sync(false) for every micro-batch of a step but the last, and call finish() once per step");
    while (next_ < buckets_.size() && buckets_[next_].lo >= offset) reduce_next();
  }
  /// Reduces the buckets not yet reduced (a backward without hooks reduces all here) and makes
  /// the compute stream wait for the reductions. Call it after the step's last backward and
  /// before reading the gradients. Collective.
  void finish() {
    while (next_ < buckets_.size()) reduce_next();
    next_ = 0;
    done_.record(comm_.stream());
    done_.wait_on(compute_);
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
  /// All-reduces issued since construction (one per bucket per synchronized step).
  std::int64_t reductions() const noexcept { return reductions_; }
  /// The buckets, in reduction order.
  const std::vector<DeviceGradBucket>& buckets() const noexcept { return buckets_; }

 private:
  void reduce_next() {
    const DeviceGradBucket& b = buckets_[next_++];
    ready_.record(compute_);
    ready_.wait_on(comm_.stream());
    comm_.all_reduce(DeviceView<float>(grad_.data + b.lo, Shape{b.hi - b.lo}), ReduceOp::sum);
    ++reductions_;
  }

  DeviceComm& comm_;
  const Stream& compute_;
  DeviceView<float> grad_;
  std::vector<DeviceGradBucket> buckets_;
  std::size_t next_ = 0;
  bool sync_ = true;
  std::int64_t reductions_ = 0;
  Event ready_{}, done_{};
};

}  // namespace tessera::cuda
