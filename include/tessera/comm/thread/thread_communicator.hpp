#pragma once
/// @file
/// The threads backend: ranks are std::threads of one process, started by `threads::run`.
/// It is the default backend (no launcher needed) and the bitwise reference for tests:
/// every reduction runs in a fixed rank order, so results do not depend on timing.
///
/// Large collectives work in place through shared memory: for all_reduce every rank reduces
/// its own slice of the buffer, reading that slice from every rank's buffer in rank order, and
/// writes the result into every rank's buffer (2 rendezvous, no staging copy).

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#include "tessera/comm/collective_checker.hpp"
#include "tessera/comm/communicator.hpp"
#include "tessera/comm/thread/thread_state.hpp"

namespace tessera::threads {

namespace detail {

/// Applies `op` over `n` buffers' [lo, hi) in rank order into `dst` (which may alias buffer 0..n-1
/// at the same range only when every source range is read before it is written: we stage
/// through a small chunk on the stack).
template <class T>
void reduce_range(const T* const* src, int n, std::size_t lo, std::size_t hi, ReduceOp op, T* const* dst,
                  int ndst) {
  constexpr std::size_t chunk = 2048;
  T tmp[chunk];
  for (std::size_t c = lo; c < hi; c += chunk) {
    const std::size_t m = std::min(chunk, hi - c);
    std::memcpy(tmp, src[0] + c, m * sizeof(T));
    for (int i = 1; i < n; ++i) {
      const T* s = src[i] + c;
      switch (op) {
        case ReduceOp::sum:
        case ReduceOp::avg:
          for (std::size_t j = 0; j < m; ++j) tmp[j] += s[j];
          break;
        case ReduceOp::max:
          for (std::size_t j = 0; j < m; ++j) tmp[j] = std::max(tmp[j], s[j]);
          break;
        case ReduceOp::min:
          for (std::size_t j = 0; j < m; ++j) tmp[j] = std::min(tmp[j], s[j]);
          break;
      }
    }
    if (op == ReduceOp::avg)
      for (std::size_t j = 0; j < m; ++j) tmp[j] = static_cast<T>(tmp[j] / static_cast<T>(n));
    for (int d = 0; d < ndst; ++d) std::memcpy(dst[d] + (c - lo), tmp, m * sizeof(T));
  }
}

template <class F>
decltype(auto) dispatch(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::i32: return f(std::int32_t{});
    case DType::i64: return f(std::int64_t{});
  }
  return f(float{});
}

/// Completion state shared by a queued operation and its Request.
struct OpState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::exception_ptr error;
  void finish(std::exception_ptr e) {
    {
      std::lock_guard lk(mu);
      done = true;
      error = e;
    }
    cv.notify_all();
  }
};

class QueuedRequest final : public RequestImpl {
 public:
  explicit QueuedRequest(std::shared_ptr<OpState> s) : s_(std::move(s)) {}
  void wait() override {
    std::unique_lock lk(s_->mu);
    s_->cv.wait(lk, [&] { return s_->done; });
    if (s_->error) std::rethrow_exception(s_->error);
  }
  bool test() override {
    std::lock_guard lk(s_->mu);
    if (s_->done && s_->error) std::rethrow_exception(s_->error);
    return s_->done;
  }

 private:
  std::shared_ptr<OpState> s_;
};

