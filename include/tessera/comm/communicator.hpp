#pragma once
/// @file
/// The Communicator concept, the backend interface (CommBackend) and the type-erased handle
/// `Comm` that every policy, the Mesh and the examples use. Switching backends changes only
/// how the world `Comm` is made.
///
/// Semantics follow NCCL and MPI: every collective is *collective* over the communicator, i.e.
/// every rank calls it, in the same order, with the same element type, count, op and root.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <ranges>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "tessera/comm/request.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

namespace tessera {

/// One send or receive of a batched point-to-point group (see Comm::batch_isend_irecv).
/// Built with P2POp::send / P2POp::recv. The buffer is not owned.
struct P2POp {
  /// Whether this entry sends or receives.
  enum class Kind { send, recv };
  Kind kind;            ///< send or recv
  void* data;           ///< buffer (const for a send; cast away only to share the struct)
  std::size_t count;    ///< number of elements
  DType dtype;          ///< element type
  int peer;             ///< rank in the communicator to send to / receive from
  int tag;              ///< message tag (>= 0); matched together with the peer

  /// A send of `buf` to `peer`.
  template <CommScalar T>
  static P2POp send(std::span<const T> buf, int peer, int tag = 0) {
    return {Kind::send, const_cast<T*>(buf.data()), buf.size(), dtype_of<T>, peer, tag};
  }
  /// A receive into `buf` from `peer`.
  template <CommScalar T>
  static P2POp recv(std::span<T> buf, int peer, int tag = 0) {
    return {Kind::recv, buf.data(), buf.size(), dtype_of<T>, peer, tag};
  }
};

/// The interface a backend implements: untyped buffers (pointer, count, dtype). Users call the
/// typed front `Comm`; implement this to add a backend. All checks of spans, peers and roots are
/// done by `Comm` before these are called, so a backend may assume valid arguments.
///
/// Every method except rank/size/name/timeout is collective or point-to-point as documented on
/// the matching `Comm` method. Methods taking `async` return a Request that is complete when
/// `async` is false.
class CommBackend {
 public:
  virtual ~CommBackend() = default;
  /// This process's (thread's) rank in [0, size()).
  virtual int rank() const = 0;
  /// Number of ranks.
  virtual int size() const = 0;
  /// Human-readable name, e.g. "threads:world" or "mpi:tp[pp=0,dp=1]", used in errors.
  virtual std::string name() const = 0;
  /// Sets the name used in errors (the Mesh names its axes).
  virtual void set_name(std::string name) = 0;
  /// How long a call waits for its peers before throwing TimeoutError.
  virtual std::chrono::milliseconds timeout() const = 0;
  /// Sets the timeout (local to this rank's handle).
  virtual void set_timeout(std::chrono::milliseconds t) = 0;

