#pragma once
/// @file
/// ThreadDeviceComm: the threads backend over device memory. Ranks are threads of one process
/// sharing one GPU (how every layout is tested on a one-GPU machine: NCCL refuses two ranks on
/// one device, nccl#418), each with its own stream; device pointers and CUDA events pass
/// between them through a host communicator of the threads backend, and the GPU work is
/// ordered by events, never by host waits. CUDA code (nvcc).
///
/// The reductions are the host threads backend's, bitwise: all_reduce has each rank reduce its
/// own slice of the buffer, reading that slice from every rank's buffer in rank order
/// (math::reduce_ranks) and writing the result into every rank's buffer, as threads'
/// reduce_range does on the host. Each collective is three host rendezvous: the first exchanges
/// pointers and events (every rank's stream then waits for every other rank's input to be
/// ready), the second, after each rank recorded that its part is done, lets every rank's
/// stream wait for all parts before its later work (so no rank overwrites a buffer another
/// still reads), the third ends every use of another rank's events (so each may be destroyed).

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/reduce_op_math.hpp"

namespace tessera::cuda {

namespace kernels {
/// Most ranks a ThreadDeviceComm holds (its kernels take every rank's pointer by value).
inline constexpr int kMaxDeviceRanks = 64;

/// Every rank's source and destination pointer of one reduction, by value.
struct RankPointers {
  const float* src[kMaxDeviceRanks];
  float* dst[kMaxDeviceRanks];
};

/// Element i of every rank's source, as math::reduce_ranks reads it.
struct RankElement {
  const float* const* src;
  std::int64_t i;
  __device__ float operator[](int q) const { return src[q][i]; }
};

/// dst[d][i] = reduce over q of src[q][i] (rank order), for i in [0, count), every d < ndst.
template <int = 0>
__global__ void reduce_ranks(RankPointers p, int n, int ndst, std::int64_t count, ReduceOp op) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const float v = math::reduce_ranks(RankElement{p.src, i}, n, op);
    for (int d = 0; d < ndst; ++d) p.dst[d][i] = v;
  }
}
}  // namespace kernels

/// DeviceComm for ranks that are threads of one process on one GPU (file comment). Give it a
/// host communicator of its own (Comm::split or a second threads::run communicator): its
/// rendezvous are host collectives and point-to-point messages on that communicator.
class ThreadDeviceComm final : public DeviceComm {
 public:
  /// Over `host` (every rank a thread of this process), ordering every call on `stream` (this
  /// rank's, on the current device; not owned: it must outlive this object). Collective over
  /// `host`. Throws tessera::Error on every rank when a rank is in another process (device
  /// pointers pass only between threads: use NCCL across processes), uses another CUDA device,
  /// or there are more than 64 ranks; CudaError without a device.
  ThreadDeviceComm(Comm host, const Stream& stream)
      : host_(std::move(host)), stream_(&stream) {
    TESSERA_EXPECTS(host_.valid(), "ThreadDeviceComm: the host communicator is empty");
    const int n = host_.size();
    TESSERA_EXPECTS(n <= kernels::kMaxDeviceRanks, "ThreadDeviceComm over ", host_.name(), ": ", n,
                    " ranks, at most ", kernels::kMaxDeviceRanks);
    const std::array<std::int64_t, 2> mine{static_cast<std::int64_t>(getpid()), current_device()};
    std::vector<std::int64_t> all(2 * static_cast<std::size_t>(n));
    host_.all_gather(std::span<const std::int64_t>(mine), all);
    for (int q = 0; q < n; ++q) {
      const auto at = static_cast<std::size_t>(2 * q);
      TESSERA_EXPECTS(all[at] == all[0], "ThreadDeviceComm over ", host_.name(), ": rank ", q, " is process ",
                      all[at], ", rank 0 process ", all[0],
                      "; device pointers pass only between threads of one process (use NCCL across processes)");
      TESSERA_EXPECTS(all[at + 1] == all[1], "ThreadDeviceComm over ", host_.name(), ": rank ", q, " uses CUDA device ",
                      all[at + 1], ", rank 0 device ", all[1], "; every rank must use the same device");
    }
  }

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  const Stream& stream() const override { return *stream_; }
  /// The host communicator's name, e.g. "threads:world".
  std::string name() const { return host_.name(); }

