#pragma once
/// @file
/// Shared state of the threads backend: the World of one `threads::run`, its communicator
/// Groups, the rendezvous barrier with timeout/abort, and the point-to-point mailboxes.
/// Used by ThreadCommunicator; users never touch it.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

namespace tessera::threads::detail {

/// What a rank asked a communicator to do; compared across ranks to detect mismatches.
struct Signature {
  /// The call.
  enum class Kind { none, all_reduce, all_gather, reduce_scatter, broadcast, barrier, split, send, recv };
  Kind kind = Kind::none;  ///< which call
  DType dtype = DType::f32;  ///< element type
  std::size_t count = 0;   ///< element count (per rank for all_gather / reduce_scatter)
  ReduceOp op = ReduceOp::sum;  ///< reduction (all_reduce, reduce_scatter)
  int root = -1;           ///< root (broadcast) or peer (send/recv)

  /// True when two ranks' calls can proceed together.
  bool matches(const Signature& o) const {
    if (kind != o.kind) return false;
    switch (kind) {
      case Kind::barrier:
      case Kind::split: return true;
      case Kind::all_reduce:
      case Kind::reduce_scatter: return dtype == o.dtype && count == o.count && op == o.op;
      case Kind::broadcast: return dtype == o.dtype && count == o.count && root == o.root;
      default: return dtype == o.dtype && count == o.count;
    }
  }
};

/// "all_reduce(float32, count=10, sum)" and the like.
inline std::string describe(const Signature& s) {
  using K = Signature::Kind;
  switch (s.kind) {
    case K::none: return "nothing";
    case K::barrier: return "barrier()";
    case K::split: return "split()";
    case K::all_reduce:
      return tessera::detail::str("all_reduce(", name_of(s.dtype), ", count=", s.count, ", ", name_of(s.op), ")");
    case K::reduce_scatter:
      return tessera::detail::str("reduce_scatter(", name_of(s.dtype), ", count=", s.count, " per rank, ",
                                  name_of(s.op), ")");
    case K::all_gather:
      return tessera::detail::str("all_gather(", name_of(s.dtype), ", count=", s.count, " per rank)");
    case K::broadcast:
      return tessera::detail::str("broadcast(", name_of(s.dtype), ", count=", s.count, ", root=", s.root, ")");
    case K::send:
      return tessera::detail::str("send(", name_of(s.dtype), ", count=", s.count, ", to peer ", s.root, ")");
    case K::recv:
      return tessera::detail::str("recv(", name_of(s.dtype), ", count=", s.count, ", from peer ", s.root, ")");
  }
  return "?";
}

class Group;

/// Everything shared by the ranks of one `threads::run`: abort flag, per-rank status for
/// diagnostics, and every communicator Group made from the world (kept alive until run ends).
class World {
 public:
  explicit World(int n) : size_(n), status_(static_cast<std::size_t>(n)) {}

  int size() const { return size_; }

  /// Records that world rank `r` failed with `message`; the first failure wins. Wakes every
  /// waiting rank so it throws AbortedError instead of hanging.
  void abort(int r, const std::string& message);
  bool aborted() const { return aborted_.load(std::memory_order_acquire); }
  /// Rank of the first failure, or -1.
  int abort_rank() const {
    std::lock_guard lk(mu_);
    return abort_rank_;
  }
  std::string abort_message() const {
    std::lock_guard lk(mu_);
    return abort_message_;
  }
  /// Marks world rank `r` as returned from its function; waiters that need it fail at once.
  void finish(int r);
  bool finished(int r) const {
    std::lock_guard lk(mu_);
    return status_[static_cast<std::size_t>(r)].finished;
  }

  /// Notes what world rank `r` is doing (for timeout messages).
  void set_doing(int r, const Signature& s, const std::string& comm_name) {
    std::lock_guard lk(mu_);
    auto& st = status_[static_cast<std::size_t>(r)];
    st.sig = s;
    st.comm = comm_name;
    st.in_call = true;
  }
  void set_idle(int r) {
    std::lock_guard lk(mu_);
    status_[static_cast<std::size_t>(r)].in_call = false;
  }
  /// "rank 1 (waiting in all_gather(...) on threads:world)" style description.
  std::string describe_rank(int world_rank) const {
    std::lock_guard lk(mu_);
    const auto& st = status_[static_cast<std::size_t>(world_rank)];
    if (st.finished) return "had returned from its function";
    if (st.sig.kind == Signature::Kind::none) return "had not called any communication yet";
    if (st.in_call) return "was waiting in " + describe(st.sig) + " on " + st.comm;
    return "was running its own code; its last call was " + describe(st.sig) + " on " + st.comm;
  }