  /// In-place all-reduce of `count` elements.
  virtual Request all_reduce(void* data, std::size_t count, DType t, ReduceOp op, bool async) = 0;
  /// `in`: count elements; `out`: count * size() elements, rank r's block at offset r * count.
  virtual Request all_gather(const void* in, void* out, std::size_t count, DType t, bool async) = 0;
  /// `in`: count * size() elements; `out`: count elements = reduction of block rank() of all ins.
  virtual Request reduce_scatter(const void* in, void* out, std::size_t count, DType t, ReduceOp op,
                                 bool async) = 0;
  /// Copies root's `count` elements to every rank.
  virtual void broadcast(void* data, std::size_t count, DType t, int root) = 0;
  /// Point-to-point send.
  virtual Request send(const void* data, std::size_t count, DType t, int peer, int tag, bool async) = 0;
  /// Point-to-point receive (exact count).
  virtual Request recv(void* data, std::size_t count, DType t, int peer, int tag, bool async) = 0;
  /// Issues every op of the group together; completes whatever their order (NCCL group semantics).
  virtual Request batch_p2p(std::span<const P2POp> ops) = 0;
  /// Blocks until every rank has called barrier().
  virtual void barrier() = 0;
  /// Collective: ranks with equal `color` form a new communicator, ordered by (key, old rank).
  virtual std::shared_ptr<CommBackend> split(int color, int key) = 0;
};

namespace detail {
/// Whether Comm records the call site of each collective for a CollectiveChecker
/// (comm/collective_checker.hpp): false until the first checker is made in this process, and
/// then the only cost of a collective with the mode off is this one relaxed load.
inline std::atomic<bool> call_sites_wanted{false};
/// The call site of the collective this thread is issuing through Comm, read (and cleared) by
/// the CollectiveChecker underneath. Set only while call_sites_wanted.
inline thread_local SourceLocation pending_call_site{};
/// Records `loc` for a CollectiveChecker when one exists.
inline void note_call_site(const SourceLocation& loc) noexcept {
  if (call_sites_wanted.load(std::memory_order_relaxed)) [[unlikely]]
    pending_call_site = loc;
}

/// A contiguous range of CommScalar elements: std::vector<float>, std::span<double>, ...
template <class R>
concept CommRange = std::ranges::contiguous_range<R> && std::ranges::sized_range<R> &&
                    CommScalar<std::remove_cv_t<std::ranges::range_value_t<R>>>;
template <class R>
using range_elem_t = std::remove_cv_t<std::ranges::range_value_t<R>>;
}  // namespace detail

/// Type-erased, cheaply copyable handle to a communicator of any backend (threads, MPI, NCCL,
/// or an instrumented wrapper). Copies share the same underlying communicator.
///
/// Buffers are any contiguous range of float, double, int32_t or int64_t (std::vector, std::span,
/// a Tensor's span). For NCCL the buffers are device memory.
///
/// Every method named as collective must be called by every rank of the communicator in the
/// same order with the same element type, count, op and root; on the threads backend a mismatch
/// throws MismatchError on every rank naming both calls (on MPI with TESSERA_DEBUG_COLLECTIVES=1);
/// waiting past timeout() throws TimeoutError naming the ranks that did not arrive where the
/// backend can know them (threads always; MPI in debug mode); a rank that threw makes the others
/// throw AbortedError (threads) or aborts the job (mpi::run). After a timeout on MPI or NCCL the
/// communicator is unusable (the ranks no longer agree on the order of calls).
class Comm {
 public:
  /// An empty handle (valid() is false); every call on it throws Error.
  Comm() = default;
  /// Wraps a backend.
  explicit Comm(std::shared_ptr<CommBackend> impl) : impl_(std::move(impl)) {}

  /// True when the handle refers to a communicator.
  bool valid() const noexcept { return impl_ != nullptr; }
  /// This rank's index in [0, size()).
  int rank() const { return impl().rank(); }
  /// Number of ranks in the communicator.
  int size() const { return impl().size(); }
  /// Name used in errors.
  std::string name() const { return impl().name(); }
  /// Renames the communicator (local; used by Mesh to name its axes).
  void set_name(std::string n) { impl().set_name(std::move(n)); }
  /// Current timeout of blocking waits.
  std::chrono::milliseconds timeout() const { return impl().timeout(); }
  /// Sets the timeout of blocking waits on this rank's handle (default 60 s or TESSERA_TIMEOUT
  /// seconds from the environment).
  void set_timeout(std::chrono::milliseconds t) { impl().set_timeout(t); }

  /// In-place all-reduce: afterwards every rank holds op over all ranks' `data`, reduced in a
  /// fixed rank order on the threads backend (bitwise reproducible).
  /// Collective over this communicator: every rank calls it with the same count and op.
  /// `loc` (the caller's) names the call site in CollectiveChecker's reports.
  template <detail::CommRange R>
  void all_reduce(R&& data, ReduceOp op = ReduceOp::sum, SourceLocation loc = SourceLocation::current()) {
    detail::note_call_site(loc);
    iall_reduce_(std::forward<R>(data), op, false).wait();
  }
  /// Non-blocking all_reduce; the buffer must not be touched until the Request completes.
  /// Collective, issued in the same order as every other collective on this communicator.
  template <detail::CommRange R>
  [[nodiscard]] Request iall_reduce(R&& data, ReduceOp op = ReduceOp::sum,
                                    SourceLocation loc = SourceLocation::current()) {
    detail::note_call_site(loc);
    return iall_reduce_(std::forward<R>(data), op, true);
  }