  /// x <- op over ranks of x (DeviceComm::all_reduce); bitwise the threads backend's host
  /// all_reduce of the same values. Collective; throws tessera::Error on every rank when the
  /// ranks' counts or ops differ.
  void all_reduce(DeviceView<float> x, ReduceOp op) override {
    const int n = size(), me = rank();
    const std::int64_t count = x.numel();
    const auto all = exchange(x.data, count, count, static_cast<std::int64_t>(op));
    check_same("all_reduce", all, kCount, "elements");
    check_same("all_reduce", all, kOp, "as the op (0 sum, 1 avg, 2 max, 3 min)");
    wait_ready("all_reduce", all);
    const std::int64_t lo = count * me / n, hi = count * (me + 1) / n;
    kernels::RankPointers p{};
    for (int q = 0; q < n; ++q) {
      float* buf = reinterpret_cast<float*>(all[static_cast<std::size_t>(q)][kPtr]);
      p.src[q] = buf + lo;
      p.dst[q] = buf + lo;
    }
    launch_reduce(p, n, n, hi - lo, op, "all_reduce");
    rendezvous_out("all_reduce", all);
  }

  /// out <- every rank's `in` in rank order (DeviceComm::all_gather): each rank copies every
  /// rank's input into its own output. Collective; throws tessera::Error on every rank when the
  /// counts differ or an output is not size() x the input.
  void all_gather(DeviceView<const float> in, DeviceView<float> out) override {
    const int n = size();
    const std::int64_t count = in.numel();
    const auto all = exchange(in.data, count, out.numel(), 0);
    check_same("all_gather", all, kCount, "input elements");
    for (int q = 0; q < n; ++q)
      TESSERA_EXPECTS(all[static_cast<std::size_t>(q)][kOther] == n * count, "ThreadDeviceComm::all_gather on ",
                      name(), ": rank ", q, "'s output has ", all[static_cast<std::size_t>(q)][kOther],
                      " elements, ", n, " ranks x ", count, " = ", n * count, " expected");
    wait_ready("all_gather", all);
    for (int q = 0; q < n; ++q)
      copy(out.data + q * count, reinterpret_cast<const float*>(all[static_cast<std::size_t>(q)][kPtr]), count,
           "all_gather");
    rendezvous_out("all_gather", all);
  }

  /// out <- op over ranks of this rank's block of `in` (DeviceComm::reduce_scatter); bitwise the
  /// threads backend's host reduce_scatter. Collective; throws tessera::Error on every rank when
  /// the counts or ops differ or an input is not size() x the output.
  void reduce_scatter(DeviceView<const float> in, DeviceView<float> out, ReduceOp op) override {
    const int n = size(), me = rank();
    const std::int64_t count = out.numel();
    const auto all = exchange(in.data, count, in.numel(), static_cast<std::int64_t>(op));
    check_same("reduce_scatter", all, kCount, "output elements");
    for (int q = 0; q < n; ++q) {
      const std::int64_t in_count = all[static_cast<std::size_t>(q)][kOther];
      TESSERA_EXPECTS(in_count == n * count, "ThreadDeviceComm::reduce_scatter on ", name(), ": rank ", q,
                      "'s input has ", in_count, " elements, ", n, " ranks x ", count, " = ", n * count, " expected");
    }
    check_same("reduce_scatter", all, kOp, "as the op (0 sum, 1 avg, 2 max, 3 min)");
    wait_ready("reduce_scatter", all);
    kernels::RankPointers p{};
    for (int q = 0; q < n; ++q) p.src[q] = reinterpret_cast<const float*>(all[static_cast<std::size_t>(q)][kPtr]) + me * count;
    p.dst[0] = out.data;
    launch_reduce(p, n, 1, count, op, "reduce_scatter");
    rendezvous_out("reduce_scatter", all);
  }

