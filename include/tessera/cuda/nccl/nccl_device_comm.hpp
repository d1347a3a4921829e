#pragma once
/// @file
/// NcclDeviceComm: DeviceComm over an NCCL communicator (one rank per GPU, threads or
/// processes). NCCL runs every call on the communicator's own stream; this adapter orders that
/// stream after the rank's stream (an event recorded there) and the rank's stream after the
/// call (an event recorded on the communicator's stream), so the host never waits for the GPU,
/// as PyTorch's ProcessGroupNCCL orders its NCCL stream against the current stream. Host code;
/// include it only where CUDA and NCCL are installed.

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tessera/comm/nccl/nccl_communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda {

/// DeviceComm over an NCCL tessera::Comm (file comment). Each call returns once NCCL has
/// enqueued it; its Request is kept and tested by later calls, so an asynchronous NCCL error or
/// an aborted communicator surfaces as the NCCL backend's CommError at the next call (and at
/// wait_all()). broadcast is the one call that waits for the GPU (tessera::Comm's broadcast is
/// blocking).
class NcclDeviceComm final : public DeviceComm {
 public:
  /// Over `nccl` (a communicator of the NCCL backend: nccl::make_communicator), ordering calls on
  /// `stream` (this rank's, on the communicator's device; not owned: it must outlive this).
  /// Throws tessera::Error when `nccl` is not an NCCL communicator.
  NcclDeviceComm(Comm nccl, const Stream& stream) : comm_(std::move(nccl)), stream_(&stream) {
    TESSERA_EXPECTS(comm_.valid(), "NcclDeviceComm: the communicator is empty");
    backend_ = std::dynamic_pointer_cast<nccl::NcclCommunicator>(comm_.backend_ptr());
    TESSERA_EXPECTS(backend_ != nullptr, "NcclDeviceComm: '", comm_.name(),
                    "' is not an NCCL communicator (threads sharing a GPU: ThreadDeviceComm)");
  }

  int rank() const override { return comm_.rank(); }
  int size() const override { return comm_.size(); }
  const Stream& stream() const override { return *stream_; }

  /// ncclAllReduce in place, stream-ordered. Collective.
  void all_reduce(DeviceView<float> x, ReduceOp op) override {
    order_in("all_reduce");
    keep(comm_.iall_reduce(std::span<float>(x.data, static_cast<std::size_t>(x.numel())), op));
    order_out("all_reduce");
  }
  /// ncclAllGather, stream-ordered. Collective.
  void all_gather(DeviceView<const float> in, DeviceView<float> out) override {
    order_in("all_gather");
    keep(comm_.iall_gather(std::span<const float>(in.data, static_cast<std::size_t>(in.numel())),
                           std::span<float>(out.data, static_cast<std::size_t>(out.numel()))));
    order_out("all_gather");
  }
  /// ncclReduceScatter, stream-ordered. Collective.
  void reduce_scatter(DeviceView<const float> in, DeviceView<float> out, ReduceOp op) override {
    order_in("reduce_scatter");
    keep(comm_.ireduce_scatter(std::span<const float>(in.data, static_cast<std::size_t>(in.numel())),
                               std::span<float>(out.data, static_cast<std::size_t>(out.numel())), op));
    order_out("reduce_scatter");
  }
  /// One ncclReduce per non-empty piece (root: its rank) in one group, stream-ordered
  /// (NcclCommunicator::reduce_scatter_v). Collective. Throws tessera::Error on this rank when
  /// the counts are not one per rank, do not sum to the input's length, or this rank's output
  /// is not its count (NCCL checks nothing across ranks: equal counts are the caller's).
  void reduce_scatter_v(DeviceView<const float> in, std::span<const std::int64_t> counts, DeviceView<float> out,
                        ReduceOp op) override {
    std::int64_t total = 0;
    for (const std::int64_t c : counts) total += c;
    TESSERA_EXPECTS(counts.size() == static_cast<std::size_t>(size()) && total == in.numel() &&
                        out.numel() == counts[static_cast<std::size_t>(rank())],
                    "NcclDeviceComm::reduce_scatter_v on ", comm_.name(), ": ", counts.size(), " counts for ", size(),
                    " ranks summing to ", total, ", an input of ", in.numel(), " elements, an output of ", out.numel(),
                    " on rank ", rank());
    order_in("reduce_scatter_v");
    keep(backend_->reduce_scatter_v(in.data, out.data, counts, op));
    order_out("reduce_scatter_v");
  }
  /// One ncclBroadcast per non-empty piece (root: its rank) in one group, stream-ordered
  /// (NcclCommunicator::all_gather_v). Collective. Throws tessera::Error on this rank when the
  /// counts are not one per rank, do not sum to the output's length, or this rank's input is
  /// not its count (NCCL checks nothing across ranks: equal counts are the caller's).
  void all_gather_v(DeviceView<const float> in, std::span<const std::int64_t> counts, DeviceView<float> out) override {
    std::int64_t total = 0;
    for (const std::int64_t c : counts) total += c;
    TESSERA_EXPECTS(counts.size() == static_cast<std::size_t>(size()) && total == out.numel() &&
                        in.numel() == counts[static_cast<std::size_t>(rank())],
                    "NcclDeviceComm::all_gather_v on ", comm_.name(), ": ", counts.size(), " counts for ", size(),
                    " ranks summing to ", total, ", an output of ", out.numel(), " elements, an input of ", in.numel(),
                    " on rank ", rank());
    order_in("all_gather_v");
    keep(backend_->all_gather_v(in.data, out.data, counts));
    order_out("all_gather_v");
  }
  /// ncclBroadcast; returns when it is done on the GPU. Collective.
  void broadcast(DeviceView<float> x, int root) override {
    order_in("broadcast");
    comm_.broadcast(std::span<float>(x.data, static_cast<std::size_t>(x.numel())), root);
    order_out("broadcast");
  }
  /// ncclSend, stream-ordered. It completes only with the peer's ncclRecv: ranks that each send
  /// before they receive deadlock (use send_recv).
  void send(DeviceView<const float> x, int peer) override {
    order_in("send");
    keep(comm_.isend(std::span<const float>(x.data, static_cast<std::size_t>(x.numel())), peer));
    order_out("send");
  }
  /// ncclRecv, stream-ordered.
  void recv(DeviceView<float> x, int peer) override {
    order_in("recv");
    keep(comm_.irecv(std::span<float>(x.data, static_cast<std::size_t>(x.numel())), peer));
    order_out("recv");
  }

  /// ncclSend of `out` to `to` and ncclRecv of `in` from `from` in one group (batch_isend_irecv),
  /// stream-ordered: a ring of these does not deadlock.
  void send_recv(DeviceView<const float> out, int to, DeviceView<float> in, int from) override {
    order_in("send_recv");
    const std::array<P2POp, 2> ops{P2POp::send(std::span<const float>(out.data, static_cast<std::size_t>(out.numel())), to),
                                   P2POp::recv(std::span<float>(in.data, static_cast<std::size_t>(in.numel())), from)};
    keep(comm_.batch_isend_irecv(std::span<const P2POp>(ops)));
    order_out("send_recv");
  }

  /// Every transfer of `ops` in one NCCL group (batch_isend_irecv), stream-ordered: a pipeline
  /// tick's sends and receives in both directions do not deadlock.
  void batch_send_recv(std::span<const DeviceP2P> ops) override {
    if (ops.empty()) return;
    order_in("batch_send_recv");
    std::vector<P2POp> group;
    for (const DeviceP2P& op : ops) {
      const auto n = static_cast<std::size_t>(op.count);
      group.push_back(op.is_send ? P2POp::send(std::span<const float>(op.data, n), op.peer)
                                 : P2POp::recv(std::span<float>(op.data, n), op.peer));
    }
    keep(comm_.batch_isend_irecv(std::span<const P2POp>(group)));
    order_out("batch_send_recv");
  }

  /// Blocks until every call issued so far is done on the GPU; throws the NCCL backend's
  /// TimeoutError or CommError of the first that failed.
  void wait_all() {
    while (!pending_.empty()) {
      pending_.front().wait();
      pending_.pop_front();
    }
  }

 private:
  // The communicator's stream waits for the work queued on the rank's stream.
  void order_in(const char* call) {
    in_.record(*stream_);
    detail::check(cudaStreamWaitEvent(backend_->stream(), in_.get(), 0), "cudaStreamWaitEvent", "NcclDeviceComm::",
                  call, " on ", comm_.name());
  }
  // The rank's stream waits for the call just issued on the communicator's stream.
  void order_out(const char* call) {
    detail::check(cudaEventRecord(out_.get(), backend_->stream()), "cudaEventRecord", "NcclDeviceComm::", call, " on ",
                  comm_.name());
    out_.wait_on(*stream_);
  }
  // Keeps a call's Request, dropping (and so checking) those already complete.
  void keep(Request r) {
    while (!pending_.empty() && pending_.front().test()) pending_.pop_front();
    pending_.push_back(std::move(r));
  }

  Comm comm_;
  std::shared_ptr<nccl::NcclCommunicator> backend_;
  const Stream* stream_;
  Event in_{}, out_{};
  std::deque<Request> pending_;
};

}  // namespace tessera::cuda
