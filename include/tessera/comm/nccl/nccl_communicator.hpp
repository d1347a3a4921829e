#pragma once
/// @file
/// NcclCommunicator: the NCCL + CUDA backend behind tessera::Comm, and make_communicator, which
/// builds one from any bootstrap communicator (threads or MPI). The only tessera header, with
/// its siblings in this folder, that includes <nccl.h>: include it only where CUDA and NCCL are
/// installed (Meson: `dependency('tessera-nccl')`, which defines TESSERA_HAVE_NCCL).
///
/// Buffers are device memory: tessera::Comm hands the pointers through untouched. Each
/// communicator owns one CUDA stream; every call is issued on it in call order, so calls on one
/// communicator never overlap each other but can overlap compute on other streams.
///
/// Source of the design: NCCL's non-blocking communicators (ncclConfig_t::blocking = 0),
/// ncclCommGetAsyncError polling and ncclCommAbort (NCCL user guide, "Fault tolerance"), as
/// PyTorch's ProcessGroupNCCL uses them to turn hangs into errors.

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/nccl/device.hpp"
#include "tessera/comm/nccl/nccl_error.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

static_assert(NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0),
              "tessera's NCCL backend needs NCCL 2.18 or newer (ncclCommSplit and non-blocking "
              "communicators); the nccl.h found is older.");

namespace tessera::nccl {

/// The NCCL element type of a DType: f32 -> ncclFloat32, f64 -> ncclFloat64, i32 -> ncclInt32,
/// i64 -> ncclInt64.
constexpr ncclDataType_t to_nccl(DType t) noexcept {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
  }
  return ncclFloat32;
}

/// The NCCL reduction of a ReduceOp: sum -> ncclSum, avg -> ncclAvg, max -> ncclMax,
/// min -> ncclMin.
constexpr ncclRedOp_t to_nccl(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::avg: return ncclAvg;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  return ncclSum;
}

/// Options of make_communicator, set with designated initializers:
/// `make_communicator(world, device, {.name = "nccl:dp", .timeout = 30s})`.
struct NcclOptions {
  std::string name = "nccl:world";        ///< name used in errors (the Mesh renames axes)
  std::chrono::milliseconds timeout{0};   ///< wait limit; 0: the bootstrap's timeout, else default_timeout()
};

namespace detail {

/// Sets a CUDA device for the lifetime of the guard and restores the caller's current device
/// afterwards, so that a call on a communicator does not change the thread's device.
class DeviceGuard {
 public:
  /// Makes `device` current; throws CommError if cudaSetDevice fails. `what` names the call.
  DeviceGuard(int device, const std::string& what) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice", what);
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice", what, " (cuda device ", device, ")");
      switched_ = true;
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  /// Restores the previous device (errors ignored: a destructor must not throw).
  ~DeviceGuard() {
    if (switched_) static_cast<void>(cudaSetDevice(previous_));
  }

