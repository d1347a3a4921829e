#pragma once
/// @file
/// MpiCommunicator: tessera's MPI backend, a CommBackend over a boost::mpi::communicator.
///
/// Every call is issued as a non-blocking MPI operation (MPI_Iallreduce, MPI_Iallgather,
/// MPI_Ireduce_scatter_block, MPI_Ibcast, MPI_Ibarrier, MPI_Isend, MPI_Irecv) and completed by
/// polling MPI_Testall, so that a blocking call can give up after timeout() and throw
/// TimeoutError instead of hanging. Reductions use MPI's built-in operations only (MPI_SUM,
/// MPI_MAX, MPI_MIN; avg is MPI_SUM followed by a division by size()). Boost.MPI provides the
/// environment, the ownership of communicators and the name of the MPI types; the calls that
/// Boost.MPI lacks (non-blocking collectives, reduce-scatter, MPI_IN_PLACE) go to the C API
/// through the communicator's handle.
///
/// Threading: MPI is initialized with MPI_THREAD_SERIALIZED (see Environment): a process may
/// use its communicators from several threads, but one thread at a time.
///
/// Sources: MPI 3.1 standard (non-blocking collectives, sec. 5.12; MPI_IN_PLACE; error
/// handlers, sec. 8.3), Open MPI's libnbc (Hoefler, Lumsdaine, Rehm, "Implementation and
/// performance analysis of non-blocking collective operations for MPI", SC07), NCCL's group
/// semantics for batched point-to-point (ncclGroupStart/End), torch.distributed's
/// batch_isend_irecv.

#include <mpi.h>

#include <boost/mpi/communicator.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/mpi/mpi_detail.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

namespace tessera::mpi {

class MpiCommunicator;

/// The Request of a non-blocking call on the MPI backend. wait() polls the call's MPI requests
/// up to the communicator's timeout(); both wait() and test() apply what follows completion
/// (the division of ReduceOp::avg, the check of a receive's element count). Dropping it
/// before completion hands the operation to its communicator, which completes it later.
class MpiRequest final : public RequestImpl {
 public:
  /// Takes over `op`, issued on `owner`.
  MpiRequest(std::shared_ptr<MpiCommunicator> owner, std::unique_ptr<detail::PendingOp> op)
      : owner_(std::move(owner)), op_(std::move(op)) {}
  MpiRequest(const MpiRequest&) = delete;
  MpiRequest& operator=(const MpiRequest&) = delete;
  /// Hands an unfinished operation back to the communicator (never blocks).
  ~MpiRequest() override;
  /// Polls until complete. Throws TimeoutError after the communicator's timeout() (naming the
  /// call; the communicator cannot be used afterwards), CommError on an MPI error or a receive
  /// whose matching send has another count.
  void wait() override;
  /// One MPI_Testall; true once complete. Throws as wait() does for errors.
  bool test() override;

 private:
  std::shared_ptr<MpiCommunicator> owner_;
  std::unique_ptr<detail::PendingOp> op_;
};

namespace detail {
/// The watchdog of blocking MPI collectives (MpiCommunicator::set_blocking_mpi_collectives):
/// one thread per process that, when the blocking call in progress passes its deadline, prints
/// what the call was on stderr and aborts the job with MPI_Abort (a blocking MPI call cannot
/// be interrupted; NCCL's watchdog does the same). MPI_THREAD_SERIALIZED allows one MPI call
/// at a time per process, so one slot is enough. Arming and disarming are two atomic stores.
class CollectiveWatchdog {
 public:
  /// The process's watchdog (its thread starts with the first use and is never joined).
  static CollectiveWatchdog& instance() {
    static auto* w = new CollectiveWatchdog();
    return *w;
  }
  /// Builds the message of an expired call from its owner (the communicator) and call.
  using Describe = std::string (*)(const void* owner, const CallInfo& call, const char* mpi_fn);
  /// Watches the blocking call about to start (no allocation: the message is built only if
  /// the deadline passes).
  void arm(std::chrono::steady_clock::time_point deadline, Describe describe, const void* owner, const CallInfo& call,
           const char* mpi_fn) {
    {
      std::lock_guard lk(mu_);
      describe_ = describe;
      owner_ = owner;
      call_ = call;
      fn_ = mpi_fn;
    }
    deadline_.store(deadline.time_since_epoch().count(), std::memory_order_release);
  }
  /// The call returned.
  void disarm() noexcept { deadline_.store(0, std::memory_order_release); }

 private:
  CollectiveWatchdog() {
    std::thread([this] { loop(); }).detach();
  }
  void loop() {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      const auto d = deadline_.load(std::memory_order_acquire);
      if (d == 0 || std::chrono::steady_clock::now().time_since_epoch().count() < d) continue;
      std::string what;
      {
        std::lock_guard lk(mu_);
        if (deadline_.load(std::memory_order_acquire) != d) continue;  // returned meanwhile
        what = describe_ ? describe_(owner_, call_, fn_) : std::string("a blocking MPI collective");
      }
      std::fprintf(stderr, "tessera: %s; aborting the job (MPI_Abort)\n", what.c_str());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 124);
    }
  }
  std::atomic<std::chrono::steady_clock::rep> deadline_{0};
  std::mutex mu_;
  Describe describe_ = nullptr;
  const void* owner_ = nullptr;
  CallInfo call_{};
  const char* fn_ = "";
};
}  // namespace detail

