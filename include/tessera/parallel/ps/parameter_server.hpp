#pragma once
/// @file
/// ParameterServer: some ranks (the servers) each hold a shard of the parameters and run the
/// optimizer on it; the other ranks (the workers) compute gradients, push them to the servers
/// and pull the updated values back. Synchronous, or asynchronous with bounded staleness
/// (stale-synchronous parallel). Works over any `Comm` (threads, MPI) with point-to-point
/// messages only. See docs/parameter_server.md.
///
/// ```cpp
/// ParameterServer<float> ps(world, model.parameters(), {.num_servers = 1});
/// if (ps.is_server()) {
///   optim::SGD<float> opt(ps.shard_parameters(), {.lr = 0.1});
///   ps.serve(opt);                                   // until every worker has finished
/// } else {
///   for (int step = 0; step < steps; ++step) {
///     model.parameters().zero_grad();
///     /* forward + backward of a SUM loss over this worker's n samples */
///     ps.step(model, n);                             // push grads, pull the new values
///   }
///   ps.finish();
/// }
/// ```

#include <algorithm>
#include <array>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/data/compression/comm_hook.hpp"
#include "tessera/parallel/ps/parameter_server_layout.hpp"

namespace tessera {

namespace detail {
/// Keeps `buffers` alive and reachable until the process ends. A ParameterServer that gives up
/// while an exception unwinds may still have receives posted into them, and no backend can
/// cancel a posted receive, so freeing them could let a late message write into freed memory.
/// Only error paths call this (the buffers of one failed run's pending operations); the
/// registry itself is never destroyed, since a late write may come while the process exits.
/// Thread-safe. Throws std::bad_alloc.
inline void keep_until_exit(std::shared_ptr<void> buffers) {
  static std::mutex mutex;
  static auto* kept = new std::vector<std::shared_ptr<void>>();
  const std::lock_guard lock(mutex);
  kept->push_back(std::move(buffers));
}
}  // namespace detail

/// When a worker's pull may be answered.
enum class ParameterServerMode {
  /// Bulk-synchronous: a pull after a worker's t-th push returns the values after global step
  /// t, which needs every worker's t-th push (staleness 0).
  sync,
  /// Stale-synchronous parallel (Ho et al., "More Effective Distributed ML via a Stale
  /// Synchronous Parallel Parameter Server", NIPS 2013): a pull after a worker's t-th push
  /// returns values that include at least global steps 1 to t - staleness; a worker is never
  /// more than `staleness` steps ahead of the slowest. staleness 0 is exactly `sync`.
  async,
};

/// Options of ParameterServer. Every rank passes the same options (checked).
struct ParameterServerOptions {
  /// Number of server ranks S, in [1, world size - 1]: the last S ranks of the world are the
  /// servers, ranks [0, world size - S) the workers (worker w is world rank w).
  int num_servers = 1;
  /// sync or async (stale-synchronous).
  ParameterServerMode mode = ParameterServerMode::sync;
  /// async: how many steps a worker may run ahead of the slowest worker (>= 0). sync: must
  /// be 0.
  int staleness = 0;
  /// First of the four point-to-point tags the parameter server uses on the world
  /// communicator: tag (worker -> server headers), tag + 1 (pushed gradients), tag + 2 and
  /// tag + 3 (replies to pulls). Other traffic on the same communicator must avoid them.
  int tag = 32000;
};

/// Counters of one rank's parameter-server traffic (a worker's or a server's).
struct ParameterServerStats {
  /// Server: optimizer steps applied (the version of its shard). Worker: its clock, the
  /// number of pushes it has made.
  std::int64_t steps = 0;
  /// Pushes received (server, summed over workers) or sent (worker).
  std::int64_t pushes = 0;
  /// Pulls answered (server, summed over workers) or completed (worker).
  std::int64_t pulls = 0;
  /// The largest staleness seen by a pull: the pulling worker's clock minus the version
  /// (number of global steps) of the values it received; at most the staleness bound s.
  /// A worker takes the largest over the servers' replies.
  std::int64_t max_staleness = 0;
  /// Server only: the largest (pulling worker's clock - smallest clock of the workers still
  /// running) at the moment a pull was answered; at most s.
  std::int64_t max_clock_gap = 0;
  /// Worker: seconds blocked in wait(). Server: seconds serve() spent with nothing to do.
  double wait_seconds = 0;
};

/// What `ParameterServer::serve` runs on the server's shard: any type with `step()` that
/// updates the parameters it was built on from their gradients, e.g. tessera::optim::SGD or
/// tessera::optim::AdamW built on `shard_parameters()`.
template <class O>
concept ShardOptimizer = requires(O& o) { o.step(); };

/// A parameter server over the world communicator (ps-lite's KVWorker / KVServer, Li et al.,
/// "Scaling Distributed Machine Learning with the Parameter Server", OSDI 2014).
///
/// Roles: the last `num_servers` ranks are servers, the others workers; worker w is world
/// rank w, so world rank 0 (which prints, loads data, ...) is worker 0. Keys are the elements
/// of the flattened parameter list, split into contiguous ranges per server
/// (ParameterServerLayout); server s holds its range as `shard_parameters()`, one named piece
/// per parameter it intersects, and runs the user's optimizer on them.
///
/// A step: each worker computes the gradient of the SUM of its per-sample losses over its n_w
/// samples, then `push(params, n_w)` sends each server its key range of the gradients and
/// the count. For global step t a server waits for step t's push of every worker still
/// running, sums them in worker rank order (g = g_0 + g_1 + ... + g_{W-1}, left to right,
/// element by element, the first copied), multiplies by static_cast<T>(1.0 / N) with N the
/// sum of the counts (the loss normalization: the mean over the global batch, applied once,
/// here), writes that into the shard's gradients and calls the optimizer's step() once.
/// `pull(params)` then returns the shard values. On the threads backend this equals bitwise a
/// data-parallel SUM all-reduce in rank order over the workers followed by
/// `grad.scale_(static_cast<T>(1.0 / N))` and the same optimizer on every rank.
///
/// Staleness (async): each server counts each worker's pushes (its clock). A pull by a worker
/// whose clock is c is answered when the server has applied step c - s (sync: s = 0); the
/// worker is then at most s steps ahead of the slowest running worker.
///
/// Termination: a worker calls `finish()` (or its destructor does) to send "done" to every
/// server; a server returns from `serve()` once every worker is done. A worker that finished
/// early stops contributing: later steps average over the workers still pushing.
///
/// The constructor is collective over the world. T: float or double.
template <std::floating_point T>
class ParameterServer {
 public:
  /// Sets up the roles and the shards. Collective over `world`: every rank calls it with the
  /// same options and a parameter list of the same names and shapes (a worker's model; a
  /// server's copy of it, whose values are overwritten). World rank 0's values are broadcast
  /// to every rank, so all workers start equal and each server takes its key range.
  ///
  /// Throws tessera::Error, on every rank, naming the numbers: num_servers outside [1, world
  /// size - 1], a negative staleness or tag, mode sync with staleness != 0, options that
  /// differ between ranks, or parameter lists that differ (naming the first parameter that
  /// differs, both names and shapes).
  ParameterServer(Comm world, const ParameterList<T>& params, const ParameterServerOptions& options = {})
      : comm_(std::move(world)), options_(options), layout_(checked_layout(comm_, params, options)) {
    check_same_options();
    detail::ps_check_same_parameters(comm_, params, "ParameterServer");
    num_workers_ = comm_.size() - options_.num_servers;
    staleness_ = options_.mode == ParameterServerMode::sync ? 0 : options_.staleness;
    broadcast_initial_values(params);
  }