 private:
  int previous_ = 0;
  bool switched_ = false;
};

/// Polling pace for waits: yields for the first 200 us (small collectives finish in tens of
/// microseconds), then sleeps 20 us growing to 1 ms, so a long wait does not burn a core.
class Backoff {
 public:
  /// Pauses once.
  void pause() {
    using namespace std::chrono;
    if (steady_clock::now() - start_ < microseconds(200)) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min<microseconds>(sleep_ * 2, milliseconds(1));
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::chrono::microseconds sleep_{20};
};

/// A config for a non-blocking communicator: NCCL calls return ncclInProgress instead of
/// blocking the host, so every wait can be bounded by a timeout and end in ncclCommAbort.
inline ncclConfig_t nonblocking_config() noexcept {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

/// Result of ncclCommGetAsyncError (or the failure of that call itself).
inline ncclResult_t async_state(ncclComm_t comm) noexcept {
  ncclResult_t state = ncclSuccess;
  const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
  return r != ncclSuccess ? r : state;
}

/// True for a result that is an error (neither ncclSuccess nor ncclInProgress).
constexpr bool is_error(ncclResult_t r) noexcept { return r != ncclSuccess && r != ncclInProgress; }

/// State shared by an NcclCommunicator and the requests it returned: the ncclComm_t, the
/// stream, an event pool and whether the communicator was aborted. The last owner finalizes
/// and destroys the communicator.
class NcclState {
 public:
  ncclComm_t comm = nullptr;            ///< owned; freed by abort() or the destructor
  cudaStream_t stream = nullptr;        ///< owned; every call of this communicator runs on it
  float* scratch = nullptr;             ///< one float of device memory for barrier()
  int device = -1;                      ///< CUDA device of this rank
  int rank = 0;                         ///< rank in the communicator
  int size = 0;                         ///< number of ranks
  std::string name;                     ///< used in errors
  std::chrono::milliseconds timeout{};  ///< wait limit of every call

  NcclState() = default;
  NcclState(const NcclState&) = delete;
  NcclState& operator=(const NcclState&) = delete;

  /// Flushes and destroys the communicator (ncclCommFinalize, then ncclCommDestroy; if that
  /// does not finish within the timeout, ncclCommAbort), then frees the stream, events and
  /// scratch memory. Never throws.
  ~NcclState() {
    if (device < 0) return;
    int previous = -1;
    const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device;
    static_cast<void>(cudaSetDevice(device));
    if (comm != nullptr && !aborted_.load()) {
      ncclResult_t r = ncclCommFinalize(comm);
      Backoff backoff;
      const auto start = std::chrono::steady_clock::now();
      while (r == ncclSuccess || r == ncclInProgress) {
        r = async_state(comm);
        if (r != ncclInProgress || std::chrono::steady_clock::now() - start > timeout) break;
        backoff.pause();
      }
      static_cast<void>(r == ncclSuccess ? ncclCommDestroy(comm) : ncclCommAbort(comm));
    }
    for (cudaEvent_t e : free_events_) static_cast<void>(cudaEventDestroy(e));
    if (scratch != nullptr) static_cast<void>(cudaFree(scratch));
    if (stream != nullptr) static_cast<void>(cudaStreamDestroy(stream));
    if (restore) static_cast<void>(cudaSetDevice(previous));
  }

  /// "nccl:world (rank 0 of 2, cuda device 0)": how errors name this communicator.
  std::string where() const {
    return str(name, " (rank ", rank, " of ", size, ", cuda device ", device, ")");
  }

  /// True once the communicator was aborted (after a timeout or an asynchronous error).
  bool aborted() const noexcept { return aborted_.load(); }

  /// Throws CommError (code() = ncclInvalidUsage) when the communicator was aborted.
  void ensure_usable(const char* call) const {
    if (!aborted_.load()) return;
    std::lock_guard lock(mutex_);
    throw CommError(str(call, " on ", where(), ": the communicator was aborted earlier (",
                        abort_reason_, "); make a new communicator"),
                    static_cast<int>(ncclInvalidUsage));
  }

  /// Aborts the communicator (ncclCommAbort) once; later calls throw CommError naming
  /// `reason`. Never throws.
  void abort(const std::string& reason) noexcept {
    std::lock_guard lock(mutex_);
    if (aborted_.load()) return;
    int previous = -1;
    const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device;
    static_cast<void>(cudaSetDevice(device));
    if (comm != nullptr) static_cast<void>(ncclCommAbort(comm));
    if (restore) static_cast<void>(cudaSetDevice(previous));
    try {
      abort_reason_ = reason;
    } catch (...) {
      abort_reason_.clear();
    }
    aborted_.store(true);
  }

  /// Aborts and throws CommError (code() = `state`) for an asynchronous NCCL error.
  [[noreturn]] void fail_async(const char* call, ncclResult_t state) {
    const std::string last = ncclGetLastError(comm);
    const std::string message =
        str(call, " on ", where(), ": NCCL reported an asynchronous error: ", nccl_error_text(state),
            last.empty() ? "" : "; NCCL says: ", last, "; the communicator was aborted (ncclCommAbort)");
    abort(message);
    throw CommError(message, static_cast<int>(state));
  }

  /// Aborts and throws CommError (code() = the cudaError_t) for a failed CUDA call.
  [[noreturn]] void fail_cuda(const char* call, const char* cuda_call, cudaError_t e) {
    const std::string message = str(call, " on ", where(), ": ", cuda_call, " failed: ",
                                    cuda_error_text(e), "; the communicator was aborted (ncclCommAbort)");
    abort(message);
    throw CommError(message, static_cast<int>(e));
  }

  /// Aborts and throws TimeoutError (code() = the last ncclCommGetAsyncError state, usually
  /// ncclSuccess or ncclInProgress) for a call that waited past the timeout.
  [[noreturn]] void fail_timeout(const char* call, const char* phase, ncclResult_t state) {
    const std::string message =
        str(call, " on ", where(), " did not complete within ", timeout.count(), " ms (", phase,
            "); NCCL cannot tell which ranks did not arrive: every rank of ", name,
            " must call the same collectives in the same order with the same counts; the "
            "communicator was aborted (ncclCommAbort)");
    abort(message);
    throw TimeoutError(message, static_cast<int>(state));
  }

  /// Completes the host side of an NCCL call: throws CommError for an immediate error `r` of
  /// `nccl_call`; while NCCL still enqueues (ncclInProgress), polls ncclCommGetAsyncError
  /// until it is done, throwing as fail_async / fail_timeout say.
  void finish_enqueue(const char* call, const char* nccl_call, ncclResult_t r) {
    check_nccl(r, nccl_call, call, " on ", where());
    if (r == ncclSuccess) return;
    Backoff backoff;
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const ncclResult_t state = async_state(comm);
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) fail_async(call, state);
      if (std::chrono::steady_clock::now() - start > timeout)
        fail_timeout(call, "NCCL was still enqueueing it", state);
      backoff.pause();
    }
  }