/// Request of posted receives (irecv, batch_isend_irecv).
class RecvRequest final : public RequestImpl {
 public:
  using Waiter = std::function<void()>;
  /// `doomed[i]()` is true when receive i can no longer complete by waiting (the run aborted,
  /// or its sender returned): test() then resolves it through its waiter, which throws at once.
  explicit RecvRequest(std::vector<std::shared_ptr<std::atomic<int>>> states, std::vector<Waiter> waiters,
                       std::vector<std::function<bool()>> doomed)
      : states_(std::move(states)), waiters_(std::move(waiters)), doomed_(std::move(doomed)) {}
  // Every receive is waited for (or withdrawn, when its wait throws) before the first error is
  // rethrown: a receive left posted would let a later send write into a freed buffer.
  void wait() override {
    std::exception_ptr first;
    for (auto& w : waiters_) {
      try {
        w();
      } catch (...) {
        if (!first) first = std::current_exception();
      }
    }
    if (first) std::rethrow_exception(first);
  }
  bool test() override {
    bool done = true;
    for (std::size_t i = 0; i < states_.size(); ++i)
      if (states_[i]->load(std::memory_order_acquire) == 0) {
        if (doomed_[i]()) {
          try {
            waiters_[i]();  // throws AbortedError / TimeoutError, or it just arrived
          } catch (...) {
            wait_rest();
            throw;
          }
        }
        done = done && states_[i]->load(std::memory_order_acquire) != 0;
      }
    return done;  // wait() then reports a count/type mismatch, if any
  }

 private:
  void wait_rest() noexcept {
    for (auto& w : waiters_) {
      try {
        w();
      } catch (...) {  // the first error is the one reported
      }
    }
  }
  std::vector<std::shared_ptr<std::atomic<int>>> states_;
  std::vector<Waiter> waiters_;
  std::vector<std::function<bool()>> doomed_;
};

}  // namespace detail

/// One rank's handle on a threads-backend communicator (a CommBackend). Made by `run` (the
/// world) and by split(); users hold it through `tessera::Comm`.
///
/// Non-blocking collectives run, in issue order, on a per-handle progress thread created on
/// first use, so they overlap with the caller's computation; a blocking collective issued while
/// non-blocking ones are pending queues behind them (issue order is kept).
class ThreadCommunicator final : public CommBackend {
 public:
  /// `group`: the shared state; `rank`: this rank's index in it; `timeout`: wait limit.
  ThreadCommunicator(std::shared_ptr<detail::World> world, std::shared_ptr<detail::Group> group, int rank,
                     std::chrono::milliseconds timeout)
      : world_(std::move(world)), group_(std::move(group)), rank_(rank), name_(group_->name()), timeout_(timeout) {}