  /// A worker that has not called finish() sends "done" here, so that the servers return
  /// (errors cannot leave a destructor: call finish() to see them). Nothing is sent while an
  /// exception unwinds the stack; the buffers of receives still posted then are kept until the
  /// process exits (detail::keep_until_exit), since no backend can cancel a posted receive and
  /// a late reply would otherwise be written into freed memory.
  ~ParameterServer() {
    if (!comm_.valid()) return;
    if (is_worker() && !finished_ && std::uncaught_exceptions() == 0) {
      try {
        finish();
      } catch (...) {  // a destructor must not throw; finish() reports the same error
      }
    }
    if (!pending_.empty()) {
      try {
        detail::keep_until_exit(std::make_shared<std::deque<PendingOp>>(std::move(pending_)));
      } catch (...) {  // out of memory: nothing else can be done from a destructor
      }
    }
  }
  ParameterServer(const ParameterServer&) = delete;             ///< one per rank; not copyable
  ParameterServer& operator=(const ParameterServer&) = delete;  ///< not copyable
  ParameterServer(ParameterServer&&) noexcept = default;        ///< movable (pending operations move along)
  ParameterServer& operator=(ParameterServer&&) = delete;       ///< not assignable

  // ---- roles --------------------------------------------------------------------------------
  /// Whether this rank is a server (one of the last num_servers ranks).
  bool is_server() const { return comm_.rank() >= num_workers_; }
  /// Whether this rank is a worker.
  bool is_worker() const { return !is_server(); }
  /// Number of servers S.
  int num_servers() const noexcept { return options_.num_servers; }
  /// Number of workers W = world size - S.
  int num_workers() const noexcept { return num_workers_; }
  /// This rank's server index in [0, S), or -1 on a worker.
  int server_index() const { return is_server() ? comm_.rank() - num_workers_ : -1; }
  /// This rank's worker index in [0, W) (= its world rank), or -1 on a server.
  int worker_index() const { return is_worker() ? comm_.rank() : -1; }
  /// World rank of server s.
  int server_rank(int s) const noexcept { return num_workers_ + s; }
  /// World rank of worker w.
  int worker_rank(int w) const noexcept { return w; }
  /// The staleness bound in force: 0 in sync mode, options.staleness in async mode.
  int staleness() const noexcept { return staleness_; }
  /// The options.
  const ParameterServerOptions& options() const noexcept { return options_; }
  /// The key space and its split over the servers.
  const ParameterServerLayout& layout() const noexcept { return layout_; }
  /// The world communicator.
  const Comm& comm() const noexcept { return comm_; }
  /// This rank's counters (see ParameterServerStats).
  const ParameterServerStats& stats() const noexcept { return stats_; }