  /// An event from the pool (or a new one) on this communicator's device. The device must be
  /// current.
  cudaEvent_t take_event(const char* call) {
    {
      std::lock_guard lock(mutex_);
      if (!free_events_.empty()) {
        cudaEvent_t e = free_events_.back();
        free_events_.pop_back();
        return e;
      }
    }
    cudaEvent_t e = nullptr;
    check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags",
               call, " on ", where());
    return e;
  }

  /// Returns an event to the pool. Never throws (an event that cannot be kept is destroyed).
  void give_event(cudaEvent_t e) noexcept {
    std::lock_guard lock(mutex_);
    try {
      free_events_.push_back(e);
    } catch (...) {
      static_cast<void>(cudaEventDestroy(e));
    }
  }

 private:
  mutable std::mutex mutex_;             // guards free_events_ and abort_reason_
  std::vector<cudaEvent_t> free_events_;
  std::atomic<bool> aborted_{false};
  std::string abort_reason_;
};

/// The Request of one NCCL call: a CUDA event recorded on the communicator's stream right after
/// the call. test() queries it; wait() polls it and ncclCommGetAsyncError until the timeout.
class NcclRequest final : public RequestImpl {
 public:
  /// Records the event on `state`'s stream. The device must be current. Throws CommError.
  NcclRequest(std::shared_ptr<NcclState> state, const char* call)
      : state_(std::move(state)), call_(call), event_(state_->take_event(call)) {
    const cudaError_t e = cudaEventRecord(event_, state_->stream);
    if (e != cudaSuccess) {
      state_->give_event(event_);
      event_ = nullptr;
      check_cuda(e, "cudaEventRecord", call_, " on ", state_->where());
    }
  }
  NcclRequest(const NcclRequest&) = delete;
  NcclRequest& operator=(const NcclRequest&) = delete;
  /// Returns the event to the pool; does not wait.
  ~NcclRequest() override {
    if (event_ != nullptr) state_->give_event(event_);
  }

  /// Blocks until the call has completed on the GPU. Throws TimeoutError after the
  /// communicator's timeout, CommError on an asynchronous NCCL error or a CUDA error, and
  /// CommError if the communicator was aborted meanwhile; the first two abort it
  /// (ncclCommAbort).
  void wait() override {
    Backoff backoff;
    const auto start = std::chrono::steady_clock::now();
    while (!poll_()) {
      if (std::chrono::steady_clock::now() - start > state_->timeout)
        state_->fail_timeout(call_, "waiting for the GPU", async_state(state_->comm));
      backoff.pause();
    }
  }

  /// True once the call has completed on the GPU; never blocks. Throws as wait() does, except
  /// TimeoutError.
  bool test() override { return poll_(); }

 private:
  bool poll_() {
    if (done_) return true;
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaSuccess) {
      // Completed; an error NCCL noticed while running it is still this call's error.
      if (!state_->aborted()) {
        const ncclResult_t state = async_state(state_->comm);
        if (is_error(state)) state_->fail_async(call_, state);
      }
      done_ = true;
      return true;
    }
    if (e != cudaErrorNotReady) state_->fail_cuda(call_, "cudaEventQuery", e);
    state_->ensure_usable(call_);
    const ncclResult_t state = async_state(state_->comm);
    if (is_error(state)) state_->fail_async(call_, state);
    return false;
  }

  std::shared_ptr<NcclState> state_;
  const char* call_;
  cudaEvent_t event_ = nullptr;
  bool done_ = false;
};

