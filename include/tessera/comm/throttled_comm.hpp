#pragma once
/// @file
/// A bandwidth-limited communicator: wraps any Comm and makes each transfer take at least the
/// time a link of the given bandwidth and latency would need (the alpha-beta, or Hockney,
/// model: latency per message step + bytes / bandwidth, with the ring algorithms' volumes), so
/// a benchmark on one machine can ask what data parallelism costs over a 10 Gb/s or a 1 Gb/s
/// network. It also counts the bytes this rank sends.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/request.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"

namespace tessera {

/// A link: bandwidth and latency of every rank's connection (full duplex).
struct LinkModel {
  double bandwidth_gbit_s = 10.0;  ///< bandwidth in Gb/s (10^9 bits per second); > 0
  double latency_s = 0.0;          ///< latency per message step in seconds (alpha); >= 0
};

/// What a ThrottledComm has done on one rank (shared by the communicators split from it).
/// Not synchronized: one rank's thread uses it.
struct LinkCounters {
  std::int64_t bytes_sent = 0;   ///< bytes this rank put on its link (ring-model volumes)
  std::int64_t calls = 0;        ///< communication calls
  double link_seconds = 0;       ///< modeled link time of those calls, summed
};

namespace detail {

// The shared state of one rank's link: counters, and when the link is next free (transfers
// issued back to back queue behind each other, as on one network interface).
struct LinkState {
  LinkModel model;
  std::shared_ptr<LinkCounters> counters;
  std::chrono::steady_clock::time_point free_at{};
};

// A request that completes no earlier than the modeled end of its transfer.
class ThrottledRequest final : public RequestImpl {
 public:
  ThrottledRequest(Request inner, std::chrono::steady_clock::time_point end) : inner_(std::move(inner)), end_(end) {}
  void wait() override {
    inner_.wait();
    std::this_thread::sleep_until(end_);
  }
  bool test() override { return inner_.test() && std::chrono::steady_clock::now() >= end_; }

 private:
  Request inner_;
  std::chrono::steady_clock::time_point end_;
};

class ThrottledBackend final : public CommBackend {
 public:
  ThrottledBackend(std::shared_ptr<CommBackend> inner, std::shared_ptr<LinkState> link)
      : inner_(std::move(inner)), link_(std::move(link)) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string name() const override { return inner_->name(); }
  void set_name(std::string n) override { inner_->set_name(std::move(n)); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  void set_timeout(std::chrono::milliseconds t) override { inner_->set_timeout(t); }

  Request all_reduce(void* d, std::size_t n, DType t, ReduceOp op, bool async) override {
    const double b = static_cast<double>(n * size_of(t)), p = size();
    return run(2 * (p - 1) / p * b, 2 * (p - 1), 2 * (p - 1) / p * b, async,
               [&] { return inner_->all_reduce(d, n, t, op, async); });
  }
  Request all_gather(const void* in, void* out, std::size_t n, DType t, bool async) override {
    const double b = static_cast<double>(n * size_of(t)), p = size();
    return run((p - 1) * b, p - 1, (p - 1) * b, async, [&] { return inner_->all_gather(in, out, n, t, async); });
  }
  Request reduce_scatter(const void* in, void* out, std::size_t n, DType t, ReduceOp op, bool async) override {
    const double b = static_cast<double>(n * size_of(t)), p = size();
    return run((p - 1) * b, p - 1, (p - 1) * b, async, [&] { return inner_->reduce_scatter(in, out, n, t, op, async); });
  }
  void broadcast(void* d, std::size_t n, DType t, int root) override {
    const double b = static_cast<double>(n * size_of(t));
    run(rank() == root ? b : 0.0, 1, b, false, [&] {
      inner_->broadcast(d, n, t, root);
      return Request();
    });
  }
  Request send(const void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    const double b = static_cast<double>(n * size_of(t));
    return run(b, 1, b, async, [&] { return inner_->send(d, n, t, peer, tag, async); });
  }
  Request recv(void* d, std::size_t n, DType t, int peer, int tag, bool async) override {
    const double b = static_cast<double>(n * size_of(t));
    return run(0.0, 1, b, async, [&] { return inner_->recv(d, n, t, peer, tag, async); });
  }
  Request batch_p2p(std::span<const P2POp> ops) override {
    double sent = 0, received = 0;
    for (const P2POp& op : ops) (op.kind == P2POp::Kind::send ? sent : received) += static_cast<double>(op.count * size_of(op.dtype));
    return run(sent, 1, std::max(sent, received), true, [&] { return inner_->batch_p2p(ops); });
  }
  void barrier() override {
    run(0.0, 1, 0.0, false, [&] {
      inner_->barrier();
      return Request();
    });
  }
  std::shared_ptr<CommBackend> split(int color, int key) override {
    return std::make_shared<ThrottledBackend>(inner_->split(color, key), link_);
  }

 private:
  // Issues `call`, counting `sent` bytes; the transfer occupies the link for `steps` latencies
  // plus `on_link` bytes at the bandwidth, starting when the link is free.
  template <class F>
  Request run(double sent, double steps, double on_link, bool async, F&& call) {
    using clock = std::chrono::steady_clock;
    LinkState& l = *link_;
    const double seconds = size() > 1 ? steps * l.model.latency_s + on_link * 8.0 / (l.model.bandwidth_gbit_s * 1e9) : 0.0;
    const clock::time_point start = std::max(clock::now(), l.free_at);
    const clock::time_point end = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
    l.free_at = end;
    l.counters->bytes_sent += static_cast<std::int64_t>(sent);
    l.counters->calls += 1;
    l.counters->link_seconds += seconds;
    Request r = call();
    if (async) return Request(std::make_shared<ThrottledRequest>(std::move(r), end));
    r.wait();
    std::this_thread::sleep_until(end);
    return Request();
  }

  std::shared_ptr<CommBackend> inner_;
  std::shared_ptr<LinkState> link_;
};

}  // namespace detail

/// A Comm that forwards every call to `inner` and completes it no earlier than a link of
/// `link` would (see the file comment): per call, latency x message steps + bytes / bandwidth,
/// with the ring algorithms' per-rank volumes (all-reduce of B bytes over p ranks:
/// 2(p - 1) steps and 2(p - 1)/p B; all-gather of B per rank and reduce-scatter to B per
/// rank: p - 1 steps and (p - 1) B; broadcast, send, recv: one step and B; a batch of
/// point-to-point operations: one step and the larger of its sent and received bytes).
/// Transfers of one rank queue behind each other on its link; blocking calls sleep until their
/// transfer's end, non-blocking ones complete no earlier. `counters` receives the bytes sent
/// and the modeled time; split communicators share the link and the counters. Local. Throws
/// tessera::Error for a bandwidth that is not positive or a negative latency.
inline Comm throttled(const Comm& inner, const LinkModel& link, std::shared_ptr<LinkCounters> counters) {
  TESSERA_EXPECTS(link.bandwidth_gbit_s > 0 && link.bandwidth_gbit_s < 1e30, "throttled: bandwidth ",
                  link.bandwidth_gbit_s, " Gb/s must be a positive number");
  TESSERA_EXPECTS(link.latency_s >= 0 && link.latency_s < 1e30, "throttled: latency ", link.latency_s,
                  " s must be >= 0");
  TESSERA_EXPECTS(counters != nullptr, "throttled: the counters are null");
  auto state = std::make_shared<detail::LinkState>();
  state->model = link;
  state->counters = std::move(counters);
  return Comm(std::make_shared<detail::ThrottledBackend>(inner.backend_ptr(), std::move(state)));
}

}  // namespace tessera