  /// Rank r's piece of `in` reduced into rank r's `out` (DeviceComm::reduce_scatter_v): each
  /// rank reduces its own piece, reading it from every rank's input in rank order; bitwise the
  /// same elements of all_reduce. Collective; throws tessera::Error on every rank when the ranks'
  /// counts, input lengths or ops differ, the counts do not sum to the input's length, or an
  /// output is not its rank's count.
  void reduce_scatter_v(DeviceView<const float> in, std::span<const std::int64_t> counts, DeviceView<float> out,
                        ReduceOp op) override {
    const int n = size(), me = rank();
    const auto all = exchange(in.data, out.numel(), in.numel(), static_cast<std::int64_t>(op), counts_hash(counts));
    check_same("reduce_scatter_v", all, kExtra, "as the hash of the counts (the counts differ)");
    check_same("reduce_scatter_v", all, kOther, "input elements");
    check_same("reduce_scatter_v", all, kOp, "as the op (0 sum, 1 avg, 2 max, 3 min)");
    TESSERA_EXPECTS(counts.size() == static_cast<std::size_t>(n), "ThreadDeviceComm::reduce_scatter_v on ", name(), ": ",
                    counts.size(), " counts for ", n, " ranks");
    std::int64_t total = 0, offset = 0;
    for (int q = 0; q < n; ++q) {
      const std::int64_t c = counts[static_cast<std::size_t>(q)];
      TESSERA_EXPECTS(c >= 0 && all[static_cast<std::size_t>(q)][kCount] == c, "ThreadDeviceComm::reduce_scatter_v on ",
                      name(), ": rank ", q, "'s count is ", c, " and its output has ",
                      all[static_cast<std::size_t>(q)][kCount], " elements");
      if (q < me) offset += c;
      total += c;
    }
    TESSERA_EXPECTS(total == all[0][kOther], "ThreadDeviceComm::reduce_scatter_v on ", name(), ": the counts sum to ",
                    total, ", the input has ", all[0][kOther], " elements");
    wait_ready("reduce_scatter_v", all);
    kernels::RankPointers p{};
    for (int q = 0; q < n; ++q)
      p.src[q] = reinterpret_cast<const float*>(all[static_cast<std::size_t>(q)][kPtr]) + offset;
    p.dst[0] = out.data;
    launch_reduce(p, n, 1, counts[static_cast<std::size_t>(me)], op, "reduce_scatter_v");
    rendezvous_out("reduce_scatter_v", all);
  }

  /// out <- every rank's `in` in rank order (DeviceComm::all_gather_v): each rank copies every
  /// rank's piece into its own output. Collective; throws tessera::Error on every rank when the
  /// ranks' counts or output lengths differ, the counts do not sum to the output's length, or an
  /// input is not its rank's count.
  void all_gather_v(DeviceView<const float> in, std::span<const std::int64_t> counts, DeviceView<float> out) override {
    const int n = size();
    const auto all = exchange(in.data, in.numel(), out.numel(), 0, counts_hash(counts));
    check_same("all_gather_v", all, kExtra, "as the hash of the counts (the counts differ)");
    check_same("all_gather_v", all, kOther, "output elements");
    TESSERA_EXPECTS(counts.size() == static_cast<std::size_t>(n), "ThreadDeviceComm::all_gather_v on ", name(), ": ",
                    counts.size(), " counts for ", n, " ranks");
    std::int64_t total = 0;
    for (int q = 0; q < n; ++q) {
      const std::int64_t c = counts[static_cast<std::size_t>(q)];
      TESSERA_EXPECTS(c >= 0 && all[static_cast<std::size_t>(q)][kCount] == c, "ThreadDeviceComm::all_gather_v on ",
                      name(), ": rank ", q, "'s count is ", c, " and its input has ",
                      all[static_cast<std::size_t>(q)][kCount], " elements");
      total += c;
    }
    TESSERA_EXPECTS(total == all[0][kOther], "ThreadDeviceComm::all_gather_v on ", name(), ": the counts sum to ", total,
                    ", the output has ", all[0][kOther], " elements");
    wait_ready("all_gather_v", all);
    std::int64_t offset = 0;
    for (int q = 0; q < n; ++q) {
      const std::int64_t c = counts[static_cast<std::size_t>(q)];
      copy(out.data + offset, reinterpret_cast<const float*>(all[static_cast<std::size_t>(q)][kPtr]), c, "all_gather_v");
      offset += c;
    }
    rendezvous_out("all_gather_v", all);
  }

  /// x <- rank root's x on every rank. Collective; throws tessera::Error on every rank when the
  /// counts or roots differ or the root is not a rank.
  void broadcast(DeviceView<float> x, int root) override {
    const std::int64_t count = x.numel();
    const auto all = exchange(x.data, count, count, root);
    check_same("broadcast", all, kCount, "elements");
    check_same("broadcast", all, kOp, "as the root");
    TESSERA_EXPECTS(root >= 0 && root < size(), "ThreadDeviceComm::broadcast on ", name(), ": root ", root,
                    " is not a rank of ", size());
    wait_ready("broadcast", all);
    if (rank() != root)
      copy(x.data, reinterpret_cast<const float*>(all[static_cast<std::size_t>(root)][kPtr]), count, "broadcast");
    rendezvous_out("broadcast", all);
  }