/// Initializes rank `rank` of `size` on `device` from `id` as a non-blocking communicator and
/// waits (up to `timeout`) until NCCL has finished. Throws CommError / TimeoutError naming
/// `name`; a communicator that failed is aborted.
inline ncclComm_t init_rank(const ncclUniqueId& id, int rank, int size, int device,
                            const std::string& name, std::chrono::milliseconds timeout) {
  const std::string what = str("make_communicator ", name, " (rank ", rank, " of ", size,
                               ", cuda device ", device, ")");
  set_device(device);
  ncclConfig_t config = nonblocking_config();
  ncclComm_t comm = nullptr;
  ncclUniqueId copy = id;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, size, copy, rank, &config);
  if (is_error(r) && comm != nullptr) static_cast<void>(ncclCommAbort(comm));
  check_nccl(r, "ncclCommInitRankConfig", what);
  Backoff backoff;
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    const ncclResult_t state = async_state(comm);
    if (state == ncclSuccess) return comm;
    if (state != ncclInProgress || std::chrono::steady_clock::now() - start > timeout) {
      static_cast<void>(ncclCommAbort(comm));
      if (state != ncclInProgress) check_nccl(state, "ncclCommInitRankConfig (asynchronous)", what);
      throw TimeoutError(str(what, ": ncclCommInitRankConfig did not complete within ",
                             timeout.count(), " ms; every rank must call it with the same id and size"),
                         static_cast<int>(state));
    }
    backoff.pause();
  }
}

}  // namespace detail

/// The NCCL backend of tessera::Comm: one rank of an ncclComm_t on one CUDA device, with its
/// own CUDA stream. Made by make_communicator (or by split); use it through tessera::Comm.
///
/// Buffers are device memory. Calls run on stream() in call order. That stream is created with
/// default flags, so it is ordered with the legacy default stream (stream 0): work issued
/// there before a call finishes before the call starts. Work on other streams must be ordered
/// by the caller (record an event there and cudaStreamWaitEvent(stream(), event)).
///
/// Every wait is bounded by timeout(): past it, or on an asynchronous NCCL error, the
/// communicator is aborted (ncclCommAbort) and the call throws TimeoutError or CommError
/// (code() = the ncclResult_t) naming the call and the communicator; every later call on it
/// throws CommError. NCCL has no message tags: point-to-point messages between two ranks match
/// in issue order and the tag is ignored; NCCL does not detect a receive whose count or type
/// differs from the send's (the receive then gets wrong data or times out).
class NcclCommunicator final : public CommBackend {
 public:
  /// Adopts `comm`, a fully initialized non-blocking NCCL communicator (made with
  /// config.blocking = 0; ncclCommGetAsyncError returns ncclSuccess) whose rank runs on CUDA
  /// device `device`; it is destroyed with this object. Creates the stream. Throws CommError if
  /// a CUDA or NCCL call fails (`comm` is then destroyed too). make_communicator calls this.
  NcclCommunicator(ncclComm_t comm, int device, std::string name, std::chrono::milliseconds timeout)
      : state_(std::make_shared<detail::NcclState>()) {
    detail::NcclState& s = *state_;
    s.comm = comm;
    s.device = device;
    s.name = std::move(name);
    s.timeout = timeout;
    const detail::DeviceGuard guard(device, "NcclCommunicator " + s.name);
    detail::check_nccl(ncclCommUserRank(comm, &s.rank), "ncclCommUserRank", "NcclCommunicator ", s.name);
    detail::check_nccl(ncclCommCount(comm, &s.size), "ncclCommCount", "NcclCommunicator ", s.name);
    detail::check_cuda(cudaStreamCreate(&s.stream), "cudaStreamCreate", "NcclCommunicator ", s.where());
    void* p = nullptr;
    detail::check_cuda(cudaMalloc(&p, sizeof(float)), "cudaMalloc", "NcclCommunicator ", s.where());
    s.scratch = static_cast<float*>(p);
  }

  /// This rank's index in [0, size()).
  int rank() const override { return state_->rank; }
  /// Number of ranks.
  int size() const override { return state_->size; }
  /// Name used in errors, e.g. "nccl:world".
  std::string name() const override { return state_->name; }
  /// Renames the communicator (local to this rank).
  void set_name(std::string name) override { state_->name = std::move(name); }
  /// Wait limit of every call (see the class comment).
  std::chrono::milliseconds timeout() const override { return state_->timeout; }
  /// Sets the wait limit (local to this rank).
  void set_timeout(std::chrono::milliseconds t) override { state_->timeout = t; }

