#pragma once
// Parameter-server test bodies, written once as functions of `tessera::Comm&` so that the same
// bodies run on the threads backend (tests/ps/test_parameter_server.cpp) and under mpirun
// (tests/ps/test_parameter_server_mpi.cpp). A body returns what its rank saw; the checks run on
// the main thread (threads) or on each rank against a serial run computed there (MPI).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/random.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/nn/mlp.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/parameter_server.hpp"

namespace ps_bodies {

using tessera::Comm;
using tessera::ParameterList;
using tessera::ParameterServer;
using tessera::ParameterServerMode;
using tessera::ParameterServerStats;
using tessera::Shape;
using tessera::Tensor;

enum class Opt { sgd_momentum, adamw };

// One training run: model width d (an MLP d -> 4d -> d, 20 d^2 + 5 d parameters), a global
// batch of `batch` rows per step split over the workers in contiguous, possibly unequal
// blocks, `steps` optimizer steps.
struct Config {
  int num_servers = 1;
  ParameterServerMode mode = ParameterServerMode::sync;
  int staleness = 0;
  int steps = 5;
  int batch = 9;
  int d = 4;
  Opt opt = Opt::adamw;
  int slow_worker = -1;            // this worker sleeps slow_ms before every push
  int slow_ms = 0;
  std::vector<int> worker_steps{};  // per worker: steps it runs (default: all run `steps`)
  bool explicit_finish = true;     // false: rely on the destructor's "done"
  int busy_ms = -1;                 // >= 0: push, pull, sleep busy_ms (no communication), wait;
                                    // -1: step()
  // Threads only: every worker's clock, set just before each push (so it is never behind
  // what a server has seen); used to measure the staleness independently of the servers.
  std::atomic<std::int64_t>* clocks = nullptr;
};

// Rows [lo, hi) of the global batch belong to worker w of W.
inline std::int64_t rows_begin(int batch, int w, int W) { return static_cast<std::int64_t>(batch) * w / W; }

template <class T>
Tensor<T> normal(const Shape& s, std::uint64_t seed, const std::string& name, double std = 1.0) {
  Tensor<T> t = Tensor<T>::empty(s);
  tessera::fill_normal(t, seed, name, std);
  return t;
}

// Inputs and targets of global step t (from 1): (batch, d) each.
template <class T>
Tensor<T> batch_x(const Config& c, int t) {
  return normal<T>(Shape{c.batch, c.d}, 11, "x." + std::to_string(t));
}
template <class T>
Tensor<T> batch_y(const Config& c, int t) {
  return normal<T>(Shape{c.batch, c.d}, 12, "y." + std::to_string(t));
}

// The model, with weights large enough that GELU is not linear. Rank-dependent seeds on
// purpose: the parameter server must start every rank from world rank 0's values.
template <class T>
tessera::nn::MLP<T> make_mlp(const Config& c, std::uint64_t seed) {
  return tessera::nn::MLP<T>(c.d, tessera::nn::LayerInit{.seed = seed, .std = 0.5});
}

// Adds the gradient of 0.5 * sum over rows of ||mlp(x) - y||^2 (a SUM loss) to the grads.
template <class T>
void accumulate_grad(tessera::nn::MLP<T>& m, const Tensor<T>& x, const Tensor<T>& y) {
  auto [out, ctx] = m.forward(x);
  Tensor<T> dy = out.clone();
  dy.add_(y, T{-1});
  m.backward(dy, ctx);
}

// An optimizer of either kind, for whatever parameters it is given.
template <class T>
struct AnyOpt {
  std::optional<tessera::optim::SGD<T>> sgd;
  std::optional<tessera::optim::AdamW<T>> adamw;
  AnyOpt(const ParameterList<T>& ps, Opt o) {
    if (o == Opt::sgd_momentum)
      sgd.emplace(ps, tessera::optim::SGDOptions{.lr = 0.05, .momentum = 0.9, .weight_decay = 0.01});
    else
      adamw.emplace(ps, tessera::optim::AdamWOptions{.lr = 0.01, .weight_decay = 0.1});
  }
  void step() {
    if (sgd) sgd->step();
    if (adamw) adamw->step();
  }
};

template <class T>
std::vector<T> flatten(const ParameterList<T>& ps) {
  std::vector<T> out;
  for (const tessera::Parameter<T>& p : ps) {
    const Tensor<T> v = p.value.contiguous();
    out.insert(out.end(), v.data(), v.data() + v.numel());
  }
  return out;
}

// Steps a worker runs.
inline int steps_of(const Config& c, int w) {
  return c.worker_steps.empty() ? c.steps : c.worker_steps[static_cast<std::size_t>(w)];
}

// The serial reference: one process, the global batch of every step (only the rows of the
// workers still running at that step), the mean gradient g = (sum of per-row gradients) * (1/N),
// the same optimizer. Returns the parameters after the last step, flattened.
template <class T>
std::vector<T> serial_run(const Config& c, int num_workers) {
  auto m = make_mlp<T>(c, 1000);
  const ParameterList<T> ps = m.parameters();
  AnyOpt<T> opt(ps, c.opt);
  int last = 0;
  for (int w = 0; w < num_workers; ++w) last = std::max(last, steps_of(c, w));
  for (int t = 1; t <= last; ++t) {
    ps.zero_grad();
    const Tensor<T> x = batch_x<T>(c, t), y = batch_y<T>(c, t);
    std::int64_t n = 0;
    for (int w = 0; w < num_workers; ++w) {
      if (t > steps_of(c, w)) continue;
      const std::int64_t lo = rows_begin(c.batch, w, num_workers), hi = rows_begin(c.batch, w + 1, num_workers);
      if (hi == lo) continue;
      accumulate_grad(m, x.slice(0, lo, hi), y.slice(0, lo, hi));
      n += hi - lo;
    }
    for (tessera::Parameter<T>& p : ps) p.grad.scale_(static_cast<T>(1.0 / static_cast<double>(n)));
    opt.step();
  }
  return flatten(ps);
}

// What one rank of a parameter-server run saw.
template <class T>
struct RankResult {
  bool server = false;
  int index = -1;              // worker or server index
  std::vector<T> values;       // worker: its parameters, flattened; server: its shard
  std::int64_t key_begin = 0;  // server: first key of its shard
  ParameterServerStats stats{};
  std::int64_t max_gap_seen = 0;  // worker, threads only: max over pulls of my clock - min of all clocks
  std::string error;              // an error a body caught on purpose
};

// The parameter-server run of Config `c` on `world`. Worker w holds rows [rows_begin(w),
// rows_begin(w + 1)) of each global batch.
template <class T>
RankResult<T> ps_run(Comm& world, const Config& c) {
  auto m = make_mlp<T>(c, world.rank() == 0 ? 1000 : 2000 + static_cast<std::uint64_t>(world.rank()));
  std::optional<ParameterServer<T>> ps;
  ps.emplace(world, m.parameters(),
             tessera::ParameterServerOptions{.num_servers = c.num_servers, .mode = c.mode, .staleness = c.staleness});
  RankResult<T> r;
  if (ps->is_server()) {
    AnyOpt<T> opt(ps->shard_parameters(), c.opt);
    r.server = true;
    r.index = ps->server_index();
    r.stats = ps->serve(opt);
    r.values = flatten(ps->shard_parameters());
    r.key_begin = ps->layout().key_begin(r.index);
    return r;
  }
  const int w = ps->worker_index(), W = ps->num_workers();
  const std::int64_t lo = rows_begin(c.batch, w, W), hi = rows_begin(c.batch, w + 1, W);
  const ParameterList<T> params = m.parameters();
  for (int t = 1; t <= steps_of(c, w); ++t) {
    params.zero_grad();
    if (hi > lo) accumulate_grad(m, batch_x<T>(c, t).slice(0, lo, hi), batch_y<T>(c, t).slice(0, lo, hi));
    if (w == c.slow_worker) std::this_thread::sleep_for(std::chrono::milliseconds(c.slow_ms));
    if (c.clocks) c.clocks[w].store(t);
    if (c.busy_ms >= 0) {
      const std::int64_t pushed = ps->push(params, hi - lo);
      const std::int64_t pulled = ps->pull(params);
      if (pulled != pushed + 1) r.error = "timestamps are not consecutive";
      std::this_thread::sleep_for(std::chrono::milliseconds(c.busy_ms));
      ps->wait(pulled);
    } else {
      ps->step(m, hi - lo);
    }
    if (c.clocks) {
      std::int64_t lowest = t;
      for (int q = 0; q < W; ++q) lowest = std::min(lowest, c.clocks[q].load());
      r.max_gap_seen = std::max(r.max_gap_seen, t - lowest);
    }
  }
  if (c.explicit_finish) ps->finish();
  r.stats = ps->stats();
  r.index = w;
  r.values = flatten(params);
  ps.reset();  // the destructor sends "done" when finish() was not called
  return r;
}

// A data-parallel step done by hand, as the reference the synchronous parameter server must
// equal: every rank of `comm` (the workers) computes the SUM-loss gradient of its rows, a SUM
// all-reduce in rank order, grad.scale_(static_cast<T>(1.0 / N)), the same optimizer on every
// rank. Returns the parameters after the last step, flattened.
template <class T>
std::vector<T> dp_reference_run(Comm& comm, const Config& c) {
  auto m = make_mlp<T>(c, 1000);
  const ParameterList<T> ps = m.parameters();
  AnyOpt<T> opt(ps, c.opt);
  const int w = comm.rank(), W = comm.size();
  const std::int64_t lo = rows_begin(c.batch, w, W), hi = rows_begin(c.batch, w + 1, W);
  for (int t = 1; t <= c.steps; ++t) {
    ps.zero_grad();
    if (hi > lo) accumulate_grad(m, batch_x<T>(c, t).slice(0, lo, hi), batch_y<T>(c, t).slice(0, lo, hi));
    for (tessera::Parameter<T>& p : ps) comm.all_reduce(p.grad.span());
    const std::int64_t n = c.batch;
    for (tessera::Parameter<T>& p : ps) p.grad.scale_(static_cast<T>(1.0 / static_cast<double>(n)));
    opt.step();
  }
  return flatten(ps);
}

// ||a - b|| / max(||a||, ||b||).
template <class T>
double relative_error(const std::vector<T>& a, const std::vector<T>& b) {
  double num = 0, na = 0, nb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = a[i], y = b[i];
    num += (x - y) * (x - y);
    na += x * x;
    nb += y * y;
  }
  return std::sqrt(num) / std::max(std::sqrt(std::max(na, nb)), 1e-300);
}

