#pragma once
/// @file
/// A timed communicator: wraps any Comm and adds the wall time of its blocking calls to a
/// shared counter, so a training loop can report the share of a step spent communicating on
/// one axis (Hybrid's progress figures).

#include <chrono>
#include <memory>
#include <span>
#include <string>

#include "tessera/comm/communicator.hpp"

namespace tessera {

/// Seconds spent in the blocking calls of a TimedComm (and of the communicators split from
/// it). Not synchronized: one rank's thread uses it.
struct CommTimer {
  double seconds = 0.0;  ///< accumulated wall time of blocking calls
};

namespace detail {
class TimedBackend final : public CommBackend {
 public:
  TimedBackend(std::shared_ptr<CommBackend> inner, std::shared_ptr<CommTimer> timer)
      : inner_(std::move(inner)), timer_(std::move(timer)) {}
  /// Runs fn, adding its wall time to the timer.
  template <class F>
  auto timed(F&& fn) -> decltype(fn()) {
    const auto t0 = std::chrono::steady_clock::now();
    auto r = fn();
    timer_->seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
  }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string name() const override { return inner_->name(); }
  void set_name(std::string n) override { inner_->set_name(std::move(n)); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  void set_timeout(std::chrono::milliseconds t) override { inner_->set_timeout(t); }
  Request all_reduce(void* d, std::size_t n, DType t, ReduceOp op, bool async) override {
    return timed([&] { return inner_->all_reduce(d, n, t, op, async); });
  }
  Request all_gather(const void* in, void* out, std::size_t n, DType t, bool async) override {
    return timed([&] { return inner_->all_gather(in, out, n, t, async); });
  }
  Request reduce_scatter(const void* in, void* out, std::size_t n, DType t, ReduceOp op, bool async) override {
    return timed([&] { return inner_->reduce_scatter(in, out, n, t, op, async); });
  }
  void broadcast(void* d, std::size_t n, DType t, int root) override {
    timed([&] {
      inner_->broadcast(d, n, t, root);
      return 0;
    });
  }
  Request send(const void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    return timed([&] { return inner_->send(d, n, t, peer, tag, async); });
  }
  Request recv(void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    return timed([&] { return inner_->recv(d, n, t, peer, tag, async); });
  }
  Request batch_p2p(std::span<const P2POp> ops) override {
    return timed([&] { return inner_->batch_p2p(ops); });
  }
  void barrier() override {
    timed([&] {
      inner_->barrier();
      return 0;
    });
  }
  std::shared_ptr<CommBackend> split(int color, int key) override {
    return std::make_shared<TimedBackend>(inner_->split(color, key), timer_);
  }

 private:
  std::shared_ptr<CommBackend> inner_;
  std::shared_ptr<CommTimer> timer_;
};
}  // namespace detail

/// A Comm that forwards every call to `inner` and adds the wall time of each call (the whole
/// call for blocking ones; only the issue for non-blocking ones, whose wait is not seen) to
/// `timer`, which it shares with the communicators split from it. Local.
inline Comm timed(const Comm& inner, std::shared_ptr<CommTimer> timer) {
  return Comm(std::make_shared<detail::TimedBackend>(inner.backend_ptr(), std::move(timer)));
}

}  // namespace tessera