  // ---- server -------------------------------------------------------------------------------
  /// Server: the pieces of parameters this server holds, each a Parameter named after the
  /// full parameter, with 1-D value and grad views (length = the piece's element count) into
  /// the shard. Build the optimizer on them; with per-name options (no weight decay on
  /// biases) build one optimizer per group and serve a struct whose step() steps both.
  /// Throws tessera::Error on a worker.
  const ParameterList<T>& shard_parameters() const {
    expect_server("shard_parameters");
    return shard_list_;
  }
  /// Server: the shard's values, keys [layout().key_begin(s), key_end(s)) as a 1-D tensor.
  /// Throws tessera::Error on a worker.
  const Tensor<T>& shard_values() const {
    expect_server("shard_values");
    return shard_value_;
  }

  /// Server: answers the workers until every one of them is done, running `optimizer.step()`
  /// once per global step on the shard (see the class comment for the order of summation and
  /// the scaling), and returns this server's counters.
  ///
  /// Throws tessera::Error on a worker or when called twice; tessera::Error naming the
  /// numbers when a worker pushes another number of elements than this shard holds, a
  /// negative count, or when the counts of a step sum to 0; TimeoutError, naming every worker
  /// it waits for and its clock, when no message arrives for the communicator's timeout().
  template <ShardOptimizer O>
  ParameterServerStats serve(O& optimizer);

  // ---- worker -------------------------------------------------------------------------------
  /// Worker: sends each server its key range of `params`' gradients and `count`, the number
  /// of samples whose loss gradients are summed in them (a SUM loss; the servers divide by
  /// the global count). Returns a timestamp for wait(); the gradients are copied before it
  /// returns, so they may be zeroed at once. Increments this worker's clock.
  ///
  /// Throws tessera::Error on a server, after finish(), for a negative count, or when
  /// `params` does not match the layout (naming the parameter and both element counts).
  std::int64_t push(const ParameterList<T>& params, std::int64_t count);

  /// Worker: requests the current values from every server, to be written into `params`'
  /// values when wait() reaches the returned timestamp. `params` must stay alive until then.
  /// A server answers once it has applied global step clock() - staleness().
  /// Throws tessera::Error as push (without the count).
  std::int64_t pull(const ParameterList<T>& params);

  /// Worker: blocks until the push or pull with this timestamp, and every earlier one, has
  /// completed (ps-lite's Wait). Throws tessera::Error for a timestamp never issued, and the
  /// communicator's errors (TimeoutError, AbortedError, CommError).
  void wait(std::int64_t timestamp);

  /// Worker: push(params, count), then pull(params) and wait for it: afterwards `params` hold
  /// the new values. Gradients are left as they are (zero them before the next backward).
  void step(const ParameterList<T>& params, std::int64_t count) {
    push(params, count);
    wait(pull(params));
  }
  /// Worker: step(model.parameters(), count).
  template <Layer L>
  void step(L& model, std::int64_t count) {
    step(model.parameters(), count);
  }

  /// Worker: waits for every pending push and pull, then tells every server this worker is
  /// done. Idempotent. Throws tessera::Error on a server; the communicator's errors.
  void finish();

  /// Compresses every push through `hook`'s point-to-point form (CommHook::encode on the
  /// worker, decode on the server before the sum; e.g. HalfPrecisionHook: bf16 on the link,
  /// summed in T), as DataParallel's buckets take a hook; nullptr: T values as before.
  /// Collective over the world: every rank, workers and servers, installs a hook of the same
  /// name (checked), before its first push or serve(). Throws tessera::Error on every rank when
  /// the names differ, and on the ranks whose hook has no point-to-point form (naming it).
  void set_push_hook(std::shared_ptr<CommHook<T>> hook) {
    const std::string name = hook ? hook->name() : std::string("none (uncompressed)");
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a of the name
    for (const char c : name) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    const auto key = static_cast<std::int64_t>(h >> 2);
    const std::int64_t lo = comm_.all_reduce_value(key, ReduceOp::min), hi = comm_.all_reduce_value(key, ReduceOp::max);
    TESSERA_EXPECTS(lo == hi, "ParameterServer::set_push_hook: rank ", comm_.rank(), " installs '", name,
                    "', but the ranks' hooks differ");
    TESSERA_EXPECTS(!hook || hook->point_to_point(), "ParameterServer::set_push_hook: hook '", name,
                    "' has no point-to-point form (bf16, fp16 and none have)");
    push_hook_ = std::move(hook);
  }