  /// All-gather: `out` (size() * in.size() elements) receives every rank's `in`, rank r's at
  /// offset r * in.size(). Throws Error if out.size() != size() * in.size().
  /// Collective: every rank calls it with the same in.size().
  template <detail::CommRange In, detail::CommRange Out>
  void all_gather(const In& in, Out&& out, SourceLocation loc = SourceLocation::current()) {
    detail::note_call_site(loc);
    iall_gather_(in, out, false).wait();
  }
  /// Non-blocking all_gather (see all_gather). Collective.
  template <detail::CommRange In, detail::CommRange Out>
  [[nodiscard]] Request iall_gather(const In& in, Out&& out, SourceLocation loc = SourceLocation::current()) {
    detail::note_call_site(loc);
    return iall_gather_(in, out, true);
  }

  /// Reduce-scatter: `in` holds size() blocks of out.size() elements; rank r receives the
  /// reduction over ranks of block r. Throws Error if in.size() != size() * out.size().
  /// Collective: every rank calls it with the same out.size() and op.
  template <detail::CommRange In, detail::CommRange Out>
  void reduce_scatter(const In& in, Out&& out, ReduceOp op = ReduceOp::sum,
                      SourceLocation loc = SourceLocation::current()) {
    detail::note_call_site(loc);
    ireduce_scatter_(in, out, op, false).wait();
  }
  /// Non-blocking reduce_scatter (see reduce_scatter). Collective.
  template <detail::CommRange In, detail::CommRange Out>
  [[nodiscard]] Request ireduce_scatter(const In& in, Out&& out, ReduceOp op = ReduceOp::sum,
                                        SourceLocation loc = SourceLocation::current()) {
    detail::note_call_site(loc);
    return ireduce_scatter_(in, out, op, true);
  }

  /// Broadcast: every rank's `data` becomes root's. Throws Error if root is not in [0, size()).
  /// Collective: every rank calls it with the same count and root.
  template <detail::CommRange R>
  void broadcast(R&& data, int root = 0, SourceLocation loc = SourceLocation::current()) {
    check_rank_(root, "broadcast", "root");
    detail::note_call_site(loc);
    using T = detail::range_elem_t<R>;
    impl().broadcast(std::ranges::data(data), std::ranges::size(data), dtype_of<T>, root);
  }

  /// Blocking send of `data` to `peer` with `tag`. Throws Error if peer is out of range or is
  /// this rank. Point-to-point: `peer` must post a matching recv (same tag, count and type).
  /// Two ranks that both send before they receive may deadlock on MPI and NCCL for large
  /// messages: use batch_isend_irecv for exchanges.
  template <detail::CommRange R>
  void send(const R& data, int peer, int tag = 0) {
    isend_(data, peer, tag, false).wait();
  }
  /// Non-blocking send (see send).
  template <detail::CommRange R>
  [[nodiscard]] Request isend(const R& data, int peer, int tag = 0) {
    return isend_(data, peer, tag, true);
  }
  /// Blocking receive of exactly data.size() elements from `peer` with `tag`. Throws Error on a
  /// bad peer; CommError if the matching send has another count or type.
  template <detail::CommRange R>
  void recv(R&& data, int peer, int tag = 0) {
    irecv_(data, peer, tag, false).wait();
  }
  /// Non-blocking receive (see recv).
  template <detail::CommRange R>
  [[nodiscard]] Request irecv(R&& data, int peer, int tag = 0) {
    return irecv_(data, peer, tag, true);
  }

  /// Issues a group of sends and receives together (NCCL ncclGroupStart/End, MPI Isend/Irecv +
  /// Waitall, a rendezvous on threads): the group completes whatever the order of its entries
  /// on the two sides. Every pipeline tick's transfers go through it. Throws Error on a bad peer.
  [[nodiscard]] Request batch_isend_irecv(std::span<const P2POp> ops) {
    for (const P2POp& op : ops) check_peer_(op.peer, op.kind == P2POp::Kind::send ? "batch send" : "batch recv");
    return impl().batch_p2p(ops);
  }
  /// Blocking form of batch_isend_irecv.
  void batch_send_recv(std::span<const P2POp> ops) { batch_isend_irecv(ops).wait(); }

  /// Blocks until every rank has entered barrier(). Collective.
  void barrier(SourceLocation loc = SourceLocation::current()) {
    detail::note_call_site(loc);
    impl().barrier();
  }