  /// The CUDA stream every call of this communicator runs on.
  cudaStream_t stream() const noexcept { return state_->stream; }
  /// The CUDA device of this rank.
  int device() const noexcept { return state_->device; }
  /// The underlying NCCL communicator (owned by this object: do not destroy it).
  ncclComm_t native_handle() const noexcept { return state_->comm; }
  /// True once the communicator was aborted (after a timeout or an asynchronous error).
  bool aborted() const noexcept { return state_->aborted(); }

  /// ncclAllReduce in place on `data` (device memory). Collective.
  Request all_reduce(void* data, std::size_t count, DType t, ReduceOp op, bool async) override {
    detail::NcclState& s = *state_;
    return run_("all_reduce", "ncclAllReduce", count, async, [&] {
      return ncclAllReduce(data, data, count, to_nccl(t), to_nccl(op), s.comm, s.stream);
    });
  }

  /// ncclAllGather of `count` elements per rank from `in` into `out`. Collective.
  Request all_gather(const void* in, void* out, std::size_t count, DType t, bool async) override {
    detail::NcclState& s = *state_;
    return run_("all_gather", "ncclAllGather", count, async, [&] {
      return ncclAllGather(in, out, count, to_nccl(t), s.comm, s.stream);
    });
  }

  /// ncclReduceScatter: `out` (count elements) gets block rank() of the reduction of all `in`.
  /// Collective.
  Request reduce_scatter(const void* in, void* out, std::size_t count, DType t, ReduceOp op,
                         bool async) override {
    detail::NcclState& s = *state_;
    return run_("reduce_scatter", "ncclReduceScatter", count, async, [&] {
      return ncclReduceScatter(in, out, count, to_nccl(t), to_nccl(op), s.comm, s.stream);
    });
  }

  /// Reduce_scatter with unequal blocks: rank r's piece of `in` (counts[r] elements after the
  /// pieces of ranks 0..r-1) reduced into rank r's `out` only, as one ncclReduce per non-empty
  /// piece (root r) inside one ncclGroupStart / ncclGroupEnd (DeepSpeed's stage 2 reduces a
  /// bucket's partitions so). `out` may be this rank's piece of `in`. NCCL-only (not part of
  /// CommBackend): tessera::cuda::NcclDeviceComm::reduce_scatter_v calls it. Collective: the
  /// same counts on every rank (NCCL does not check; a mismatch hangs until the timeout).
  /// Throws Error when counts has not size() entries, CommError when NCCL fails.
  Request reduce_scatter_v(const float* in, float* out, std::span<const std::int64_t> counts, ReduceOp op) {
    detail::NcclState& s = *state_;
    return per_rank_group_("reduce_scatter_v", "ncclReduce", counts, [&](int r, std::size_t offset, std::size_t c) {
      // recvbuff is only written on the root; the others pass their own piece (unused).
      float* recv = r == rank() ? out : const_cast<float*>(in + offset);
      return ncclReduce(in + offset, recv, c, ncclFloat32, to_nccl(op), r, s.comm, s.stream);
    });
  }

  /// Allgather with unequal blocks: `out` (the counts' sum) <- every rank's `in` (counts[rank]
  /// elements) in rank order, as one ncclBroadcast per non-empty piece (root: its rank, into its
  /// place in `out`) inside one ncclGroupStart / ncclGroupEnd (NCCL has no allgatherv). `in`
  /// may be this rank's piece of `out`. NCCL-only (tessera::cuda::NcclDeviceComm::all_gather_v
  /// calls it). Collective: the same counts on every rank (NCCL does not check; a mismatch hangs
  /// until the timeout). Throws Error when counts has not size() entries, CommError when NCCL fails.
  Request all_gather_v(const float* in, float* out, std::span<const std::int64_t> counts) {
    detail::NcclState& s = *state_;
    return per_rank_group_("all_gather_v", "ncclBroadcast", counts, [&](int r, std::size_t offset, std::size_t c) {
      const float* send = r == rank() ? in : out + offset;  // sendbuff is only read on the root
      return ncclBroadcast(send, out + offset, c, ncclFloat32, r, s.comm, s.stream);
    });
  }

  /// ncclBroadcast in place from `root`. Collective; blocks until complete.
  void broadcast(void* data, std::size_t count, DType t, int root) override {
    detail::NcclState& s = *state_;
    run_("broadcast", "ncclBroadcast", count, false, [&] {
      return ncclBroadcast(data, data, count, to_nccl(t), root, s.comm, s.stream);
    });
  }