  /// Worker: its clock, the number of pushes it has made. Server: the global steps applied.
  std::int64_t clock() const noexcept { return is_worker() ? clock_ : version_; }

 private:
  enum Kind : std::int64_t { kPush = 1, kPull = 2, kDone = 3, kReply = 4 };
  using Header = std::array<std::int64_t, 4>;  // worker -> server: kind, clock, count, length
                                               // server -> worker: kReply, version, min clock, length

  struct PendingOp {
    std::int64_t ts = 0;
    bool is_pull = false;
    std::int64_t clock = 0;          // pull: the worker's clock when it asked
    std::vector<Header> sent;        // per server: the header sent
    std::vector<Header> replies;     // pull, per server: the reply header
    std::vector<std::vector<T>> buffers;  // per server: gradients sent / values received
    std::vector<Request> requests;
    ParameterList<T> params;         // pull: where the values go
  };

  int tag_header() const { return options_.tag; }
  int tag_push() const { return options_.tag + 1; }
  int tag_reply() const { return options_.tag + 2; }
  int tag_values() const { return options_.tag + 3; }

  static ParameterServerLayout checked_layout(const Comm& comm, const ParameterList<T>& params,
                                              const ParameterServerOptions& o) {
    TESSERA_EXPECTS(comm.valid(), "ParameterServer: the world communicator handle is empty");
    const int n = comm.size();
    TESSERA_EXPECTS(o.num_servers >= 1 && o.num_servers <= n - 1, "ParameterServer: num_servers = ",
                    o.num_servers, " must lie in [1, world size - 1] = [1, ", n - 1, "] on ", comm.name(),
                    " of size ", n, ": at least one rank must be a server and one a worker");
    TESSERA_EXPECTS(o.staleness >= 0, "ParameterServer: staleness must be >= 0, got ", o.staleness);
    TESSERA_EXPECTS(o.mode == ParameterServerMode::async || o.staleness == 0,
                    "ParameterServer: mode sync waits for every worker (staleness 0) but staleness = ",
                    o.staleness, " was given; use mode async for bounded staleness");
    TESSERA_EXPECTS(o.tag >= 0 && o.tag <= std::numeric_limits<int>::max() - 3,
                    "ParameterServer: tag must be >= 0 (it uses tag to tag + 3), got ", o.tag);
    return ParameterServerLayout(params, o.num_servers);
  }

  void check_same_options() {
    const std::array<std::int64_t, 4> mine{options_.num_servers, static_cast<std::int64_t>(options_.mode),
                                           options_.staleness, options_.tag};
    const int n = comm_.size();
    std::vector<std::int64_t> all(4 * static_cast<std::size_t>(n));
    comm_.all_gather(std::span<const std::int64_t>(mine), all);
    for (int q = 1; q < n; ++q) {
      const std::int64_t* r = all.data() + 4 * q;
      TESSERA_EXPECTS(std::equal(r, r + 4, all.data()), "ParameterServer: rank ", q, " passes options {num_servers ",
                      r[0], ", mode ", r[1] == 0 ? "sync" : "async", ", staleness ", r[2], ", tag ", r[3],
                      "} but rank 0 passes {num_servers ", all[0], ", mode ", all[1] == 0 ? "sync" : "async",
                      ", staleness ", all[2], ", tag ", all[3], "}; every rank must pass the same options");
    }
  }

  // World rank 0's values to every rank (into every rank's params); servers keep their range.
  void broadcast_initial_values(const ParameterList<T>& params) {
    const std::int64_t n = layout_.num_keys();
    std::vector<T> flat(static_cast<std::size_t>(n));
    if (comm_.rank() == 0)
      for (std::size_t i = 0; i < params.size(); ++i) {
        const Tensor<T> v = params[i].value.contiguous();
        std::copy_n(v.data(), v.numel(), flat.data() + layout_.offset(i));
      }
    comm_.broadcast(flat, 0);
    if (comm_.rank() != 0)
      for (std::size_t i = 0; i < params.size(); ++i) {
        const Tensor<T>& v = params[i].value;
        const Tensor<T> src = Tensor<T>::from(v.shape(), std::span<const T>(flat.data() + layout_.offset(i),
                                                                           static_cast<std::size_t>(v.numel())));
        v.copy_from(src);
      }
    if (!is_server()) return;
    const int s = server_index();
    const std::int64_t lo = layout_.key_begin(s), len = layout_.shard_size(s);
    shard_value_ = Tensor<T>::from(Shape{len}, std::span<const T>(flat.data() + lo, static_cast<std::size_t>(len)));
    shard_grad_ = Tensor<T>(Shape{len});
    const auto& pieces = layout_.pieces(s);
    shard_params_.reserve(pieces.size());
    for (const ParameterServerPiece& p : pieces) {
      shard_params_.emplace_back(p.name, shard_value_.slice(0, p.shard_offset, p.shard_offset + p.length),
                                 shard_grad_.slice(0, p.shard_offset, p.shard_offset + p.length),
                                 ParamLayout::replicate());
    }
    for (Parameter<T>& p : shard_params_) shard_list_.push_back(p);
  }