  /// Splits the communicator: ranks passing the same `color` (>= 0) form a new communicator in
  /// which they are ordered by `key`, ties broken by their rank here (MPI_Comm_split).
  /// Collective: every rank calls it. Throws Error if color < 0.
  Comm split(int color, int key, SourceLocation loc = SourceLocation::current()) const {
    TESSERA_EXPECTS(color >= 0, "split: color must be >= 0, got ", color, " on rank ", rank(),
                    " of ", name());
    detail::note_call_site(loc);
    return Comm(impl().split(color, key));
  }

  /// Helper for control decisions (CASES C10): returns op over every rank's `value`, the same
  /// value on every rank, so every rank takes the same branch. Collective.
  template <CommScalar T>
  T all_reduce_value(T value, ReduceOp op = ReduceOp::sum, SourceLocation loc = SourceLocation::current()) {
    all_reduce(std::span<T>(&value, 1), op, loc);
    return value;
  }

  /// The backend behind the handle (throws Error if the handle is empty).
  CommBackend& backend() const { return impl(); }
  /// Shared pointer to the backend (for wrappers such as the instrumented communicator).
  const std::shared_ptr<CommBackend>& backend_ptr() const noexcept { return impl_; }

 private:
  CommBackend& impl() const {
    TESSERA_EXPECTS(impl_ != nullptr, "Comm: called on an empty communicator handle");
    return *impl_;
  }
  void check_rank_(int r, const char* call, const char* what) const {
    TESSERA_EXPECTS(r >= 0 && r < size(), call, ": ", what, " ", r, " is out of range for ",
                    name(), " of size ", size(), " (rank ", rank(), ")");
  }
  void check_peer_(int peer, const char* call) const {
    check_rank_(peer, call, "peer");
    TESSERA_EXPECTS(peer != rank(), call, ": peer ", peer, " is this rank itself on ", name());
  }
  template <class R>
  Request iall_reduce_(R&& data, ReduceOp op, bool async) {
    using T = detail::range_elem_t<R>;
    static_assert(!std::is_const_v<std::remove_reference_t<std::ranges::range_reference_t<R>>>,
                  "all_reduce works in place: the buffer must not be const.");
    return impl().all_reduce(std::ranges::data(data), std::ranges::size(data), dtype_of<T>, op, async);
  }
  template <class In, class Out>
  Request iall_gather_(const In& in, Out& out, bool async) {
    using T = detail::range_elem_t<In>;
    static_assert(std::is_same_v<T, detail::range_elem_t<Out>>,
                  "all_gather: input and output must have the same element type.");
    const std::size_t n = std::ranges::size(in), m = std::ranges::size(out);
    TESSERA_EXPECTS(m == n * static_cast<std::size_t>(size()), "all_gather on ", name(),
                    ": output has ", m, " elements but input has ", n, " x ", size(),
                    " ranks = ", n * static_cast<std::size_t>(size()), " (rank ", rank(), ")");
    return impl().all_gather(std::ranges::data(in), std::ranges::data(out), n, dtype_of<T>, async);
  }
  template <class In, class Out>
  Request ireduce_scatter_(const In& in, Out& out, ReduceOp op, bool async) {
    using T = detail::range_elem_t<In>;
    static_assert(std::is_same_v<T, detail::range_elem_t<Out>>,
                  "reduce_scatter: input and output must have the same element type.");
    const std::size_t n = std::ranges::size(in), m = std::ranges::size(out);
    TESSERA_EXPECTS(n == m * static_cast<std::size_t>(size()), "reduce_scatter on ", name(),
                    ": input has ", n, " elements but output has ", m, " x ", size(),
                    " ranks = ", m * static_cast<std::size_t>(size()), " (rank ", rank(), ")");
    return impl().reduce_scatter(std::ranges::data(in), std::ranges::data(out), m, dtype_of<T>, op, async);
  }
  template <class R>
  Request isend_(const R& data, int peer, int tag, bool async) {
    using T = detail::range_elem_t<R>;
    check_peer_(peer, "send");
    TESSERA_EXPECTS(tag >= 0, "send: tag must be >= 0, got ", tag);
    return impl().send(std::ranges::data(data), std::ranges::size(data), dtype_of<T>, peer, tag, async);
  }
  template <class R>
  Request irecv_(R& data, int peer, int tag, bool async) {
    using T = detail::range_elem_t<R>;
    check_peer_(peer, "recv");
    TESSERA_EXPECTS(tag >= 0, "recv: tag must be >= 0, got ", tag);
    return impl().recv(std::ranges::data(data), std::ranges::size(data), dtype_of<T>, peer, tag, async);
  }