  /// ncclSend to `peer`. The tag is ignored (NCCL matches messages between two ranks in order).
  Request send(const void* data, std::size_t count, DType t, int peer, int /*tag*/,
               bool async) override {
    detail::NcclState& s = *state_;
    return run_("send", "ncclSend", count, async, [&] {
      return ncclSend(data, count, to_nccl(t), peer, s.comm, s.stream);
    });
  }

  /// ncclRecv from `peer`. The tag is ignored (NCCL matches messages between two ranks in order).
  Request recv(void* data, std::size_t count, DType t, int peer, int /*tag*/, bool async) override {
    detail::NcclState& s = *state_;
    return run_("recv", "ncclRecv", count, async, [&] {
      return ncclRecv(data, count, to_nccl(t), peer, s.comm, s.stream);
    });
  }

  /// Every op of `ops` inside one ncclGroupStart / ncclGroupEnd, so the group completes
  /// whatever the order of sends and receives on the two sides. Entries of 0 elements are
  /// skipped. Returns a request for the whole group.
  Request batch_p2p(std::span<const P2POp> ops) override {
    constexpr const char* call = "batch_isend_irecv";
    detail::NcclState& s = *state_;
    s.ensure_usable(call);
    if (std::none_of(ops.begin(), ops.end(), [](const P2POp& op) { return op.count > 0; }))
      return Request{};
    const detail::DeviceGuard guard(s.device, call);
    detail::check_nccl(ncclGroupStart(), "ncclGroupStart", call, " on ", s.where());
    ncclResult_t first_error = ncclSuccess;
    const char* failed_call = "";
    for (const P2POp& op : ops) {
      if (op.count == 0) continue;
      const bool is_send = op.kind == P2POp::Kind::send;
      const ncclResult_t r =
          is_send ? ncclSend(op.data, op.count, to_nccl(op.dtype), op.peer, s.comm, s.stream)
                  : ncclRecv(op.data, op.count, to_nccl(op.dtype), op.peer, s.comm, s.stream);
      if (detail::is_error(r) && first_error == ncclSuccess) {
        first_error = r;
        failed_call = is_send ? "ncclSend" : "ncclRecv";
      }
    }
    // Always close the group: after an error NCCL discards it instead of launching it.
    const ncclResult_t end = ncclGroupEnd();
    detail::check_nccl(first_error, failed_call, call, " on ", s.where());
    s.finish_enqueue(call, "ncclGroupEnd", end);
    return Request(std::make_shared<detail::NcclRequest>(state_, call));
  }

  /// A 1-element ncclAllReduce: returns once every rank has called barrier() and the GPU work
  /// issued before it on this communicator's stream has completed. Collective.
  void barrier() override {
    detail::NcclState& s = *state_;
    run_("barrier", "ncclAllReduce", 1, false, [&] {
      return ncclAllReduce(s.scratch, s.scratch, 1, ncclFloat32, ncclSum, s.comm, s.stream);
    });
  }

