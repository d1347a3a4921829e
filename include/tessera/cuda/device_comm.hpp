#pragma once
/// @file
/// DeviceComm: collectives over device memory, stream-ordered, the interface the policies use
/// on GPUs (issue "GPU execution, part 2"). Host code (no nvcc): the implementations live
/// beside it (ThreadDeviceComm in thread_device_comm.cuh: ranks that are threads of one process
/// sharing a GPU).
///
/// Stream-ordered means: a call reads its input after the work already queued on the rank's
/// stream (stream()) and the rank's later work on that stream sees its result; the host does
/// not wait for the GPU (it may wait for the other ranks to arrive, as a host collective does).
/// So `layer.backward(..., stream); comm.all_reduce(grad); optimizer.step(..., stream);` needs
/// no synchronization. Work on other streams is ordered by the caller with an Event. This is
/// the contract of NCCL's calls on a stream (NCCL user guide, "CUDA stream semantics") and of
/// PyTorch's ProcessGroupNCCL.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "tessera/comm/communicator.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda {

/// One transfer of DeviceComm::batch_send_recv: a send of `count` floats at `data` to `peer`, or a
/// receive of as many from it.
struct DeviceP2P {
  bool is_send = true;     ///< send (data is read) or receive (data is written)
  float* data = nullptr;   ///< device memory
  std::int64_t count = 0;  ///< elements
  int peer = -1;           ///< the other rank
  /// A send of x to `peer`.
  static DeviceP2P send(DeviceView<const float> x, int peer) {
    return {true, const_cast<float*>(x.data), x.numel(), peer};
  }
  /// A receive into x from `peer`.
  static DeviceP2P recv(DeviceView<float> x, int peer) { return {false, x.data, x.numel(), peer}; }
};

/// Collectives over fp32 device memory, stream-ordered on this rank's stream() (file comment).
/// Every method named collective must be called by every rank in the same order with the same
/// counts; a mismatch throws tessera::Error on every rank naming the counts. Errors of the
/// host rendezvous are the host communicator's (TimeoutError naming the missing ranks on the
/// threads backend, AbortedError when another rank threw).
class DeviceComm {
 public:
  virtual ~DeviceComm() = default;
  /// This rank's index in [0, size()).
  virtual int rank() const = 0;
  /// Number of ranks.
  virtual int size() const = 0;
  /// The stream every call is ordered on (this rank's compute stream; not owned).
  virtual const Stream& stream() const = 0;
  /// x <- op over ranks of x, on every rank (sum, avg, max or min). Collective. In place.
  virtual void all_reduce(DeviceView<float> x, ReduceOp op) = 0;
  /// out (size() x in.numel() elements) <- every rank's `in`, in rank order. Collective.
  virtual void all_gather(DeviceView<const float> in, DeviceView<float> out) = 0;
  /// out (in.numel() / size() elements) <- op over ranks of this rank's block of `in`
  /// (block r = elements [r n, (r + 1) n), n = out.numel()). Collective.
  virtual void reduce_scatter(DeviceView<const float> in, DeviceView<float> out, ReduceOp op) = 0;
  /// Rank r's piece of `in` -- the counts[r] elements after counts[0] + ... + counts[r - 1] --
  /// reduced over the ranks (op), into rank r's `out` (counts[rank()] elements) only: MPI's
  /// Reduce_scatter with unequal blocks (an empty piece is allowed). `out` may be this rank's
  /// own piece of `in` (in place). The reduction of a gradient bucket onto the owners of its
  /// elements under ZeRO-2 (zero2_piece_counts; DeepSpeed's stage 2 issues one reduce per
  /// owner). Collective: `in` of the same length (the counts' sum) and the same counts on every
  /// rank; a mismatch throws tessera::Error naming the counts.
  virtual void reduce_scatter_v(DeviceView<const float> in, std::span<const std::int64_t> counts, DeviceView<float> out,
                                ReduceOp op) = 0;
  /// out (the counts' sum) <- every rank's `in` (counts[rank] elements) in rank order: MPI's
  /// Allgatherv, the inverse of reduce_scatter_v (an empty piece is allowed); `in` may be this
  /// rank's own piece of `out` (in place). E.g. a bucket of weights whose elements lie in
  /// different ranks' ZeRO shards (zero2_piece_counts). Collective: the same counts on every
  /// rank; a mismatch throws tessera::Error naming the counts.
  virtual void all_gather_v(DeviceView<const float> in, std::span<const std::int64_t> counts, DeviceView<float> out) = 0;
  /// x <- rank root's x, on every rank. Collective.
  virtual void broadcast(DeviceView<float> x, int root) = 0;
  /// Sends x to `peer` (which calls recv with as many elements); x may be overwritten by later
  /// work on stream() at once. Whether the GPU work completes before the peer's recv is the
  /// backend's: ThreadDeviceComm's send is eager (a staging copy), NCCL's completes only with
  /// the matching receive, so under NCCL two ranks that each send before they receive wait for
  /// each other forever: exchange with send_recv.
  virtual void send(DeviceView<const float> x, int peer) = 0;
  /// Receives into x what `peer` sent (in send order); later work on stream() sees it.
  virtual void recv(DeviceView<float> x, int peer) = 0;
  /// Sends `out` to `to` and receives `in` from `from` as one exchange (NCCL: one group), the
  /// form a ring or a pipeline's hand-off in both directions needs on every backend.
  virtual void send_recv(DeviceView<const float> out, int to, DeviceView<float> in, int from) = 0;
  /// Every transfer of `ops` as one exchange (a pipeline schedule's tick: Comm::batch_isend_irecv,
  /// an NCCL group), matched with each peer's in listed order. The default issues the sends, then
  /// the receives, in listed order: right for a backend whose send is eager (ThreadDeviceComm);
  /// NcclDeviceComm groups them.
  virtual void batch_send_recv(std::span<const DeviceP2P> ops) {
    for (const DeviceP2P& op : ops)
      if (op.is_send) send(DeviceView<const float>(op.data, Shape{op.count}), op.peer);
    for (const DeviceP2P& op : ops)
      if (!op.is_send) recv(DeviceView<float>(op.data, Shape{op.count}), op.peer);
  }
};

}  // namespace tessera::cuda