// ---- linear regression (the asynchronous convergence check) ---------------------------------

// y = X w* + b*, X: (rows, 8) normal, w* normal, b* = 0.5; worker w owns a contiguous block of
// rows and runs full-batch gradient steps on it (a SUM loss, count = its rows).
struct Regression {
  int rows = 96;
  int features = 8;
  int steps = 60;
  int num_servers = 1;
  ParameterServerMode mode = ParameterServerMode::async;
  int staleness = 2;
  int slow_worker = -1;
  int slow_ms = 0;
  double lr = 0.2;
};

template <class T>
struct RegressionData {
  Tensor<T> x, y;
};

template <class T>
RegressionData<T> regression_data(const Regression& r) {
  RegressionData<T> d{normal<T>(Shape{r.rows, r.features}, 21, "x"), Tensor<T>(Shape{r.rows, 1})};
  const Tensor<T> w = normal<T>(Shape{r.features, 1}, 22, "w");
  for (std::int64_t i = 0; i < r.rows; ++i) {
    T acc = T(0.5);
    for (std::int64_t k = 0; k < r.features; ++k) acc += d.x(i, k) * w(k, 0);
    d.y(i, 0) = acc;
  }
  return d;
}

// Mean over rows of 0.5 (x w + b - y)^2.
template <class T>
double regression_loss(tessera::nn::Linear<T>& lin, const RegressionData<T>& d) {
  auto [out, ctx] = lin.forward(d.x);
  double s = 0;
  for (std::int64_t i = 0; i < out.size(0); ++i) {
    const double e = out(i, 0) - d.y(i, 0);
    s += 0.5 * e * e;
  }
  return s / static_cast<double>(out.size(0));
}