  /// ncclCommSplit: ranks with the same `color` form a new communicator, ordered by `key` and
  /// then by rank here; it is named "<name>/split(color=c)" and inherits the timeout.
  /// Collective. Throws TimeoutError (and aborts) if the split does not finish in time.
  std::shared_ptr<CommBackend> split(int color, int key) override {
    constexpr const char* call = "split";
    detail::NcclState& s = *state_;
    s.ensure_usable(call);
    const detail::DeviceGuard guard(s.device, call);
    ncclConfig_t config = detail::nonblocking_config();
    ncclComm_t child = nullptr;
    const ncclResult_t r = ncclCommSplit(s.comm, color, key, &child, &config);
    if (detail::is_error(r) && child != nullptr) static_cast<void>(ncclCommAbort(child));
    detail::check_nccl(r, "ncclCommSplit", call, " on ", s.where());
    detail::Backoff backoff;
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const ncclResult_t parent_state = detail::async_state(s.comm);
      const ncclResult_t child_state = child != nullptr ? detail::async_state(child) : ncclSuccess;
      if (detail::is_error(child_state) || detail::is_error(parent_state) ||
          std::chrono::steady_clock::now() - start > s.timeout) {
        if (child != nullptr) static_cast<void>(ncclCommAbort(child));
        if (detail::is_error(parent_state)) s.fail_async(call, parent_state);
        if (detail::is_error(child_state)) {
          detail::check_nccl(child_state, "ncclCommSplit (asynchronous)", call, " on ", s.where());
        }
        s.fail_timeout(call, "ncclCommSplit", ncclInProgress);
      }
      if (parent_state == ncclSuccess && child_state == ncclSuccess) break;
      backoff.pause();
    }
    TESSERA_EXPECTS(child != nullptr, call, " on ", s.where(), ": ncclCommSplit returned no communicator for color ", color);
    return std::make_shared<NcclCommunicator>(child, s.device,
                                              detail::str(s.name, "/split(color=", color, ")"),
                                              s.timeout);
  }

 private:
  // Issues one NCCL call on the stream (skipped when count is 0 on every rank, which a
  // collective's matching counts guarantee), then returns its request, or waits for it first
  // when `async` is false.
  template <class Enqueue>
  Request run_(const char* call, const char* nccl_call, std::size_t count, bool async,
               Enqueue&& enqueue) {
    detail::NcclState& s = *state_;
    s.ensure_usable(call);
    if (count == 0) return Request{};
    const detail::DeviceGuard guard(s.device, call);
    s.finish_enqueue(call, nccl_call, enqueue());
    auto request = std::make_shared<detail::NcclRequest>(state_, call);
    if (async) return Request(std::move(request));
    request->wait();
    return Request{};
  }

  // One rooted NCCL call per rank with a non-empty piece (enqueue(root, offset, count), the
  // pieces of `counts` laid out in rank order) inside one ncclGroupStart / ncclGroupEnd, closed
  // even after an error (NCCL then discards the group); the request of the whole group.
  template <class Enqueue>
  Request per_rank_group_(const char* call, const char* nccl_call, std::span<const std::int64_t> counts,
                          Enqueue&& enqueue) {
    detail::NcclState& s = *state_;
    s.ensure_usable(call);
    TESSERA_EXPECTS(counts.size() == static_cast<std::size_t>(size()), "NcclCommunicator::", call, " on ", s.where(),
                    ": ", counts.size(), " counts for ", size(), " ranks");
    if (std::none_of(counts.begin(), counts.end(), [](std::int64_t c) { return c > 0; })) return Request{};
    const detail::DeviceGuard guard(s.device, call);
    detail::check_nccl(ncclGroupStart(), "ncclGroupStart", call, " on ", s.where());
    ncclResult_t first_error = ncclSuccess;
    std::size_t offset = 0;
    for (int r = 0; r < size(); ++r) {
      const auto c = static_cast<std::size_t>(counts[static_cast<std::size_t>(r)]);
      if (c > 0) {
        const ncclResult_t e = enqueue(r, offset, c);
        if (detail::is_error(e) && first_error == ncclSuccess) first_error = e;
      }
      offset += c;
    }
    const ncclResult_t end = ncclGroupEnd();
    detail::check_nccl(first_error, nccl_call, call, " on ", s.where());
    s.finish_enqueue(call, "ncclGroupEnd", end);
    return Request(std::make_shared<detail::NcclRequest>(state_, call));
  }

  std::shared_ptr<detail::NcclState> state_;
};

/// A new ncclUniqueId (ncclGetUniqueId) for make_communicator(id, ...). Throws CommError.
inline ncclUniqueId make_unique_id() {
  ncclUniqueId id{};
  detail::check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", "make_unique_id");
  return id;
}

/// Rank `rank` of an NCCL communicator of `size` ranks on CUDA device `device`, from an id made
/// by make_unique_id() on one rank and given to every rank by the caller's own means (e.g.
/// shared memory between threads). Makes `device` current on the calling thread.
/// Collective over the `size` callers: each calls it once with the same id and size and its own
/// rank and device (one device per rank: NCCL does not support two ranks on one device).
/// Throws Error for a bad rank, size or device; CommError / TimeoutError (after
/// options.timeout, or default_timeout()) when NCCL fails.
inline Comm make_communicator(const ncclUniqueId& id, int rank, int size, int device,
                              NcclOptions options = {}) {
  TESSERA_EXPECTS(size >= 1 && rank >= 0 && rank < size, "make_communicator ", options.name,
                  ": rank ", rank, " is not in [0, ", size, ")");
  const auto timeout = options.timeout.count() > 0 ? options.timeout : default_timeout();
  ncclComm_t comm = detail::init_rank(id, rank, size, device, options.name, timeout);
  return Comm(std::make_shared<NcclCommunicator>(comm, device, std::move(options.name), timeout));
}