/// tessera's MPI backend: a CommBackend over a boost::mpi::communicator (owned; freed with
/// MPI_Comm_free when the last handle goes). Make one with tessera::mpi::world(),
/// tessera::mpi::make_comm(), or by splitting; wrap it in a tessera::Comm.
///
/// Behaviour beyond CommBackend:
/// - Timeouts: a blocking call, or wait() on a Request, polls MPI_Testall (spinning for the
///   first 100 us, then yielding, after 1 s sleeping 100 us between polls) and throws
///   TimeoutError after timeout(). The message names the call, the communicator, this rank
///   and the time waited; MPI cannot tell which ranks did not arrive at a collective, so it
///   says so (debug mode below can; for point-to-point calls it names the peers whose
///   messages did not complete).
///   After a timeout the ranks no longer agree on the order of calls, so every later call on
///   this communicator throws CommError; the operation that timed out stays with MPI (its
///   buffer may still be written if the late ranks arrive).
/// - Debug mode (TESSERA_DEBUG_COLLECTIVES=1 in the environment, or set_debug_collectives):
///   before each collective every rank sends every other rank a signature of its call (call,
///   element type, count, op, root) on a private duplicate of the communicator; if they
///   differ, every rank throws MismatchError naming rank 0's call and the first rank whose
///   call differs. Because the signatures travel point-to-point, a timeout in debug mode names
///   the ranks that did not arrive. Every rank must use the same setting.
/// - Counts above max_message_count() (default INT_MAX, MPI's limit) are split into pieces.
/// - MPI errors are returned, not fatal (MPI_ERRORS_RETURN), and thrown as CommError whose
///   code() is the MPI error class.
class MpiCommunicator final : public CommBackend,
                              public std::enable_shared_from_this<MpiCommunicator> {
  struct Key {
    explicit Key() = default;
  };

 public:
  /// Wraps `comm` (taken over as is: duplicate it first if other code uses it) under `name`,
  /// e.g. "mpi:world". Sets MPI_ERRORS_RETURN on it. Timeout from default_timeout(); debug
  /// mode from TESSERA_DEBUG_COLLECTIVES.
  static std::shared_ptr<MpiCommunicator> create(boost::mpi::communicator comm, std::string name) {
    return std::make_shared<MpiCommunicator>(Key{}, std::move(comm), std::move(name));
  }

  /// Use create(); the key keeps construction to shared_ptrs (Requests hold their
  /// communicator).
  MpiCommunicator(Key, boost::mpi::communicator comm, std::string name)
      : comm_(std::move(comm)), name_(std::move(name)), timeout_(default_timeout()),
        debug_(debug_from_environment()), blocking_(!poll_from_environment()) {
    MPI_Comm c = comm_;
    check_(MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN), detail::CallInfo{}, "MPI_Comm_set_errhandler");
    if (debug_) make_ctrl_();
    check_(MPI_Comm_rank(c, &rank_), detail::CallInfo{}, "MPI_Comm_rank");
    check_(MPI_Comm_size(c, &size_), detail::CallInfo{}, "MPI_Comm_size");
    void* attr = nullptr;
    int flag = 0;
    if (MPI_Comm_get_attr(c, MPI_TAG_UB, &attr, &flag) == MPI_SUCCESS && flag && attr)
      tag_ub_ = *static_cast<int*>(attr);
  }

  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  /// Frees the MPI communicator, unless MPI is finalized (then there is nothing to free) or an
  /// operation on it never completed (then it is kept: MPI still refers to it).
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    reap_();
    if (!orphans_.empty()) {
      kept_alive().push_back(comm_);
      if (ctrl_) kept_alive().push_back(*ctrl_);
      for (auto& op : orphans_) static_cast<void>(op.release());
    }
  }

  /// This process's rank in the communicator.
  int rank() const override { return rank_; }
  /// Number of processes in the communicator.
  int size() const override { return size_; }
  /// Name used in errors, e.g. "mpi:world".
  std::string name() const override { return name_; }
  /// Renames the communicator (local).
  void set_name(std::string name) override { name_ = std::move(name); }
  /// How long a blocking call (or Request::wait) polls before throwing TimeoutError.
  std::chrono::milliseconds timeout() const override { return timeout_; }
  /// Sets the timeout (local to this process). Throws Error if t is not positive.
  void set_timeout(std::chrono::milliseconds t) override {
    TESSERA_EXPECTS(t.count() > 0, "set_timeout on ", name_, ": timeout must be positive, got ",
                    t.count(), " ms");
    timeout_ = t;
  }

  /// The Boost.MPI communicator (for the user's own Boost.MPI calls; do not free it).
  const boost::mpi::communicator& boost_comm() const noexcept { return comm_; }
  /// The raw MPI handle (for the user's own MPI calls; do not free it).
  MPI_Comm mpi_comm() const { return static_cast<MPI_Comm>(comm_); }

  /// Turns the signature check before every collective on or off. Every rank of the
  /// communicator must make the same choice at the same point: the check exchanges messages,
  /// and turning it on the first time duplicates the communicator (collective).
  /// Sub-communicators made by split() inherit the setting.
  void set_debug_collectives(bool on) {
    if (on && !ctrl_) make_ctrl_();
    debug_ = on;
  }
  /// Whether the signature check is on.
  bool debug_collectives() const noexcept { return debug_; }

  /// Chooses how blocking collectives (all_reduce, all_gather, reduce_scatter, broadcast,
  /// barrier) run. On (the default; TESSERA_MPI_POLL=1 turns it off): MPI's blocking call
  /// (Open MPI's tuned algorithms, the speed of raw MPI), watched by a per-process watchdog that
  /// past timeout() prints the call, the communicator and this rank, and aborts the job with
  /// MPI_Abort (a blocking MPI call cannot be interrupted, so there is no TimeoutError). Off:
  /// the non-blocking call polled until timeout(), then TimeoutError (Open MPI's libnbc
  /// algorithms: slower, up to 1.5x raw MPI at 64 KiB). Debug mode and non-blocking calls
  /// always poll. Local.
  void set_blocking_mpi_collectives(bool on) noexcept { blocking_ = on; }
  /// Whether blocking collectives call MPI's blocking functions (see the setter).
  bool blocking_mpi_collectives() const noexcept { return blocking_; }

  /// Sets the largest element count given to one MPI call (default INT_MAX, the limit of MPI's
  /// int counts); longer buffers are moved in pieces of at most `n` elements. Tests lower it to
  /// exercise the split. Every rank must use the same value. Throws Error unless
  /// 1 <= n <= INT_MAX.
  void set_max_message_count(std::size_t n) {
    TESSERA_EXPECTS(n >= 1 && n <= static_cast<std::size_t>(INT_MAX), "set_max_message_count on ",
                    name_, ": count must be in [1, ", INT_MAX, "], got ", n);
    max_count_ = n;
  }
  /// The largest element count given to one MPI call.
  std::size_t max_message_count() const noexcept { return max_count_; }

  /// In-place all-reduce with MPI_Iallreduce(MPI_IN_PLACE, ...). Collective.
  Request all_reduce(void* data, std::size_t count, DType t, ReduceOp op, bool async) override {
    const detail::CallInfo c{.kind = detail::CallKind::all_reduce, .dtype = t, .count = count,
                             .op = op, .async = async};
    auto* bytes = static_cast<std::byte*>(data);
    const std::size_t es = size_of(t);
    if (fast_(async)) {
      check_usable_(c);
      detail::for_each_piece(count, max_count_, [&](std::size_t off, int n) {
        blocking_call_(c, "MPI_Allreduce", [&] {
          return MPI_Allreduce(MPI_IN_PLACE, bytes + off * es, n, detail::mpi_type(t), detail::mpi_op(op), mpi_comm());
        });
      });
      if (op == ReduceOp::avg) detail::divide(data, count, t, size_);
      return Request{};
    }
    auto p = begin_(c, true);
    detail::for_each_piece(count, max_count_, [&](std::size_t off, int n) {
      MPI_Request r = MPI_REQUEST_NULL;
      push_(p, MPI_Iallreduce(MPI_IN_PLACE, bytes + off * es, n, detail::mpi_type(t),
                              detail::mpi_op(op), mpi_comm(), &r), r);
    });
    if (op == ReduceOp::avg) set_avg_(*p, data, count);
    return end_(std::move(p), async);
  }

  /// All-gather with MPI_Iallgather (MPI_IN_PLACE when `in` is this rank's block of `out`;
  /// any other overlap is staged through a copy). Collective.
  Request all_gather(const void* in, void* out, std::size_t count, DType t, bool async) override {
    const detail::CallInfo c{.kind = detail::CallKind::all_gather, .dtype = t, .count = count,
                             .async = async};
    const std::size_t es = size_of(t), block = count * es;
    auto* out_b = static_cast<std::byte*>(out);
    const auto* in_b = static_cast<const std::byte*>(in);
    const bool in_place = count > 0 && in_b == out_b + static_cast<std::size_t>(rank_) * block;
    const bool overlap = !in_place && overlaps_(in_b, block, out_b, block * static_cast<std::size_t>(size_));
    const MPI_Datatype dt = detail::mpi_type(t);
    if (count <= max_count_ && !overlap && fast_(async)) {
      check_usable_(c);
      const int n = static_cast<int>(count);
      blocking_call_(c, "MPI_Allgather", [&] {
        return MPI_Allgather(in_place ? MPI_IN_PLACE : in_b, n, dt, out_b, n, dt, mpi_comm());
      });
      return Request{};
    }
    auto p = begin_(c, true);
    if (overlap) in_b = stage_(*p, in_b, block);
    if (count <= max_count_) {
      MPI_Request r = MPI_REQUEST_NULL;
      const int n = static_cast<int>(count);
      push_(p, MPI_Iallgather(in_place ? MPI_IN_PLACE : in_b, n, dt, out_b, n, dt, mpi_comm(), &r), r);
    } else {
      // Piece [off, off + n) of every rank's block: a receive type of n elements whose extent
      // is one whole block, so that rank r's piece lands at r * count + off.
      detail::for_each_piece(count, max_count_, [&](std::size_t off, int n) {
        MPI_Datatype piece = MPI_DATATYPE_NULL, strided = MPI_DATATYPE_NULL;
        check_(MPI_Type_contiguous(n, dt, &piece), c, "MPI_Type_contiguous");
        check_(MPI_Type_create_resized(piece, 0, static_cast<MPI_Aint>(block), &strided), c,
               "MPI_Type_create_resized");
        check_(MPI_Type_commit(&strided), c, "MPI_Type_commit");
        MPI_Request r = MPI_REQUEST_NULL;
        const int rc = MPI_Iallgather(in_place ? MPI_IN_PLACE : in_b + off * es, n, dt,
                                      out_b + off * es, 1, strided, mpi_comm(), &r);
        // Freeing a datatype does not affect operations already using it (MPI 3.1, 4.1.9).
        MPI_Type_free(&strided);
        MPI_Type_free(&piece);
        push_(p, rc, r);
      });
    }
    return end_(std::move(p), async);
  }

  /// Reduce-scatter with MPI_Ireduce_scatter_block (counts above max_message_count(): one
  /// MPI_Ireduce per piece and destination rank). An input overlapping the output is staged
  /// through a copy. Collective.
  Request reduce_scatter(const void* in, void* out, std::size_t count, DType t, ReduceOp op,
                         bool async) override {
    const detail::CallInfo c{.kind = detail::CallKind::reduce_scatter, .dtype = t, .count = count,
                             .op = op, .async = async};
    const std::size_t es = size_of(t), block = count * es;
    auto* out_b = static_cast<std::byte*>(out);
    const auto* in_b = static_cast<const std::byte*>(in);
    const bool overlap = overlaps_(in_b, block * static_cast<std::size_t>(size_), out_b, block);
    const MPI_Datatype dt = detail::mpi_type(t);
    const MPI_Op mop = detail::mpi_op(op);
    if (count <= max_count_ && !overlap && fast_(async)) {
      check_usable_(c);
      blocking_call_(c, "MPI_Reduce_scatter_block", [&] {
        return MPI_Reduce_scatter_block(in_b, out_b, static_cast<int>(count), dt, mop, mpi_comm());
      });
      if (op == ReduceOp::avg) detail::divide(out, count, t, size_);
      return Request{};
    }
    auto p = begin_(c, true);
    if (overlap) in_b = stage_(*p, in_b, block * static_cast<std::size_t>(size_));
    if (count <= max_count_) {
      MPI_Request r = MPI_REQUEST_NULL;
      push_(p, MPI_Ireduce_scatter_block(in_b, out_b, static_cast<int>(count), dt, mop, mpi_comm(), &r), r);
    } else {
      detail::for_each_piece(count, max_count_, [&](std::size_t off, int n) {
        for (int root = 0; root < size_; ++root) {
          MPI_Request r = MPI_REQUEST_NULL;
          const std::byte* src = in_b + (static_cast<std::size_t>(root) * count + off) * es;
          push_(p, MPI_Ireduce(src, root == rank_ ? out_b + off * es : nullptr, n, dt, mop, root,
                               mpi_comm(), &r), r);
        }
      });
    }
    if (op == ReduceOp::avg) set_avg_(*p, out, count);
    return end_(std::move(p), async);
  }

  /// Broadcast with MPI_Ibcast, waited for with the timeout. Collective.
  void broadcast(void* data, std::size_t count, DType t, int root) override {
    const detail::CallInfo c{.kind = detail::CallKind::broadcast, .dtype = t, .count = count,
                             .root = root};
    auto* bytes = static_cast<std::byte*>(data);
    const std::size_t es = size_of(t);
    if (fast_(false)) {
      check_usable_(c);
      detail::for_each_piece(count, max_count_, [&](std::size_t off, int n) {
        blocking_call_(c, "MPI_Bcast", [&] { return MPI_Bcast(bytes + off * es, n, detail::mpi_type(t), root, mpi_comm()); });
      });
      return;
    }
    auto p = begin_(c, true);
    detail::for_each_piece(count, max_count_, [&](std::size_t off, int n) {
      MPI_Request r = MPI_REQUEST_NULL;
      push_(p, MPI_Ibcast(bytes + off * es, n, detail::mpi_type(t), root, mpi_comm(), &r), r);
    });
    end_(std::move(p), false);
  }

  /// Point-to-point send with MPI_Isend (standard mode). Throws Error if `tag` exceeds
  /// MPI_TAG_UB.
  Request send(const void* data, std::size_t count, DType t, int peer, int tag, bool async) override {
    const detail::CallInfo c{.kind = detail::CallKind::send, .dtype = t, .count = count,
                             .peer = peer, .tag = tag, .async = async};
    check_tag_(c);
    auto p = begin_(c, false);
    post_p2p_(p, false, const_cast<void*>(data), count, t, peer, tag);
    return end_(std::move(p), async);
  }

  /// Point-to-point receive with MPI_Irecv; on completion checks that exactly `count`
  /// elements arrived (CommError otherwise). Throws Error if `tag` exceeds MPI_TAG_UB.
  Request recv(void* data, std::size_t count, DType t, int peer, int tag, bool async) override {
    const detail::CallInfo c{.kind = detail::CallKind::recv, .dtype = t, .count = count,
                             .peer = peer, .tag = tag, .async = async};
    check_tag_(c);
    auto p = begin_(c, false);
    post_p2p_(p, true, data, count, t, peer, tag);
    return end_(std::move(p), async);
  }

  /// Posts every receive of the group (MPI_Irecv), then every send (MPI_Isend), in the order
  /// listed; the Request waits for all of them (MPI_Testall), so the group completes whatever
  /// the order in which the two sides list their entries. Point-to-point.
  Request batch_p2p(std::span<const P2POp> ops) override {
    const detail::CallInfo c{.kind = detail::CallKind::batch_p2p, .count = ops.size(), .async = true};
    for (const P2POp& op : ops) {
      detail::CallInfo one{.kind = op.kind == P2POp::Kind::send ? detail::CallKind::send
                                                                 : detail::CallKind::recv,
                           .dtype = op.dtype, .count = op.count, .peer = op.peer, .tag = op.tag};
      check_tag_(one);
    }
    auto p = begin_(c, false);
    for (const P2POp& op : ops)
      if (op.kind == P2POp::Kind::recv) post_p2p_(p, true, op.data, op.count, op.dtype, op.peer, op.tag);
    for (const P2POp& op : ops)
      if (op.kind == P2POp::Kind::send) post_p2p_(p, false, op.data, op.count, op.dtype, op.peer, op.tag);
    return end_(std::move(p), true);
  }

  /// Barrier with MPI_Ibarrier, waited for with the timeout. Collective.
  void barrier() override {
    const detail::CallInfo c{.kind = detail::CallKind::barrier};
    if (fast_(false)) {
      check_usable_(c);
      blocking_call_(c, "MPI_Barrier", [&] { return MPI_Barrier(mpi_comm()); });
      return;
    }
    auto p = begin_(c, true);
    MPI_Request r = MPI_REQUEST_NULL;
    push_(p, MPI_Ibarrier(mpi_comm(), &r), r);
    end_(std::move(p), false);
  }

  /// MPI_Comm_split, after an MPI_Ibarrier waited for with the timeout (MPI_Comm_split itself
  /// cannot time out). The new communicator is named "<name>/split(color=<color>)" and
  /// inherits the timeout, debug mode and max_message_count(). Collective.
  std::shared_ptr<CommBackend> split(int color, int key) override {
    const detail::CallInfo c{.kind = detail::CallKind::split};
    auto p = begin_(c, true);
    MPI_Request r = MPI_REQUEST_NULL;
    push_(p, MPI_Ibarrier(mpi_comm(), &r), r);
    end_(std::move(p), false);
    MPI_Comm sub = MPI_COMM_NULL;
    check_(MPI_Comm_split(mpi_comm(), color, key, &sub), c, "MPI_Comm_split");
    auto child = create(boost::mpi::communicator(sub, boost::mpi::comm_take_ownership),
                        tessera::detail::str(name_, "/split(color=", color, ")"));
    child->timeout_ = timeout_;
    child->set_debug_collectives(debug_);  // collective on the new communicator when on
    child->max_count_ = max_count_;
    child->blocking_ = blocking_;
    return child;
  }

 private:
  friend class MpiRequest;

  /// Makes the private duplicate that carries debug-mode signatures. Collective.
  void make_ctrl_() {
    ctrl_.emplace(comm_, boost::mpi::comm_duplicate);
    MPI_Comm_set_errhandler(static_cast<MPI_Comm>(*ctrl_), MPI_ERRORS_RETURN);
  }

  static bool poll_from_environment() {
    const char* s = std::getenv("TESSERA_MPI_POLL");
    return s != nullptr && *s != '\0' && std::string_view(s) != "0";
  }

  // Whether a blocking call takes MPI's blocking function under the watchdog.
  bool fast_(bool async) const noexcept { return !async && blocking_ && !debug_; }

  // Runs the blocking MPI call `fn` (returning its rc) under the watchdog; throws CommError on
  // an MPI error.
  template <class Fn>
  void blocking_call_(const detail::CallInfo& c, const char* mpi_fn, Fn&& fn) {
    auto& wd = detail::CollectiveWatchdog::instance();
    wd.arm(std::chrono::steady_clock::now() + timeout_, &describe_expired_, this, c, mpi_fn);
    const int rc = fn();
    wd.disarm();
    if (rc != MPI_SUCCESS) check_(rc, c, mpi_fn);
  }
  static std::string describe_expired_(const void* owner, const detail::CallInfo& c, const char* mpi_fn) {
    const auto* self = static_cast<const MpiCommunicator*>(owner);
    return tessera::detail::str(detail::describe(c), self->where_(), " waited past its timeout of ",
                                static_cast<double>(self->timeout_.count()) / 1000.0, " s in ", mpi_fn,
                                ": a rank did not arrive or called another collective (TESSERA_DEBUG_COLLECTIVES=1 "
                                "names the calls; TESSERA_MPI_POLL=1 makes this a TimeoutError)");
  }
  // Before every call: refuses a communicator broken by a timeout, and completes what dropped
  // or timed-out operations left (begin_, and the blocking fast path, which makes no
  // operation object).
  void check_usable_(const detail::CallInfo& c) {
    if (!broken_.empty())
      throw CommError(tessera::detail::str(detail::describe(c), where_(), ": ", name_,
                                           " cannot be used any more: ", broken_,
                                           ", so its ranks no longer agree on the order of calls"));
    if (!orphans_.empty()) reap_();
  }

  static bool debug_from_environment() { return collective_debug_from_environment() != CollectiveDebug::off; }

  /// Communicators that cannot be freed because MPI still has operations on them; never
  /// destroyed (freeing them would be an error).
  static std::vector<boost::mpi::communicator>& kept_alive() {
    static auto* kept = new std::vector<boost::mpi::communicator>();
    return *kept;
  }

  std::string where_() const {
    return tessera::detail::str(" on ", name_, " (rank ", rank_, " of ", size_, ")");
  }

  /// Throws CommError with MPI's error class if `rc` is not MPI_SUCCESS.
  void check_(int rc, const detail::CallInfo& c, const char* fn) const {
    if (rc == MPI_SUCCESS) return;
    throw CommError(tessera::detail::str(fn, " in ", detail::describe(c), where_(), ": ",
                                         detail::error_text(rc)),
                    detail::error_class(rc));
  }

  void check_tag_(const detail::CallInfo& c) const {
    TESSERA_EXPECTS(c.tag <= tag_ub_, detail::describe(c), where_(), ": tag ", c.tag,
                    " exceeds MPI_TAG_UB = ", tag_ub_);
  }

  static bool overlaps_(const std::byte* a, std::size_t an, const std::byte* b, std::size_t bn) {
    if (an == 0 || bn == 0) return false;
    const auto x = reinterpret_cast<std::uintptr_t>(a), y = reinterpret_cast<std::uintptr_t>(b);
    return x < y + bn && y < x + an;
  }

  static const std::byte* stage_(detail::PendingOp& p, const std::byte* src, std::size_t bytes) {
    p.scratch = std::make_unique<std::byte[]>(bytes);
    std::memcpy(p.scratch.get(), src, bytes);
    return p.scratch.get();
  }

  void set_avg_(detail::PendingOp& p, void* data, std::size_t count) const {
    p.avg_data = data;
    p.avg_count = count;
    p.avg_divisor = size_;
  }

  /// Starts a call: refuses a communicator broken by a timeout, completes dropped operations,
  /// and in debug mode compares the collective's signature across ranks.
  std::unique_ptr<detail::PendingOp> begin_(const detail::CallInfo& c, bool collective) {
    check_usable_(c);
    if (collective && debug_) check_signature_(c);
    auto p = std::make_unique<detail::PendingOp>();
    p->call = c;
    return p;
  }

  /// Records a posted request, or (rc != MPI_SUCCESS) hands what was posted so far to the
  /// communicator and throws CommError. `r` is taken by reference: it is read only after the
  /// MPI call in the argument list has filled it in.
  void push_(std::unique_ptr<detail::PendingOp>& p, int rc, const MPI_Request& r) {
    if (rc != MPI_SUCCESS) {
      const detail::CallInfo c = p->call;
      p->avg_data = nullptr;
      adopt_(std::move(p));
      check_(rc, c, "posting");
    }
    p->requests.push_back(r);
  }

  /// Posts one send or receive (in pieces of at most max_message_count() elements), recording
  /// peer, tag and count of each piece for the completion check and for error messages.
  void post_p2p_(std::unique_ptr<detail::PendingOp>& p, bool is_recv, void* data, std::size_t count,
                 DType t, int peer, int tag) {
    auto* bytes = static_cast<std::byte*>(data);
    const std::size_t es = size_of(t);
    detail::for_each_piece(count, max_count_, [&](std::size_t off, int n) {
      MPI_Request r = MPI_REQUEST_NULL;
      push_(p, is_recv ? MPI_Irecv(bytes + off * es, n, detail::mpi_type(t), peer, tag, mpi_comm(), &r)
                       : MPI_Isend(bytes + off * es, n, detail::mpi_type(t), peer, tag, mpi_comm(), &r),
            r);
      p->p2p.push_back(detail::P2PEntry{is_recv, peer, tag, n, t});
    });
  }

  /// Ends a call: waits for it (blocking form) or wraps it in a Request.
  Request end_(std::unique_ptr<detail::PendingOp> p, bool async) {
    p->statuses.resize(p->requests.size());
    if (!async) {
      wait_op_(p);
      return Request{};
    }
    return Request(std::make_shared<MpiRequest>(shared_from_this(), std::move(p)));
  }

  /// One MPI_Testall; on completion checks receive counts and applies avg. Throws CommError
  /// on an MPI error (the operation is then handed to the communicator).
  bool test_op_(std::unique_ptr<detail::PendingOp>& p) {
    if (p->done) return true;
    int flag = 0;
    const int rc = MPI_Testall(static_cast<int>(p->requests.size()), p->requests.data(), &flag,
                               p->statuses.data());
    if (rc != MPI_SUCCESS) fail_(p, rc);
    if (!flag) return false;
    p->done = true;
    finish_(*p);
    return true;
  }

  /// Polls until complete or past timeout() (then TimeoutError). MPI moves data only inside
  /// MPI calls (a long transfer needs many MPI_Testall calls), so the loop keeps polling: it
  /// spins for 100 us, then yields the core between polls (as Open MPI's own blocking calls do
  /// when oversubscribed), and only after 1 s of waiting, when a peer is late rather than a
  /// transfer in progress, sleeps 100 us between polls.
  void wait_op_(std::unique_ptr<detail::PendingOp>& p) {
    using clock = std::chrono::steady_clock;
    using std::chrono::microseconds;
    const auto start = clock::now();
    while (!test_op_(p)) {
      const auto waited = clock::now() - start;
      if (waited >= timeout_) timeout_error_(p, waited);
      if (waited < microseconds(100)) continue;
      if (waited < std::chrono::seconds(1)) std::this_thread::yield();
      else std::this_thread::sleep_for(microseconds(100));
    }
  }

  /// What follows completion: receive counts (CommError if another count arrived), avg.
  void finish_(const detail::PendingOp& p) const {
    for (std::size_t i = 0; i < p.p2p.size(); ++i) {
      const detail::P2PEntry& e = p.p2p[i];
      if (!e.is_recv) continue;
      int got = 0;
      MPI_Get_count(&p.statuses[i], detail::mpi_type(e.dtype), &got);
      if (got != e.count)
        throw CommError(tessera::detail::str(
                            detail::describe(p.call), where_(), ": received ",
                            got == MPI_UNDEFINED ? std::string("a partial element")
                                                 : tessera::detail::str(got, " elements"),
                            " from rank ", e.peer, " (tag ", e.tag, ") but expected ", e.count,
                            ": the matching send has another count or element type"),
                        MPI_ERR_COUNT);
    }
    if (p.avg_data != nullptr) detail::divide(p.avg_data, p.avg_count, p.call.dtype, p.avg_divisor);
  }

  /// Throws the CommError of a failed MPI_Testall; what is still pending goes to the
  /// communicator.
  [[noreturn]] void fail_(std::unique_ptr<detail::PendingOp>& p, int rc) {
    int code = rc;
    std::string peer;
    if (rc == MPI_ERR_IN_STATUS) {
      for (std::size_t i = 0; i < p->statuses.size(); ++i) {
        const int e = p->statuses[i].MPI_ERROR;
        if (e == MPI_SUCCESS || e == MPI_ERR_PENDING) continue;
        code = e;
        if (i < p->p2p.size())
          peer = tessera::detail::str(" (", p->p2p[i].is_recv ? "receive from" : "send to", " rank ",
                                      p->p2p[i].peer, ", tag ", p->p2p[i].tag, ")");
        break;
      }
    }
    const detail::CallInfo c = p->call;
    p->avg_data = nullptr;
    p->done = true;
    adopt_(std::move(p));
    throw CommError(tessera::detail::str(detail::describe(c), where_(), peer, ": ",
                                         detail::error_text(code),
                                         detail::error_class(code) == MPI_ERR_TRUNCATE
                                             ? ": the matching send has more elements or a larger element type"
                                             : ""),
                    detail::error_class(code));
  }

  [[noreturn]] void timeout_error_(std::unique_ptr<detail::PendingOp>& p, std::chrono::nanoseconds waited) {
    using tessera::detail::str;
    // MPI_Testall completes all requests or none; MPI_Testsome releases the completed ones
    // (MPI_REQUEST_NULL afterwards), so that the rest name what did not arrive.
    {
      std::vector<int> done(p->requests.size());
      int outcount = 0;
      MPI_Testsome(static_cast<int>(p->requests.size()), p->requests.data(), &outcount, done.data(),
                   p->statuses.data());
    }
    std::string who;
    if (p->signature_exchange) {
      std::string late;
      for (std::size_t i = 0; i < p->p2p.size(); ++i)
        if (p->p2p[i].is_recv && p->requests[i] != MPI_REQUEST_NULL)
          late += str(late.empty() ? "" : ", ", p->p2p[i].peer);
      who = late.empty() ? std::string("every rank arrived, but not every rank took this rank's call signature")
                         : str("rank(s) ", late, " did not arrive at this collective (seen by the debug-mode "
                               "signature exchange)");
    } else if (p->p2p.empty()) {
      who = str("MPI cannot tell which ranks did not arrive; every rank of ", name_,
                " must make the same collective calls in the same order (set "
                "TESSERA_DEBUG_COLLECTIVES=1 to compare the calls and name the ranks that do not arrive)");
    } else {
      for (std::size_t i = 0; i < p->p2p.size(); ++i) {
        if (p->requests[i] == MPI_REQUEST_NULL) continue;
        const detail::P2PEntry& e = p->p2p[i];
        who += str(who.empty() ? "" : ", ", e.is_recv ? "the receive from rank " : "the send to rank ",
                   e.peer, " (tag ", e.tag, ")");
      }
      who += " did not complete: the peer did not post the matching call";
    }
    const std::string call = detail::describe(p->call);
    broken_ = str(call, " timed out on this rank");
    adopt_(std::move(p));
    throw TimeoutError(str(call, where_(), " timed out after ", detail::seconds_text(waited),
                           " (timeout ", detail::seconds_text(timeout_), "): ", who, ". ", name_,
                           " cannot be used after this error."));
  }

  /// Keeps an unfinished operation until MPI completes it (reap_).
  void adopt_(std::unique_ptr<detail::PendingOp> p) noexcept {
    if (p) orphans_.push_back(std::move(p));
  }

  /// Completes what has finished among dropped and timed-out operations (never throws).
  void reap_() noexcept {
    for (std::size_t i = 0; i < orphans_.size();) {
      detail::PendingOp& p = *orphans_[i];
      int flag = 0;
      p.statuses.resize(p.requests.size());
      const int rc = MPI_Testall(static_cast<int>(p.requests.size()), p.requests.data(), &flag,
                                 p.statuses.data());
      if (rc == MPI_SUCCESS && !flag) {
        ++i;
        continue;
      }
      if (rc == MPI_SUCCESS && !p.done && p.avg_data != nullptr)
        detail::divide(p.avg_data, p.avg_count, p.call.dtype, p.avg_divisor);
      orphans_.erase(orphans_.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }

  /// Debug mode: sends the signature of `c` to every other rank and receives theirs (on the
  /// private duplicate ctrl_, so the messages never meet the user's), then throws
  /// MismatchError on every rank if any rank's call differs from rank 0's. The buffers live in
  /// the operation, since after a timeout MPI may still write them.
  void check_signature_(const detail::CallInfo& c) {
    constexpr int w = detail::signature_words;
    const std::vector<std::int64_t> mine = detail::signature(c);
    auto p = std::make_unique<detail::PendingOp>();
    p->call = c;
    p->signature_exchange = true;
    const std::size_t words = static_cast<std::size_t>(size_ + 1) * w;  // all ranks', then mine
    p->scratch = std::make_unique<std::byte[]>(words * sizeof(std::int64_t));
    auto* all = reinterpret_cast<std::int64_t*>(p->scratch.get());
    std::int64_t* own = all + static_cast<std::size_t>(size_) * w;
    std::copy(mine.begin(), mine.end(), own);
    std::copy(mine.begin(), mine.end(), all + static_cast<std::size_t>(rank_) * w);
    const MPI_Comm ctrl = *ctrl_;
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      MPI_Request r = MPI_REQUEST_NULL;
      push_(p, MPI_Irecv(all + static_cast<std::size_t>(q) * w, w, MPI_INT64_T, q, 0, ctrl, &r), r);
      p->p2p.push_back(detail::P2PEntry{true, q, 0, w, DType::i64});
    }
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      MPI_Request r = MPI_REQUEST_NULL;
      push_(p, MPI_Isend(own, w, MPI_INT64_T, q, 0, ctrl, &r), r);
      p->p2p.push_back(detail::P2PEntry{false, q, 0, w, DType::i64});
    }
    p->statuses.resize(p->requests.size());
    wait_op_(p);
    for (int q = 1; q < size_; ++q) {
      const std::int64_t* theirs = all + static_cast<std::size_t>(q) * w;
      if (!detail::signatures_match(all, theirs))
        throw MismatchError(tessera::detail::str(
            "collective mismatch on ", name_, ": rank 0 called ", detail::describe(detail::from_signature(all)),
            " but rank ", q, " called ", detail::describe(detail::from_signature(theirs))));
    }
  }

  boost::mpi::communicator comm_;
  std::optional<boost::mpi::communicator> ctrl_;  // private duplicate for debug-mode signatures
  std::string name_;
  std::chrono::milliseconds timeout_;
  bool debug_ = false;
  bool blocking_ = true;  // blocking collectives call MPI's blocking functions (watchdog)
  std::size_t max_count_ = static_cast<std::size_t>(INT_MAX);
  int rank_ = 0;
  int size_ = 1;
  int tag_ub_ = 32767;                                       // MPI guarantees at least this
  std::string broken_;                                       // why calls are refused (after a timeout)
  std::vector<std::unique_ptr<detail::PendingOp>> orphans_;  // dropped or timed-out operations
};

inline MpiRequest::~MpiRequest() {
  if (op_ && !op_->done) owner_->adopt_(std::move(op_));
}

inline void MpiRequest::wait() {
  if (op_) owner_->wait_op_(op_);
}

inline bool MpiRequest::test() {
  if (!op_) return true;
  return owner_->test_op_(op_);
}

}  // namespace tessera::mpi