  /// Creates a communicator group over the given world ranks and keeps it alive.
  std::shared_ptr<Group> make_group(std::vector<int> world_ranks, std::string name);
  /// Wakes every rank waiting on any group.
  void notify_all_groups();

 private:
  struct Status {
    Signature sig;
    std::string comm;
    bool in_call = false;
    bool finished = false;
  };
  int size_;
  std::atomic<bool> aborted_{false};
  mutable std::mutex mu_;
  int abort_rank_ = -1;
  std::string abort_message_;
  std::vector<Status> status_;
  std::vector<std::shared_ptr<Group>> groups_;
};

/// A posted buffer of one rank for the current collective.
struct Slot {
  Signature sig;
  const void* in = nullptr;
  void* out = nullptr;
  int color = 0, key = 0;                 // split
  std::shared_ptr<Group> new_group;       // split: made by each color's leader
};

/// A message waiting to be received (send arrived before the matching recv).
struct Message {
  DType dtype;
  std::size_t count;
  std::vector<std::byte> bytes;
};

/// A receive posted before the matching send arrived.
struct PostedRecv {
  void* data;
  DType dtype;
  std::size_t count;
  int tag;
  std::shared_ptr<std::atomic<int>> state;  // 0 pending, 1 done, 2 error
  std::shared_ptr<std::string> error;
};

/// The shared state of one communicator: its ranks, the rendezvous barrier, the posted slots of
/// the collective in progress, and the mailboxes for point-to-point messages.
class Group {
 public:
  Group(World* world, std::vector<int> world_ranks, std::string name)
      : world_(world),
        world_ranks_(std::move(world_ranks)),
        name_(std::move(name)),
        size_(static_cast<int>(world_ranks_.size())),
        here_(world_ranks_.size(), 0),
        slots_(world_ranks_.size()) {}

  World& world() const { return *world_; }
  int size() const { return size_; }
  int world_rank(int r) const { return world_ranks_[static_cast<std::size_t>(r)]; }
  const std::string& name() const { return name_; }
  Slot& slot(int r) { return slots_[static_cast<std::size_t>(r)]; }
  const Slot& slot(int r) const { return slots_[static_cast<std::size_t>(r)]; }

  /// Posts `s` as rank r's slot for the next collective (before the arrival barrier).
  void post(int r, const Slot& s) {
    std::lock_guard lk(mu_);
    slots_[static_cast<std::size_t>(r)] = s;
  }