  std::shared_ptr<CommBackend> impl_;
};

/// What a communicator must offer to be used by tessera's policies: rank/size, the blocking and
/// non-blocking collectives, point-to-point and batched point-to-point, barrier and split.
/// `Comm` models it for every backend; a user type that models it can be used where a template
/// takes a Communicator.
template <class C>
concept Communicator = requires(C c, const C cc, std::span<float> f, std::span<const float> cf,
                                std::span<double> d, std::span<std::int64_t> i64,
                                std::span<const P2POp> ops) {
  { cc.rank() } -> std::same_as<int>;
  { cc.size() } -> std::same_as<int>;
  c.all_reduce(f, ReduceOp::sum);
  c.all_reduce(d, ReduceOp::max);
  c.all_reduce(i64, ReduceOp::min);
  c.all_gather(cf, f);
  c.reduce_scatter(cf, f, ReduceOp::sum);
  c.broadcast(f, 0);
  c.send(cf, 0, 0);
  c.recv(f, 0, 0);
  c.barrier();
  { c.iall_reduce(f, ReduceOp::sum) } -> std::same_as<Request>;
  { c.iall_gather(cf, f) } -> std::same_as<Request>;
  { c.ireduce_scatter(cf, f, ReduceOp::sum) } -> std::same_as<Request>;
  { c.isend(cf, 0, 0) } -> std::same_as<Request>;
  { c.irecv(f, 0, 0) } -> std::same_as<Request>;
  { c.batch_isend_irecv(ops) } -> std::same_as<Request>;
  { cc.split(0, 0) } -> std::same_as<C>;
};

static_assert(Communicator<Comm>, "Comm must model Communicator.");

/// What TESSERA_DEBUG_COLLECTIVES asks for (read by the backends and `threads::run` /
/// `mpi::run`).
enum class CollectiveDebug {
  off,         ///< unset, "" or "0"
  signatures,  ///< "1": the MPI backend compares each collective's signature across ranks first
  detail,      ///< "detail" (or "DETAIL"): as "1", and the world is wrapped in a CollectiveChecker
};

/// Reads TESSERA_DEBUG_COLLECTIVES. Throws Error naming the value and the accepted ones for any
/// other value, so a misspelt setting ("detial", "yes") does not leave the checks off without a
/// word. Local.
inline CollectiveDebug collective_debug_from_environment() {
  const char* s = std::getenv("TESSERA_DEBUG_COLLECTIVES");
  if (s == nullptr) return CollectiveDebug::off;
  const std::string v(s);
  if (v.empty() || v == "0") return CollectiveDebug::off;
  if (v == "1") return CollectiveDebug::signatures;
  if (v == "detail" || v == "DETAIL") return CollectiveDebug::detail;
  throw Error("TESSERA_DEBUG_COLLECTIVES='" + v +
              "' is not a setting: use 0 (off), 1 (compare signatures on MPI) or detail (every collective's "
              "sequence, signature and call site checked on every backend)");
}

/// Reads the default timeout: TESSERA_TIMEOUT (seconds, may be fractional, from 0.001 to 1e8)
/// or 60 s when it is unset or "". Throws Error naming the value for anything else ("abc",
/// "10abc", "0", "-1", "nan", "inf", "1e9"), as collective_debug_from_environment does, so a
/// misspelt setting does not leave the default in force without a word (it did before
/// session 18). Local.
inline std::chrono::milliseconds default_timeout() {
  const char* s = std::getenv("TESSERA_TIMEOUT");
  if (s == nullptr || *s == '\0') return std::chrono::seconds(60);
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  // At most 1e8 s (about 3 years): a larger count of milliseconds overflows the clock's
  // nanoseconds when a wait adds it to now(). At least 1 ms, the unit of the wait.
  if (end == s || *end != '\0' || !(v >= 0.001 && v <= 1e8))
    throw Error(std::string("TESSERA_TIMEOUT='") + s +
                "' is not a number of seconds from 0.001 to 1e8 (the collectives' timeout; unset: 60)");
  return std::chrono::milliseconds(static_cast<long long>(v * 1000.0));
}

}  // namespace tessera