  void expect_worker(const char* call) const {
    TESSERA_EXPECTS(is_worker(), "ParameterServer::", call, ": rank ", comm_.rank(), " is server ", server_index(),
                    "; only workers (ranks 0 to ", num_workers_ - 1, ") push, pull, wait and finish");
    TESSERA_EXPECTS(!finished_, "ParameterServer::", call, ": worker ", comm_.rank(),
                    " has already called finish()");
  }
  void expect_server(const char* call) const {
    TESSERA_EXPECTS(is_server(), "ParameterServer::", call, ": rank ", comm_.rank(),
                    " is a worker; only servers (ranks ", num_workers_, " to ", comm_.size() - 1, ") serve");
  }

  // Copies the parts of one flat-per-parameter buffer set into / out of per-server buffers.
  void gather_grads(const ParameterList<T>& params, std::vector<std::vector<T>>& out) const {
    std::vector<Tensor<T>> grads;
    grads.reserve(params.size());
    for (const Parameter<T>& p : params) grads.push_back(p.grad.contiguous());
    out.resize(static_cast<std::size_t>(num_servers()));
    for (int s = 0; s < num_servers(); ++s) {
      std::vector<T>& buf = out[static_cast<std::size_t>(s)];
      buf.resize(static_cast<std::size_t>(layout_.shard_size(s)));
      for (const ParameterServerPiece& p : layout_.pieces(s))
        std::copy_n(grads[p.param].data() + p.param_offset, p.length, buf.data() + p.shard_offset);
    }
  }
  void scatter_values(const ParameterList<T>& params, const std::vector<std::vector<T>>& in) const {
    std::vector<Tensor<T>> dst;
    dst.reserve(params.size());
    for (const Parameter<T>& p : params) dst.push_back(p.value.is_contiguous() ? p.value : p.value.clone());
    for (int s = 0; s < num_servers(); ++s)
      for (const ParameterServerPiece& p : layout_.pieces(s))
        std::copy_n(in[static_cast<std::size_t>(s)].data() + p.shard_offset, p.length,
                    dst[p.param].data() + p.param_offset);
    for (std::size_t i = 0; i < params.size(); ++i)
      if (!params[i].value.is_contiguous()) params[i].value.copy_from(dst[i]);
  }

  void complete(PendingOp& op) {
    for (Request& r : op.requests) r.wait();
    if (!op.is_pull) return;
    for (int s = 0; s < num_servers(); ++s) {
      const Header& h = op.replies[static_cast<std::size_t>(s)];
      TESSERA_EXPECTS(h[0] == kReply && h[3] == layout_.shard_size(s), "ParameterServer::wait: worker ",
                      comm_.rank(), " got a reply of kind ", h[0], " with ", h[3], " values from server ", s,
                      " (rank ", server_rank(s), "), expected kind ", kReply, " with ", layout_.shard_size(s),
                      "; another user of tags ", options_.tag, " to ", options_.tag + 3, " on ", comm_.name(), "?");
      stats_.max_staleness = std::max(stats_.max_staleness, op.clock - h[1]);
    }
    scatter_values(op.params, op.buffers);
    ++stats_.pulls;
  }