  /// Sends x to `peer` (DeviceComm::send): copies it on stream() into a staging block
  /// (cudaMallocAsync) and posts the block and an event on the host communicator; the
  /// receiver's stream waits for the event, copies and frees the block. Returns at once.
  void send(DeviceView<const float> x, int peer) override {
    check_peer("send", peer);
    const std::int64_t count = x.numel();
    const std::size_t bytes = static_cast<std::size_t>(count) * sizeof(float);
    void* staging = nullptr;
    if (bytes > 0) {
      detail::check(cudaMallocAsync(&staging, bytes, stream_->get()), "cudaMallocAsync", "ThreadDeviceComm::send on ",
                    name(), " (", count, " elements to rank ", peer, ")");
      detail::check(cudaMemcpyAsync(staging, x.data, bytes, cudaMemcpyDeviceToDevice, stream_->get()), "cudaMemcpyAsync",
                    "ThreadDeviceComm::send on ", name());
    }
    cudaEvent_t e = nullptr;
    detail::check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags",
                  "ThreadDeviceComm::send on ", name());
    detail::check(cudaEventRecord(e, stream_->get()), "cudaEventRecord", "ThreadDeviceComm::send on ", name());
    const std::array<std::int64_t, 3> msg{reinterpret_cast<std::intptr_t>(staging), reinterpret_cast<std::intptr_t>(e),
                                          count};
    host_.send(std::span<const std::int64_t>(msg), peer, kTag);
  }

  /// send(out, to), then recv(in, from) (the send is eager, so this cannot deadlock).
  void send_recv(DeviceView<const float> out, int to, DeviceView<float> in, int from) override {
    send(out, to);
    recv(in, from);
  }

  /// Receives into x what `peer` sent (DeviceComm::recv). Throws tessera::Error naming both
  /// counts when the message has another count (the staging block is still freed).
  void recv(DeviceView<float> x, int peer) override {
    check_peer("recv", peer);
    std::array<std::int64_t, 3> msg{};
    host_.recv(std::span<std::int64_t>(msg), peer, kTag);
    void* staging = reinterpret_cast<void*>(msg[0]);
    auto e = reinterpret_cast<cudaEvent_t>(msg[1]);
    detail::check(cudaStreamWaitEvent(stream_->get(), e, 0), "cudaStreamWaitEvent", "ThreadDeviceComm::recv on ", name());
    (void)cudaEventDestroy(e);  // released once the recorded work is done
    const bool same = msg[2] == x.numel();
    if (same && msg[2] > 0)
      detail::check(cudaMemcpyAsync(x.data, staging, static_cast<std::size_t>(msg[2]) * sizeof(float),
                                    cudaMemcpyDeviceToDevice, stream_->get()),
                    "cudaMemcpyAsync", "ThreadDeviceComm::recv on ", name());
    if (staging != nullptr)
      detail::check(cudaFreeAsync(staging, stream_->get()), "cudaFreeAsync", "ThreadDeviceComm::recv on ", name());
    TESSERA_EXPECTS(same, "ThreadDeviceComm::recv on ", name(), ": rank ", rank(), " expects ", x.numel(),
                    " elements from rank ", peer, ", which sent ", msg[2]);
  }

 private:
  // Fields of a rank's rendezvous record.
  // pointer, ready event, done event, count, the other buffer's count, op (or root), a call's
  // extra field (reduce_scatter_v: its counts' hash).
  static constexpr std::size_t kPtr = 0, kReady = 1, kDone = 2, kCount = 3, kOther = 4, kOp = 5, kExtra = 6;
  static constexpr int kTag = 0x7d3;
  using Record = std::array<std::int64_t, 7>;

  // Records "ready" on the stream and exchanges every rank's Record (the callers check the
  // records, identical on every rank, before wait_ready touches another rank's event: a
  // mismatch throws on every rank with no event of another rank used). Collective over host_.
  std::vector<Record> exchange(const void* ptr, std::int64_t count, std::int64_t other, std::int64_t op,
                               std::int64_t extra = 0) {
    ready_.record(*stream_);
    const Record mine{reinterpret_cast<std::intptr_t>(ptr), reinterpret_cast<std::intptr_t>(ready_.get()),
                      reinterpret_cast<std::intptr_t>(done_.get()), count, other, op, extra};
    const int n = size();
    std::vector<std::int64_t> flat(mine.size() * static_cast<std::size_t>(n));
    host_.all_gather(std::span<const std::int64_t>(mine), flat);
    std::vector<Record> all(static_cast<std::size_t>(n));
    for (int q = 0; q < n; ++q)
      std::copy_n(flat.begin() + static_cast<std::ptrdiff_t>(q * mine.size()), mine.size(),
                  all[static_cast<std::size_t>(q)].begin());
    return all;
  }

  // FNV-1a over a call's counts (and their number), exchanged so that differing counts throw on
  // every rank.
  static std::int64_t counts_hash(std::span<const std::int64_t> counts) {
    std::uint64_t hash = 1469598103934665603ull ^ counts.size();
    for (const std::int64_t c : counts) hash = (hash ^ static_cast<std::uint64_t>(c)) * 1099511628211ull;
    return static_cast<std::int64_t>(hash);
  }

  // Makes the stream wait for every other rank's ready (its input). Local.
  void wait_ready(const char* call, const std::vector<Record>& all) {
    for (int q = 0; q < size(); ++q)
      if (q != rank())
        detail::check(cudaStreamWaitEvent(stream_->get(), reinterpret_cast<cudaEvent_t>(all[static_cast<std::size_t>(q)][kReady]), 0),
                      "cudaStreamWaitEvent", "ThreadDeviceComm::", call, " on ", name());
  }

  // Records "done", waits (host) for every rank to have recorded its own, makes the stream wait
  // for all of them, and waits (host) once more for every rank to have done so: after it no
  // rank uses another's events for this call, so a rank may destroy its own (the object, at
  // the end of a run) without a peer still about to wait on them. Collective over host_.
  void rendezvous_out(const char* call, const std::vector<Record>& all) {
    done_.record(*stream_);
    host_.barrier();
    for (int q = 0; q < size(); ++q)
      if (q != rank())
        detail::check(cudaStreamWaitEvent(stream_->get(), reinterpret_cast<cudaEvent_t>(all[static_cast<std::size_t>(q)][kDone]), 0),
                      "cudaStreamWaitEvent", "ThreadDeviceComm::", call, " on ", name());
    host_.barrier();
  }

  // Throws on every rank (each sees every record) when field `f` differs between ranks.
  void check_same(const char* call, const std::vector<Record>& all, std::size_t f, const char* what) const {
    for (int q = 1; q < size(); ++q)
      TESSERA_EXPECTS(all[static_cast<std::size_t>(q)][f] == all[0][f], "ThreadDeviceComm::", call, " on ", name(),
                      ": rank 0 gave ", all[0][f], " and rank ", q, " gave ", all[static_cast<std::size_t>(q)][f], " ",
                      what, "; every rank must call it alike");
  }

  void check_peer(const char* call, int peer) const {
    TESSERA_EXPECTS(peer >= 0 && peer < size() && peer != rank(), "ThreadDeviceComm::", call, " on ", name(), ": peer ",
                    peer, " is not another rank of ", size(), " (this rank is ", rank(), ")");
  }

  void copy(float* dst, const float* src, std::int64_t count, const char* call) {
    if (count <= 0 || dst == src) return;
    detail::check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(count) * sizeof(float), cudaMemcpyDeviceToDevice,
                                  stream_->get()),
                  "cudaMemcpyAsync", "ThreadDeviceComm::", call, " on ", name());
  }

  void launch_reduce(const kernels::RankPointers& p, int n, int ndst, std::int64_t count, ReduceOp op, const char* call) {
    if (count <= 0) return;
    const int threads = 256;
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((count + threads - 1) / threads, 1024));
    kernels::reduce_ranks<<<blocks, threads, 0, stream_->get()>>>(p, n, ndst, count, op);
    detail::check_launch("reduce_ranks", "ThreadDeviceComm::", call, " on ", name());
  }

  Comm host_;
  const Stream* stream_;
  Event ready_{}, done_{};
};

}  // namespace tessera::cuda