/// A communicator of one rank on CUDA device `device` (for single-GPU programs and tests).
/// Makes `device` current. Throws as make_communicator(id, ...) does.
inline Comm make_communicator(int device, NcclOptions options = {}) {
  return make_communicator(make_unique_id(), 0, 1, device, std::move(options));
}

/// An NCCL communicator over the same ranks as `bootstrap` (a threads or MPI communicator),
/// rank r of it on CUDA device `device`. Rank 0 of `bootstrap` makes the ncclUniqueId and
/// broadcasts its bytes through `bootstrap` as int64 values; then every rank makes `device`
/// current and calls ncclCommInitRankConfig (non-blocking).
///
/// Collective over `bootstrap`: every rank calls it, each with its own device (one device per
/// rank). Before NCCL starts, every rank's device index and cudaSetDevice are checked and the
/// results exchanged, so a bad device on any rank makes every rank throw CommError naming
/// that rank, device and CUDA error (no rank is left waiting). NCCL failures throw CommError /
/// TimeoutError after options.timeout (0: bootstrap.timeout()).
inline Comm make_communicator(Comm& bootstrap, int device, NcclOptions options = {}) {
  const int rank = bootstrap.rank();
  const int size = bootstrap.size();
  // 1. Local checks. status: {kind, code, devices seen}; kind 0 ok, 1 device out of range,
  //    2 cudaSetDevice failed (code = cudaError_t), 3 ncclGetUniqueId failed (code = ncclResult_t).
  const int devices = device_count();
  std::vector<std::int64_t> status{0, 0, devices};
  if (device < 0 || device >= devices) {
    status[0] = 1;
    status[1] = device;
  } else if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    status[0] = 2;
    status[1] = e;
  }
  // 2. Rank 0 makes the id.
  constexpr std::size_t id_words = (sizeof(ncclUniqueId) + sizeof(std::int64_t) - 1) / sizeof(std::int64_t);
  std::vector<std::int64_t> id_words_buf(id_words, 0);
  if (rank == 0 && status[0] == 0) {
    ncclUniqueId id{};
    if (const ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
      status[0] = 3;
      status[1] = r;
    } else {
      std::memcpy(id_words_buf.data(), &id, sizeof(id));
    }
  }
  // 3. Every rank learns every rank's status, so all throw together.
  std::vector<std::int64_t> all_status(status.size() * static_cast<std::size_t>(size));
  bootstrap.all_gather(status, all_status);
  std::string failures;
  for (int r = 0; r < size; ++r) {
    const std::int64_t* st = all_status.data() + 3 * static_cast<std::size_t>(r);
    if (st[0] == 0) continue;
    failures += detail::str(failures.empty() ? "" : "; ", "rank ", r, ": ");
    if (st[0] == 1) {
      failures += detail::str("cuda device ", st[1], " is out of range (that process sees ", st[2],
                              " CUDA device(s)", st[2] == 0 && r == rank ? ", " + no_device_reason() : std::string(), ")");
    } else if (st[0] == 2) {
      failures += "cudaSetDevice failed: " + cuda_error_text(static_cast<cudaError_t>(st[1]));
    } else {
      failures += "ncclGetUniqueId failed: " + nccl_error_text(static_cast<ncclResult_t>(st[1]));
    }
  }
  if (!failures.empty()) {
    throw CommError(detail::str("make_communicator ", options.name, " over ", bootstrap.name(),
                                " (rank ", rank, " of ", size, "): ", failures),
                    static_cast<int>(status[0] >= 2 ? status[1] : 0));
  }
  // 4. The id travels as int64 words.
  bootstrap.broadcast(id_words_buf, 0);
  ncclUniqueId id{};
  std::memcpy(&id, id_words_buf.data(), sizeof(id));
  if (options.timeout.count() <= 0) options.timeout = bootstrap.timeout();
  return make_communicator(id, rank, size, device, std::move(options));
}

/// The NcclCommunicator behind `comm`. Throws Error if `comm` is empty or of another backend.
inline NcclCommunicator& nccl_backend(const Comm& comm) {
  auto* backend = dynamic_cast<NcclCommunicator*>(&comm.backend());
  TESSERA_EXPECTS(backend != nullptr, "nccl_backend: ", comm.name(), " is not an NCCL communicator");
  return *backend;
}

/// The CUDA stream `comm`'s calls run on (see NcclCommunicator). Throws Error if `comm` is not
/// an NCCL communicator.
inline cudaStream_t stream_of(const Comm& comm) { return nccl_backend(comm).stream(); }

}  // namespace tessera::nccl