// What a regression run reports: on a worker the full-data loss before the first and after the
// last step (with the values of its last pull), and the staleness it saw.
struct RegressionResult {
  bool server = false;
  double initial_loss = 0, final_loss = 0;
  ParameterServerStats stats{};
};

template <class T>
RegressionResult regression_run(Comm& world, const Regression& r) {
  const RegressionData<T> data = regression_data<T>(r);
  tessera::nn::Linear<T> lin(r.features, 1, tessera::nn::LayerInit{.seed = 5, .std = 0.1});
  ParameterServer<T> ps(world, lin.parameters(),
                        {.num_servers = r.num_servers, .mode = r.mode, .staleness = r.staleness});
  RegressionResult out;
  if (ps.is_server()) {
    tessera::optim::SGD<T> opt(ps.shard_parameters(), {.lr = r.lr});
    out.server = true;
    out.stats = ps.serve(opt);
    return out;
  }
  const int w = ps.worker_index(), W = ps.num_workers();
  const std::int64_t lo = rows_begin(r.rows, w, W), hi = rows_begin(r.rows, w + 1, W);
  const Tensor<T> x = data.x.slice(0, lo, hi), y = data.y.slice(0, lo, hi);
  out.initial_loss = regression_loss(lin, data);
  for (int t = 1; t <= r.steps; ++t) {
    lin.parameters().zero_grad();
    auto [pred, ctx] = lin.forward(x);
    Tensor<T> dy = pred.clone();
    dy.add_(y, T{-1});
    lin.backward(dy, ctx);
    if (w == r.slow_worker) std::this_thread::sleep_for(std::chrono::milliseconds(r.slow_ms));
    ps.step(lin, hi - lo);
  }
  ps.finish();
  out.final_loss = regression_loss(lin, data);
  out.stats = ps.stats();
  return out;
}

}  // namespace ps_bodies