  /// Rendezvous of all ranks of the group. Throws AbortedError if another rank failed,
  /// TimeoutError naming the missing ranks past `timeout`, or at once if a missing rank has
  /// already returned from its function (it can never arrive).
  ///
  /// With `abortable` false (the second rendezvous of a collective, "done reading": every rank
  /// has passed the first, so every rank arrives unless the timeout passes) neither another
  /// rank's failure nor a finished rank ends the wait early: a rank that left while its peers
  /// still read or write its buffers would free them under them.
  void barrier_wait(int r, const Signature& what, const std::string& comm_name,
                    std::chrono::milliseconds timeout, bool abortable = true) {
    std::unique_lock lk(mu_);
    const std::uint64_t gen = generation_.load(std::memory_order_relaxed);
    here_[static_cast<std::size_t>(r)] = 1;
    if (++arrived_ == size_) {
      arrived_ = 0;
      std::fill(here_.begin(), here_.end(), 0);
      generation_.store(gen + 1, std::memory_order_release);
      lk.unlock();
      cv_.notify_all();
      return;
    }
    // Spin briefly (yielding) before sleeping: a rendezvous usually completes within
    // microseconds, and a condition-variable wake costs tens of them.
    const auto start = std::chrono::steady_clock::now();
    lk.unlock();
    // Bounded by time, not iterations: with more ranks than cores a yield can take a whole
    // time slice, and 2000 of them would stall the rendezvous for seconds.
    while (std::chrono::steady_clock::now() - start < std::chrono::microseconds(50)) {
      if (generation_.load(std::memory_order_acquire) != gen) return;
      std::this_thread::yield();
    }
    if (generation_.load(std::memory_order_acquire) != gen) return;
    lk.lock();
    const auto deadline = start + timeout;
    while (generation_.load(std::memory_order_acquire) == gen) {
      if (abortable && world_->aborted()) {
        leave(r);
        lk.unlock();
        throw_aborted(r, what, comm_name);
      }
      const auto now = std::chrono::steady_clock::now();
      std::vector<int> missing;
      bool any_finished = false;
      for (int q = 0; q < size_; ++q)
        if (!here_[static_cast<std::size_t>(q)]) {
          missing.push_back(q);
          if (abortable && world_->finished(world_rank(q))) any_finished = true;
        }
      if (any_finished || now >= deadline) {
        leave(r);
        lk.unlock();
        std::string who;
        for (int q : missing) {
          if (!who.empty()) who += "; ";
          who += tessera::detail::str("rank ", q, " (world rank ", world_rank(q), ") ",
                                      world_->describe_rank(world_rank(q)));
        }
        const double secs = std::chrono::duration<double>(now - start).count();
        throw TimeoutError(tessera::detail::str(
            describe(what), " on ", comm_name, " (rank ", r, " of ", size_, ") ",
            any_finished ? "can never complete" : "timed out", " after ", secs,
            " s; ranks that never arrived: ", who));
      }
      cv_.wait_for(lk, std::min<std::chrono::steady_clock::duration>(deadline - now, std::chrono::milliseconds(20)));
    }
  }

  /// Takes rank r's arrival back (under mu_, the barrier not complete): a rank that gives up
  /// must not let the last peer to arrive complete the rendezvous alone and read its buffer.
  void leave(int r) {
    if (here_[static_cast<std::size_t>(r)]) {
      here_[static_cast<std::size_t>(r)] = 0;
      --arrived_;
    }
  }

  /// Throws AbortedError describing the first failure of the run.
  [[noreturn]] void throw_aborted(int r, const Signature& what, const std::string& comm_name) const {
    throw AbortedError(tessera::detail::str("world rank ", world_->abort_rank(), " failed, so ",
                                            describe(what), " on ", comm_name, " (rank ", r,
                                            ") cannot complete. The failure: ", world_->abort_message()));
  }

  /// After the arrival barrier: checks every rank called the same thing; throws MismatchError
  /// (the same on every rank) naming the first two that differ.
  void check_signatures(int r, const std::string& comm_name) const {
    const Signature& s0 = slots_[0].sig;
    for (int q = 1; q < size_; ++q) {
      const Signature& sq = slots_[static_cast<std::size_t>(q)].sig;
      if (!s0.matches(sq))
        throw MismatchError(tessera::detail::str("collective mismatch on ", comm_name, ": rank 0 called ",
                                                 describe(s0), " but rank ", q, " called ", describe(sq),
                                                 " (seen by rank ", r, ")"));
    }
  }

  // ---- point-to-point -------------------------------------------------------------------
  /// Eager send: delivers into a posted receive if one matches, else queues a copy.
  /// Throws CommError if a posted receive expects another count or type.
  void deliver(int src, int dst, int tag, const void* data, std::size_t count, DType t) {
    std::unique_lock lk(mu_);
    auto& posted = posted_[{src, dst, tag}];
    if (!posted.empty()) {
      PostedRecv pr = posted.front();
      posted.pop_front();
      if (pr.count != count || pr.dtype != t) {
        *pr.error = tessera::detail::str("recv on ", name_, ": rank ", dst, " expected ", pr.count, " ",
                                         name_of(pr.dtype), " from rank ", src, " (tag ", tag,
                                         ") but the matching send has ", count, " ", name_of(t));
        pr.state->store(2, std::memory_order_release);
      } else {
        if (count) std::memcpy(pr.data, data, count * size_of(t));
        pr.state->store(1, std::memory_order_release);
      }
      lk.unlock();
      cv_.notify_all();
      return;
    }
    Message m{t, count, std::vector<std::byte>(count * size_of(t))};
    if (count) std::memcpy(m.bytes.data(), data, m.bytes.size());
    mail_[{src, dst, tag}].push_back(std::move(m));
  }

