#pragma once
/// @file
/// An instrumented communicator: wraps any Comm and counts every call and the bytes it moves,
/// so tests can assert exactly which collectives a policy inserted.

#include <array>
#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>

#include "tessera/comm/communicator.hpp"

namespace tessera::testing {

/// The kinds of communication the instrumented communicator counts.
enum class CallKind { all_reduce, all_gather, reduce_scatter, broadcast, send, recv, barrier, split, count_ };

/// Calls and bytes per CallKind, as seen by one rank. Bytes are the rank's input buffer size:
/// all_reduce and broadcast the buffer, all_gather the input block (count per rank),
/// reduce_scatter the whole input (count * size), send/recv the message.
struct CommCounters {
  /// Number of calls of `k` (blocking and non-blocking together).
  std::size_t calls(CallKind k) const {
    std::lock_guard lk(mu_);
    return calls_[static_cast<std::size_t>(k)];
  }
  /// Bytes moved by calls of `k` (see the struct's doc for what counts).
  std::size_t bytes(CallKind k) const {
    std::lock_guard lk(mu_);
    return bytes_[static_cast<std::size_t>(k)];
  }
  /// Elements (bytes / element size) summed over calls of `k`.
  std::size_t elements(CallKind k) const {
    std::lock_guard lk(mu_);
    return elems_[static_cast<std::size_t>(k)];
  }
  /// Sets every counter to zero.
  void reset() {
    std::lock_guard lk(mu_);
    calls_.fill(0);
    bytes_.fill(0);
    elems_.fill(0);
  }
  /// Records one call (used by InstrumentedComm).
  void record(CallKind k, std::size_t count, DType t) {
    std::lock_guard lk(mu_);
    calls_[static_cast<std::size_t>(k)] += 1;
    bytes_[static_cast<std::size_t>(k)] += count * size_of(t);
    elems_[static_cast<std::size_t>(k)] += count;
  }

 private:
  static constexpr std::size_t N = static_cast<std::size_t>(CallKind::count_);
  mutable std::mutex mu_;
  std::array<std::size_t, N> calls_{}, bytes_{}, elems_{};
};

/// A CommBackend that forwards to another and records every call in a CommCounters.
/// Communicators made by split() are instrumented too and share the same counters.
class InstrumentedComm final : public CommBackend {
 public:
  /// Wraps `inner`; counts go to `counters`.
  InstrumentedComm(std::shared_ptr<CommBackend> inner, std::shared_ptr<CommCounters> counters)
      : inner_(std::move(inner)), counters_(std::move(counters)) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string name() const override { return inner_->name(); }
  void set_name(std::string n) override { inner_->set_name(std::move(n)); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  void set_timeout(std::chrono::milliseconds t) override { inner_->set_timeout(t); }

  Request all_reduce(void* d, std::size_t n, DType t, ReduceOp op, bool async) override {
    counters_->record(CallKind::all_reduce, n, t);
    return inner_->all_reduce(d, n, t, op, async);
  }
  Request all_gather(const void* in, void* out, std::size_t n, DType t, bool async) override {
    counters_->record(CallKind::all_gather, n, t);
    return inner_->all_gather(in, out, n, t, async);
  }
  Request reduce_scatter(const void* in, void* out, std::size_t n, DType t, ReduceOp op, bool async) override {
    counters_->record(CallKind::reduce_scatter, n * static_cast<std::size_t>(size()), t);
    return inner_->reduce_scatter(in, out, n, t, op, async);
  }
  void broadcast(void* d, std::size_t n, DType t, int root) override {
    counters_->record(CallKind::broadcast, n, t);
    inner_->broadcast(d, n, t, root);
  }
  Request send(const void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    counters_->record(CallKind::send, n, t);
    return inner_->send(d, n, t, peer, tag, async);
  }
  Request recv(void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    counters_->record(CallKind::recv, n, t);
    return inner_->recv(d, n, t, peer, tag, async);
  }
  Request batch_p2p(std::span<const P2POp> ops) override {
    for (const P2POp& op : ops)
      counters_->record(op.kind == P2POp::Kind::send ? CallKind::send : CallKind::recv, op.count, op.dtype);
    return inner_->batch_p2p(ops);
  }
  void barrier() override {
    counters_->record(CallKind::barrier, 0, DType::f32);
    inner_->barrier();
  }
  std::shared_ptr<CommBackend> split(int color, int key) override {
    counters_->record(CallKind::split, 0, DType::f32);
    return std::make_shared<InstrumentedComm>(inner_->split(color, key), counters_);
  }

 private:
  std::shared_ptr<CommBackend> inner_;
  std::shared_ptr<CommCounters> counters_;
};

/// Returns a Comm that forwards to `inner` and counts into `counters` (which it shares).
inline Comm instrument(const Comm& inner, std::shared_ptr<CommCounters> counters) {
  return Comm(std::make_shared<InstrumentedComm>(inner.backend_ptr(), std::move(counters)));
}

}  // namespace tessera::testing