  Comm comm_;
  ParameterServerOptions options_;
  ParameterServerLayout layout_;
  int num_workers_ = 0;
  int staleness_ = 0;
  ParameterServerStats stats_{};
  // server
  Tensor<T> shard_value_, shard_grad_;
  std::vector<Parameter<T>> shard_params_;
  ParameterList<T> shard_list_;
  std::int64_t version_ = 0;
  bool served_ = false;
  // worker
  std::int64_t clock_ = 0;
  std::int64_t next_ts_ = 0;
  bool finished_ = false;
  std::deque<PendingOp> pending_;
  std::shared_ptr<CommHook<T>> push_hook_;  // set_push_hook: the pushes' encoding (nullptr: none)
};

// ---- worker ------------------------------------------------------------------------------------

template <std::floating_point T>
std::int64_t ParameterServer<T>::push(const ParameterList<T>& params, std::int64_t count) {
  expect_worker("push");
  layout_.check(params, "ParameterServer::push");
  TESSERA_EXPECTS(count >= 0, "ParameterServer::push: worker ", comm_.rank(), " passes count ", count,
                  "; the number of samples summed into the gradients must be >= 0");
  PendingOp& op = pending_.emplace_back();
  op.ts = next_ts_++;
  op.clock = ++clock_;
  gather_grads(params, op.buffers);
  if (push_hook_)  // set_push_hook: each server's range encoded (e.g. bf16)
    for (std::vector<T>& b : op.buffers) {
      std::vector<T> wire(push_hook_->encoded_size(b.size()));
      push_hook_->encode(std::span<const T>(b), std::span<T>(wire));
      b = std::move(wire);
    }
  op.sent.resize(static_cast<std::size_t>(num_servers()));
  for (int s = 0; s < num_servers(); ++s) {
    const auto si = static_cast<std::size_t>(s);
    op.sent[si] = {kPush, clock_, count, layout_.shard_size(s)};
    op.requests.push_back(comm_.isend(std::span<const std::int64_t>(op.sent[si]), server_rank(s), tag_header()));
    if (!op.buffers[si].empty())
      op.requests.push_back(comm_.isend(std::span<const T>(op.buffers[si]), server_rank(s), tag_push()));
  }
  ++stats_.pushes;
  stats_.steps = clock_;
  return op.ts;
}

template <std::floating_point T>
std::int64_t ParameterServer<T>::pull(const ParameterList<T>& params) {
  expect_worker("pull");
  layout_.check(params, "ParameterServer::pull");
  PendingOp& op = pending_.emplace_back();
  op.ts = next_ts_++;
  op.is_pull = true;
  op.clock = clock_;
  op.params = params;
  const auto S = static_cast<std::size_t>(num_servers());
  op.sent.resize(S);
  op.replies.resize(S);
  op.buffers.resize(S);
  // Receives first, so that a server's reply always finds its receive posted.
  for (int s = 0; s < num_servers(); ++s) {
    const auto si = static_cast<std::size_t>(s);
    op.buffers[si].resize(static_cast<std::size_t>(layout_.shard_size(s)));
    op.requests.push_back(comm_.irecv(std::span<std::int64_t>(op.replies[si]), server_rank(s), tag_reply()));
    if (!op.buffers[si].empty())
      op.requests.push_back(comm_.irecv(std::span<T>(op.buffers[si]), server_rank(s), tag_values()));
  }
  for (int s = 0; s < num_servers(); ++s) {
    const auto si = static_cast<std::size_t>(s);
    op.sent[si] = {kPull, clock_, 0, layout_.shard_size(s)};
    op.requests.push_back(comm_.isend(std::span<const std::int64_t>(op.sent[si]), server_rank(s), tag_header()));
  }
  return op.ts;
}

template <std::floating_point T>
void ParameterServer<T>::wait(std::int64_t timestamp) {
  expect_worker("wait");
  TESSERA_EXPECTS(timestamp >= 0 && timestamp < next_ts_, "ParameterServer::wait: worker ", comm_.rank(),
                  " was given timestamp ", timestamp, ", which was never issued (",
                  next_ts_ == 0 ? std::string("none issued yet") : detail::str("issued: 0 to ", next_ts_ - 1), ")");
  const auto t0 = std::chrono::steady_clock::now();
  while (!pending_.empty() && pending_.front().ts <= timestamp) {
    complete(pending_.front());
    pending_.pop_front();
  }
  stats_.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <std::floating_point T>
void ParameterServer<T>::finish() {
  if (finished_) return;
  expect_worker("finish");
  if (next_ts_ > 0) wait(next_ts_ - 1);
  for (int s = 0; s < num_servers(); ++s) {
    const Header h{kDone, clock_, 0, layout_.shard_size(s)};
    comm_.send(std::span<const std::int64_t>(h), server_rank(s), tag_header());
  }
  finished_ = true;
}

// ---- server ------------------------------------------------------------------------------------

template <std::floating_point T>
template <ShardOptimizer O>
ParameterServerStats ParameterServer<T>::serve(O& optimizer) {
  expect_server("serve");
  TESSERA_EXPECTS(!served_, "ParameterServer::serve: server ", server_index(), " (rank ", comm_.rank(),
                  ") has already served; make a new ParameterServer for another run");
  served_ = true;
  const int s = server_index();
  const std::int64_t len = layout_.shard_size(s);
  struct Push {
    std::int64_t clock, count;
    std::vector<T> grad;
  };
  struct Peer {  // one worker, as this server sees it
    Header header{};
    Request request;                // the receive in flight: a header, or a push's gradients
    bool awaiting_grad = false;
    bool done = false;
    std::int64_t clock = 0;         // pushes received
    std::int64_t incoming_count = 0;
    std::vector<T> incoming;
    std::deque<Push> pushes;        // received, not yet applied (clocks version_+1, ...)
    std::deque<std::int64_t> pulls;  // clocks of pulls not yet answered
  };
  const int W = num_workers_;
  // Posted receives write into the peers (and sends in flight read the replies); on an error
  // they are kept until the process exits (detail::keep_until_exit; see the destructor).
  auto owned_peers = std::make_unique<std::vector<Peer>>(static_cast<std::size_t>(W));
  std::vector<Peer>& peers = *owned_peers;
  std::vector<std::vector<T>> pool;  // shard-sized buffers to reuse
  struct Reply {  // a reply in flight: a snapshot of the shard, kept until both sends complete,
                  // so that a worker busy computing never holds up the server (MPI rendezvous)
    Header header{};
    std::vector<T> values;
    Request header_sent, values_sent;
  };
  auto owned_replies = std::make_unique<std::list<Reply>>();
  std::list<Reply>& replies = *owned_replies;
  auto reap = [&] {
    for (auto it = replies.begin(); it != replies.end();) {
      if (it->header_sent.test() && it->values_sent.test()) {
        pool.push_back(std::move(it->values));
        it = replies.erase(it);
      } else {
        ++it;
      }
    }
  };
  auto post_header = [&](int w) {
    Peer& p = peers[static_cast<std::size_t>(w)];
    p.request = comm_.irecv(std::span<std::int64_t>(p.header), worker_rank(w), tag_header());
  };

  // Applies every global step whose pushes are all in, in order.
  auto apply = [&] {
    for (;;) {
      const std::int64_t t = version_ + 1;
      bool any = false;
      for (const Peer& p : peers) {
        if (!p.pushes.empty() && p.pushes.front().clock == t) {
          any = true;
        } else if (!p.done) {
          return;  // worker still running and its push of step t is not in
        }
      }
      if (!any) return;
      // g = g_0 + g_1 + ... in worker rank order (the first copied), then * (1 / N).
      T* g = shard_grad_.data();
      std::int64_t total = 0;
      bool first = true;
      for (Peer& p : peers) {
        if (p.pushes.empty() || p.pushes.front().clock != t) continue;
        Push& push = p.pushes.front();
        const T* x = push.grad.data();
        if (first) {
          std::copy_n(x, len, g);
        } else {
          for (std::int64_t j = 0; j < len; ++j) g[j] += x[j];
        }
        first = false;
        total += push.count;
        pool.push_back(std::move(push.grad));
        p.pushes.pop_front();
      }
      TESSERA_EXPECTS(total > 0, "ParameterServer: step ", t, " on server ", s, " has a total sample count of 0; ",
                      "push(params, count) takes the number of samples summed into the gradients");
      const T scale = static_cast<T>(1.0 / static_cast<double>(total));
      for (std::int64_t j = 0; j < len; ++j) g[j] *= scale;
      optimizer.step();
      version_ = t;
      stats_.steps = t;
    }
  };

  // Answers, in order, every pull whose worker is at most staleness_ steps ahead of version_.
  auto answer = [&] {
    std::int64_t min_clock = std::numeric_limits<std::int64_t>::max();
    for (const Peer& p : peers)
      if (!p.done) min_clock = std::min(min_clock, p.clock);
    for (int w = 0; w < W; ++w) {
      Peer& p = peers[static_cast<std::size_t>(w)];
      while (!p.pulls.empty() && version_ >= p.pulls.front() - staleness_) {
        const std::int64_t c = p.pulls.front();
        p.pulls.pop_front();
        Reply& r = replies.emplace_back();
        r.header = {kReply, version_, min_clock, len};
        r.header_sent = comm_.isend(std::span<const std::int64_t>(r.header), worker_rank(w), tag_reply());
        if (len > 0) {
          if (!pool.empty()) {
            r.values = std::move(pool.back());
            pool.pop_back();
          }
          r.values.assign(shard_value_.data(), shard_value_.data() + len);
          r.values_sent = comm_.isend(std::span<const T>(r.values), worker_rank(w), tag_values());
        }
        ++stats_.pulls;
        stats_.max_staleness = std::max(stats_.max_staleness, c - version_);
        stats_.max_clock_gap = std::max(stats_.max_clock_gap, c - min_clock);
      }
    }
  };

  auto describe = [&] {
    std::string who;
    for (int w = 0; w < W; ++w) {
      const Peer& p = peers[static_cast<std::size_t>(w)];
      if (p.done) continue;
      who += detail::str(who.empty() ? "" : "; ", "worker ", w, " (rank ", worker_rank(w), ") at clock ", p.clock,
                         p.awaiting_grad ? ", its gradients not yet received" : "",
                         p.pulls.empty() ? "" : ", a pull waiting");
    }
    return who;
  };

  // A received header or push from worker w.
  auto handle = [&](int w) {
    Peer& p = peers[static_cast<std::size_t>(w)];
    if (p.awaiting_grad) {
      p.awaiting_grad = false;
      p.clock += 1;
      if (push_hook_) {  // set_push_hook: decoded into T before the sum
        std::vector<T> values(static_cast<std::size_t>(len));
        push_hook_->decode(std::span<const T>(p.incoming), std::span<T>(values));
        p.incoming = std::move(values);
      }
      p.pushes.push_back({p.clock, p.incoming_count, std::move(p.incoming)});
      ++stats_.pushes;
      post_header(w);
      return;
    }
    const Header h = p.header;
    TESSERA_EXPECTS(h[0] == kPush || h[0] == kPull || h[0] == kDone, "ParameterServer: server ", s,
                    " received a message of unknown kind ", h[0], " from worker ", w, "; another user of tags ",
                    options_.tag, " to ", options_.tag + 3, " on ", comm_.name(), "?");
    if (h[0] == kDone) {
      p.done = true;
      return;
    }
    TESSERA_EXPECTS(h[3] == len, "ParameterServer: worker ", w, " (rank ", worker_rank(w), ") sent ", h[3],
                    " elements to server ", s, " (rank ", comm_.rank(), "), whose shard holds ", len, " (keys [",
                    layout_.key_begin(s), ", ", layout_.key_end(s), ") of ", layout_.num_keys(), ")");
    if (h[0] == kPull) {
      TESSERA_EXPECTS(h[1] == p.clock, "ParameterServer: worker ", w, " pulls at clock ", h[1], " but server ", s,
                      " has received ", p.clock, " pushes from it");
      p.pulls.push_back(h[1]);
      post_header(w);
      return;
    }
    TESSERA_EXPECTS(h[1] == p.clock + 1 && h[2] >= 0, "ParameterServer: worker ", w, " pushed step ", h[1],
                    " with count ", h[2], " but server ", s, " expected step ", p.clock + 1,
                    " with a count >= 0");
    p.incoming_count = h[2];
    if (len == 0) {
      p.clock += 1;
      p.pushes.push_back({p.clock, p.incoming_count, {}});
      ++stats_.pushes;
      post_header(w);
      return;
    }
    if (!pool.empty()) {
      p.incoming = std::move(pool.back());
      pool.pop_back();
    }
    p.incoming.resize(push_hook_ ? push_hook_->encoded_size(static_cast<std::size_t>(len)) : static_cast<std::size_t>(len));
    p.awaiting_grad = true;
    p.request = comm_.irecv(std::span<T>(p.incoming), worker_rank(w), tag_push());
  };

  // Polls every worker's receive with test(), so messages are served in any arrival order.
  auto loop = [&] {
    const auto timeout = comm_.timeout();
    auto last = std::chrono::steady_clock::now();
    int idle = 0;
    for (int w = 0; w < W; ++w) post_header(w);
    for (;;) {
      reap();
      bool progressed = false;
      for (int w = 0; w < W; ++w) {
        Peer& p = peers[static_cast<std::size_t>(w)];
        if (p.done || !p.request.test()) continue;
        handle(w);
        progressed = true;
      }
      if (progressed) {
        apply();
        answer();
        idle = 0;
        last = std::chrono::steady_clock::now();
        continue;
      }
      if (std::all_of(peers.begin(), peers.end(), [](const Peer& p) { return p.done; })) {
        for (Reply& r : replies) {  // complete already: every worker waited for its replies
          r.header_sent.wait();
          r.values_sent.wait();
        }
        replies.clear();
        return;
      }
      // Nothing arrived: yield for a while, then sleep in short slices (the threads backend's
      // ranks may share few cores with the workers).
      const auto now = std::chrono::steady_clock::now();
      if (now - last > timeout)
        throw TimeoutError(detail::str("ParameterServer: server ", s, " (rank ", comm_.rank(), ") of ", comm_.name(),
                                       " received nothing for ", std::chrono::duration<double>(now - last).count(),
                                       " s at version ", version_, "; waiting for ", describe()));
      if (++idle < 200) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(idle < 2000 ? 20 : 200));
      }
      stats_.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - now).count();
    }
  };
  try {
    loop();
  } catch (...) {
    detail::keep_until_exit(std::shared_ptr<std::vector<Peer>>(std::move(owned_peers)));
    detail::keep_until_exit(std::shared_ptr<std::list<Reply>>(std::move(owned_replies)));
    throw;
  }
  return stats_;
}

}  // namespace tessera