  /// Posts a receive: completes it at once from a queued message, or leaves it for the sender.
  PostedRecv post_recv(int src, int dst, int tag, void* data, std::size_t count, DType t) {
    PostedRecv pr{data, t, count, tag, std::make_shared<std::atomic<int>>(0), std::make_shared<std::string>()};
    std::lock_guard lk(mu_);
    auto& box = mail_[{src, dst, tag}];
    if (!box.empty()) {
      Message m = std::move(box.front());
      box.pop_front();
      if (m.count != count || m.dtype != t) {
        *pr.error = tessera::detail::str("recv on ", name_, ": rank ", dst, " expected ", count, " ",
                                         name_of(t), " from rank ", src, " (tag ", tag,
                                         ") but the matching send has ", m.count, " ", name_of(m.dtype));
        pr.state->store(2);
      } else {
        if (count) std::memcpy(data, m.bytes.data(), m.bytes.size());
        pr.state->store(1);
      }
      return pr;
    }
    posted_[{src, dst, tag}].push_back(pr);
    return pr;
  }

  /// Waits for a posted receive (timeout/abort aware). Throws CommError on a count/type mismatch.
  void wait_recv(int r, int src, const PostedRecv& pr, const Signature& what, const std::string& comm_name,
                 std::chrono::milliseconds timeout) {
    const auto start = std::chrono::steady_clock::now();
    std::unique_lock lk(mu_);
    // A receive given up (abort, timeout) is withdrawn under the lock first, so that no later
    // send writes into the buffer its caller is about to free.
    auto withdraw = [&] {
      auto it = posted_.find({src, r, pr.tag});
      if (it == posted_.end()) return;
      std::erase_if(it->second, [&](const PostedRecv& q) { return q.state == pr.state; });
    };
    while (pr.state->load(std::memory_order_acquire) == 0) {
      if (world_->aborted()) {
        withdraw();
        lk.unlock();
        throw_aborted(r, what, comm_name);
      }
      const auto now = std::chrono::steady_clock::now();
      const bool gone = world_->finished(world_rank(src));
      if (gone || now - start >= timeout) {
        withdraw();
        lk.unlock();
        throw TimeoutError(tessera::detail::str(
            describe(what), " on ", comm_name, " (rank ", r, ") ", gone ? "can never complete" : "timed out",
            " after ", std::chrono::duration<double>(now - start).count(), " s: rank ", src, " (world rank ",
            world_rank(src), ") ", world_->describe_rank(world_rank(src)), " and never sent tag ", pr.tag));
      }
      cv_.wait_for(lk, std::chrono::milliseconds(20));
    }
    if (pr.state->load() == 2) throw CommError(*pr.error);
  }

  void notify() {
    { std::lock_guard lk(mu_); }
    cv_.notify_all();
  }

 private:
  World* world_;
  std::vector<int> world_ranks_;
  std::string name_;
  int size_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::atomic<std::uint64_t> generation_{0};
  std::vector<char> here_;
  std::vector<Slot> slots_;
  std::map<std::tuple<int, int, int>, std::deque<Message>> mail_;
  std::map<std::tuple<int, int, int>, std::deque<PostedRecv>> posted_;
};

inline void World::abort(int r, const std::string& message) {
  {
    std::lock_guard lk(mu_);
    if (abort_rank_ < 0) {
      abort_rank_ = r;
      abort_message_ = message;
    }
  }
  aborted_.store(true, std::memory_order_release);
  notify_all_groups();
}

inline void World::finish(int r) {
  {
    std::lock_guard lk(mu_);
    status_[static_cast<std::size_t>(r)].finished = true;
  }
  notify_all_groups();
}

inline std::shared_ptr<Group> World::make_group(std::vector<int> world_ranks, std::string name) {
  auto g = std::make_shared<Group>(this, std::move(world_ranks), std::move(name));
  std::lock_guard lk(mu_);
  groups_.push_back(g);
  return g;
}

inline void World::notify_all_groups() {
  std::vector<std::shared_ptr<Group>> gs;
  {
    std::lock_guard lk(mu_);
    gs = groups_;
  }
  for (auto& g : gs) g->notify();
}

}  // namespace tessera::threads::detail