  ~ThreadCommunicator() override {
    if (worker_.joinable()) {
      {
        std::lock_guard lk(qmu_);
        stop_ = true;
      }
      qcv_.notify_all();
      worker_.join();
    }
  }
  ThreadCommunicator(const ThreadCommunicator&) = delete;
  ThreadCommunicator& operator=(const ThreadCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  std::string name() const override { return name_; }
  void set_name(std::string n) override { name_ = std::move(n); }
  std::chrono::milliseconds timeout() const override { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) override { timeout_ = t; }

  Request all_reduce(void* data, std::size_t count, DType t, ReduceOp op, bool async) override {
    detail::Signature sig{detail::Signature::Kind::all_reduce, t, count, op, -1};
    return submit(async, [this, data, count, t, op, sig] {
      collective(sig, data, data, [&] {
        const int n = size();
        const std::size_t lo = count * static_cast<std::size_t>(rank_) / static_cast<std::size_t>(n);
        const std::size_t hi = count * static_cast<std::size_t>(rank_ + 1) / static_cast<std::size_t>(n);
        detail::dispatch(t, [&](auto zero) {
          using T = decltype(zero);
          std::vector<const T*> src(static_cast<std::size_t>(n));
          std::vector<T*> dst(static_cast<std::size_t>(n));
          for (int q = 0; q < n; ++q) {
            src[static_cast<std::size_t>(q)] = static_cast<const T*>(group_->slot(q).out);
            dst[static_cast<std::size_t>(q)] = static_cast<T*>(group_->slot(q).out) + lo;
          }
          detail::reduce_range<T>(src.data(), n, lo, hi, op, dst.data(), n);
        });
      });
    });
  }

  Request all_gather(const void* in, void* out, std::size_t count, DType t, bool async) override {
    detail::Signature sig{detail::Signature::Kind::all_gather, t, count, ReduceOp::sum, -1};
    return submit(async, [this, in, out, count, t, sig] {
      collective(sig, in, out, [&] {
        const std::size_t bytes = count * size_of(t);
        for (int q = 0; q < size(); ++q) {
          auto* dst = static_cast<std::byte*>(out) + static_cast<std::size_t>(q) * bytes;
          const void* src = group_->slot(q).in;
          if (bytes && src != dst) std::memcpy(dst, src, bytes);
        }
      });
    });
  }

  Request reduce_scatter(const void* in, void* out, std::size_t count, DType t, ReduceOp op,
                         bool async) override {
    detail::Signature sig{detail::Signature::Kind::reduce_scatter, t, count, op, -1};
    return submit(async, [this, in, out, count, t, op, sig] {
      collective(sig, in, out, [&] {
        const int n = size();
        const std::size_t lo = count * static_cast<std::size_t>(rank_);
        detail::dispatch(t, [&](auto zero) {
          using T = decltype(zero);
          std::vector<const T*> src(static_cast<std::size_t>(n));
          for (int q = 0; q < n; ++q) src[static_cast<std::size_t>(q)] = static_cast<const T*>(group_->slot(q).in);
          T* dst = static_cast<T*>(out);
          detail::reduce_range<T>(src.data(), n, lo, lo + count, op, &dst, 1);
        });
      });
    });
  }

  void broadcast(void* data, std::size_t count, DType t, int root) override {
    detail::Signature sig{detail::Signature::Kind::broadcast, t, count, ReduceOp::sum, root};
    submit(false, [this, data, count, t, root, sig] {
      collective(sig, data, data, [&] {
        if (rank_ != root && count) std::memcpy(data, group_->slot(root).out, count * size_of(t));
      });
    }).wait();
  }

  Request send(const void* data, std::size_t count, DType t, int peer, int tag, bool) override {
    // Eager: the message is delivered (or queued as a copy) before send returns, so a send
    // never waits for its receive and no exchange order can deadlock.
    detail::Signature sig{detail::Signature::Kind::send, t, count, ReduceOp::sum, peer};
    world_->set_doing(group_->world_rank(rank_), sig, name_);
    group_->deliver(rank_, peer, tag, data, count, t);
    world_->set_idle(group_->world_rank(rank_));
    return Request{};
  }

  Request recv(void* data, std::size_t count, DType t, int peer, int tag, bool async) override {
    P2POp op{P2POp::Kind::recv, data, count, t, peer, tag};
    Request r = batch_p2p(std::span<const P2POp>(&op, 1));
    if (!async) r.wait();
    return r;
  }

  Request batch_p2p(std::span<const P2POp> ops) override {
    // Sends first (eager), then post every receive; the request waits for the receives.
    for (const P2POp& op : ops)
      if (op.kind == P2POp::Kind::send) send(op.data, op.count, op.dtype, op.peer, op.tag, true);
    std::vector<std::shared_ptr<std::atomic<int>>> states;
    std::vector<detail::RecvRequest::Waiter> waiters;
    std::vector<std::function<bool()>> doomed;
    for (const P2POp& op : ops) {
      if (op.kind != P2POp::Kind::recv) continue;
      detail::PostedRecv pr = group_->post_recv(op.peer, rank_, op.tag, op.data, op.count, op.dtype);
      states.push_back(pr.state);
      detail::Signature sig{detail::Signature::Kind::recv, op.dtype, op.count, ReduceOp::sum, op.peer};
      const int peer = op.peer;
      waiters.push_back([this, pr, sig, peer] {
        world_->set_doing(group_->world_rank(rank_), sig, name_);
        group_->wait_recv(rank_, peer, pr, sig, name_, timeout_);
        world_->set_idle(group_->world_rank(rank_));
      });
      doomed.push_back([this, peer] { return world_->aborted() || world_->finished(group_->world_rank(peer)); });
    }
    if (states.empty()) return Request{};
    return Request(std::make_shared<detail::RecvRequest>(std::move(states), std::move(waiters), std::move(doomed)));
  }

  void barrier() override {
    detail::Signature sig{detail::Signature::Kind::barrier, DType::f32, 0, ReduceOp::sum, -1};
    submit(false, [this, sig] { collective(sig, nullptr, nullptr, [] {}); }).wait();
  }

  std::shared_ptr<CommBackend> split(int color, int key) override {
    detail::Signature sig{detail::Signature::Kind::split, DType::i32, 0, ReduceOp::sum, -1};
    std::shared_ptr<CommBackend> result;
    submit(false, [&, sig] {
      detail::Slot s;
      s.sig = sig;
      s.color = color;
      s.key = key;
      arrive(s);
      const int n = size();
      // Members of my color, ordered by (key, old rank); the leader (lowest old rank) builds it.
      std::vector<std::pair<int, int>> members;  // (key, old rank)
      for (int q = 0; q < n; ++q)
        if (group_->slot(q).color == color) members.emplace_back(group_->slot(q).key, q);
      std::sort(members.begin(), members.end());
      int leader = n;
      for (auto& m : members) leader = std::min(leader, m.second);
      if (leader == rank_) {
        std::vector<int> wr;
        for (auto& m : members) wr.push_back(group_->world_rank(m.second));
        group_->slot(rank_).new_group =
            world_->make_group(std::move(wr), tessera::detail::str(name_, "/split(color=", color, ")"));
      }
      sync(sig);  // leaders have published
      std::shared_ptr<detail::Group> g = group_->slot(leader).new_group;
      int my = 0;
      for (std::size_t i = 0; i < members.size(); ++i)
        if (members[i].second == rank_) my = static_cast<int>(i);
      result = std::make_shared<ThreadCommunicator>(world_, g, my, timeout_);
      sync_done(sig);  // everyone has read the slots
      world_->set_idle(group_->world_rank(rank_));
    }).wait();
    return result;
  }

 private:
  // Arrival: post my slot, rendezvous, check every rank called the same thing.
  void arrive(const detail::Slot& s) {
    world_->set_doing(group_->world_rank(rank_), s.sig, name_);
    group_->post(rank_, s);
    group_->barrier_wait(rank_, s.sig, name_, timeout_);
    group_->check_signatures(rank_, name_);
  }
  void sync(const detail::Signature& sig) { group_->barrier_wait(rank_, sig, name_, timeout_); }
  // The "done reading" rendezvous: waits for every rank whatever fails elsewhere (see
  // barrier_wait); a failure of the run is reported by the next collective.
  void sync_done(const detail::Signature& sig) {
    group_->barrier_wait(rank_, sig, name_, timeout_, /*abortable=*/false);
  }

  // A two-rendezvous collective: arrive (post buffers), do `work` reading peers' slots, and
  // wait until every rank is done reading before any returns (and reuses its buffer).
  template <class Work>
  void collective(const detail::Signature& sig, const void* in, void* out, Work&& work) {
    detail::Slot s;
    s.sig = sig;
    s.in = in;
    s.out = out;
    arrive(s);
    work();
    if (group_->size() > 1) sync_done(sig);
    world_->set_idle(group_->world_rank(rank_));
  }

  // Runs `fn` now (blocking, nothing pending) or on the progress thread (async, or blocking
  // behind pending async work, to keep issue order).
  template <class Fn>
  Request submit(bool async, Fn&& fn) {
    {
      std::unique_lock lk(qmu_);
      if (!async && pending_ == 0) {
        lk.unlock();
        fn();
        return Request{};
      }
    }
    auto state = std::make_shared<detail::OpState>();
    {
      std::lock_guard lk(qmu_);
      if (!worker_.joinable()) worker_ = std::thread([this] { worker_loop(); });
      ++pending_;
      queue_.push_back([state, f = std::function<void()>(std::forward<Fn>(fn))] {
        try {
          f();
          state->finish(nullptr);
        } catch (...) {
          state->finish(std::current_exception());
        }
      });
    }
    qcv_.notify_all();
    return Request(std::make_shared<detail::QueuedRequest>(state));
  }

  void worker_loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock lk(qmu_);
        qcv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
      std::lock_guard lk(qmu_);
      --pending_;
    }
  }

  std::shared_ptr<detail::World> world_;
  std::shared_ptr<detail::Group> group_;
  int rank_;
  std::string name_;
  std::chrono::milliseconds timeout_;

  std::mutex qmu_;
  std::condition_variable qcv_;
  std::deque<std::function<void()>> queue_;
  int pending_ = 0;
  bool stop_ = false;
  std::thread worker_;
};

/// Options of `threads::run`.
struct RunOptions {
  /// How long a collective waits for its peers before throwing TimeoutError (default:
  /// TESSERA_TIMEOUT seconds from the environment, else 60 s).
  std::chrono::milliseconds timeout = default_timeout();
  /// Wrap each rank's world in a CollectiveChecker (comm/collective_checker.hpp): every
  /// collective's sequence number, signature and call site compared across ranks (default:
  /// TESSERA_DEBUG_COLLECTIVES=detail in the environment).
  bool check_collectives = collective_checks_from_environment();
};

/// Starts `n` ranks as std::threads, each calling `fn(Comm& world)`, joins them, and returns
/// each rank's result in rank order (std::vector<R>; nothing for a void fn).
///
/// If any rank throws, every other rank's pending or next communication throws AbortedError
/// (no hang), and run rethrows the first rank's original exception after all have joined.
/// Throws Error if n < 1, and Error naming the rank if a rank's thread cannot be started (the
/// ranks already started are aborted and joined first).
template <class F>
auto run(int n, F&& fn, RunOptions opts = {}) {
  TESSERA_EXPECTS(n >= 1, "threads::run: the number of ranks must be >= 1, got ", n);
  using R = std::invoke_result_t<F&, Comm&>;
  auto world = std::make_shared<detail::World>(n);
  std::vector<int> ranks(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) ranks[static_cast<std::size_t>(i)] = i;
  auto group = world->make_group(ranks, "threads:world");
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  using Slot = std::conditional_t<std::is_void_v<R>, char, std::optional<R>>;
  std::vector<Slot> results(static_cast<std::size_t>(n));
  {
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(n));
    std::exception_ptr start_error;  // a rank's thread could not be started (no memory, no threads)
    for (int r = 0; r < n && !start_error; ++r) {
      try {
      threads.emplace_back([&, r] {
        try {
          Comm comm(std::make_shared<ThreadCommunicator>(world, group, r, opts.timeout));
          if (opts.check_collectives) comm = tessera::check_collectives(comm);
          if constexpr (std::is_void_v<R>) {
            fn(comm);
          } else {
            results[static_cast<std::size_t>(r)].emplace(fn(comm));
          }
        } catch (const std::exception& e) {
          errors[static_cast<std::size_t>(r)] = std::current_exception();
          world->abort(r, tessera::detail::str("rank ", r, ": ", e.what()));
        } catch (...) {
          errors[static_cast<std::size_t>(r)] = std::current_exception();
          world->abort(r, tessera::detail::str("rank ", r, ": unknown exception"));
        }
        world->finish(r);
      });
      } catch (const std::exception& e) {
        // The ranks already started would wait for this one: abort the world (their
        // communication throws AbortedError), mark the ranks never started as returned, join
        // the started ones below, and report this.
        const std::string why = tessera::detail::str("threads::run: could not start rank ", r, " of ", n, ": ", e.what());
        start_error = std::make_exception_ptr(Error(why));
        world->abort(r, why);
        for (int q = r; q < n; ++q) world->finish(q);
      }
    }
    for (auto& t : threads) t.join();
    if (start_error) std::rethrow_exception(start_error);
  }
  if (world->aborted()) std::rethrow_exception(errors[static_cast<std::size_t>(world->abort_rank())]);
  if constexpr (!std::is_void_v<R>) {
    std::vector<R> out;
    out.reserve(static_cast<std::size_t>(n));
    for (auto& s : results) out.push_back(std::move(*s));
    return out;
  }
}

}  // namespace tessera::threads
