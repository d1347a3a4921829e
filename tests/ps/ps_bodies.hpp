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
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/random.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/nn/mlp.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/ps/parameter_server.hpp"
#include "tessera/testing/compare.hpp"

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
  std::string error;           // an error a body caught on purpose
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
    if (c.busy_ms >= 0) {
      const std::int64_t pushed = ps->push(params, hi - lo);
      const std::int64_t pulled = ps->pull(params);
      if (pulled != pushed + 1) r.error = "timestamps are not consecutive";
      std::this_thread::sleep_for(std::chrono::milliseconds(c.busy_ms));
      ps->wait(pulled);
    } else {
      ps->step(m, hi - lo);
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

// ||a - b|| / max(||a||, ||b||); +infinity when either side holds a NaN or an infinity, or the
// sizes differ (tessera::testing::norm_rel_error).
template <class T>
double relative_error(const std::vector<T>& a, const std::vector<T>& b) {
  return tessera::testing::norm_rel_error(std::span<const T>(a), std::span<const T>(b));
}

// Whether a and b hold the same bits, every value finite (tessera::testing::bitwise_equal_finite).
template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return tessera::testing::bitwise_equal_finite(std::span<const T>(a), std::span<const T>(b));
}

// ---- linear regression (the asynchronous runs) ------------------------------------------------

// y = X w* + b*, X: (rows, 8) normal, w* normal, b* = 0.5; worker w owns a contiguous block of
// rows and runs full-batch gradient steps on it (a SUM loss, count = its rows).
struct Regression {
  int rows = 96;
  int features = 8;
  int steps = 60;
  int num_servers = 1;
  ParameterServerMode mode = ParameterServerMode::async;
  int staleness = 2;
  int slow_worker = -1;             // this worker sleeps slow_ms before every push
  int slow_ms = 0;
  double lr = 0.2;
  std::vector<int> worker_steps{};  // per worker: steps it runs (default: all run `steps`)
  // Threads only: every worker's clock, set just before each push (so it is never behind what
  // a server has seen) and set to "finished" (int64 max) just before finish().
  std::atomic<std::int64_t>* clocks = nullptr;
};

inline int steps_of(const Regression& r, int w) {
  return r.worker_steps.empty() ? r.steps : r.worker_steps[static_cast<std::size_t>(w)];
}

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

// The version probe: a parameter "version" appended to the model, zero at the start, whose
// gradient every worker sets to -1 per sample (its pushed SUM is -count), so that the mean
// gradient of every global step is -1 and the servers' SGD with lr 1 on it adds 1 per step:
// the values a pull returns from server s carry that server's global step count, read by the
// worker itself. Long enough (10 keys per server, the model has 9) that every server's
// contiguous key range holds some of it.
inline std::int64_t probe_length(int num_servers) { return 10 * static_cast<std::int64_t>(num_servers); }
inline constexpr const char* probe_name = "version";

// What a regression run reports: on a worker the full-data loss before the first and after the
// last step (with the values of its last pull), the counters, and what it observed itself.
struct RegressionResult {
  bool server = false;
  int index = -1;  // worker or server index
  double initial_loss = 0, final_loss = 0;
  ParameterServerStats stats{};
  // Worker: versions[t - 1][s] = the global step count of the values server s returned to the
  // pull at this worker's clock t, read off the version probe. Server: versions[0][0] = the
  // count read off its final shard.
  std::vector<std::vector<std::int64_t>> versions;
  std::int64_t max_gap_seen = 0;  // worker, threads only: max over pulls of my clock - min of the running clocks
  std::string error;              // what went wrong in the observation itself (empty: nothing)
};

// Reads the version probe's keys of server s (all of them must hold the same whole number).
template <class T>
std::int64_t probe_version(const std::vector<T>& flat, std::int64_t probe_begin, std::int64_t key_begin,
                           std::int64_t key_end, std::string& error) {
  const std::int64_t lo = std::max(probe_begin, key_begin), hi = key_end;
  if (lo >= hi) {
    error = "a server's key range holds no key of the version probe";
    return -1;
  }
  const double v = flat[static_cast<std::size_t>(lo)];
  const std::int64_t version = std::llround(v);
  for (std::int64_t k = lo; k < hi; ++k)
    if (!std::isfinite(static_cast<double>(flat[static_cast<std::size_t>(k)])) ||
        std::abs(static_cast<double>(flat[static_cast<std::size_t>(k)]) - static_cast<double>(version)) > 1e-3)
      error = "version probe key " + std::to_string(k) + " holds " + std::to_string(flat[static_cast<std::size_t>(k)]) +
              ", not the step count " + std::to_string(version) + " of key " + std::to_string(lo);
  return version;
}

template <class T>
RegressionResult regression_run(Comm& world, const Regression& r) {
  const RegressionData<T> data = regression_data<T>(r);
  tessera::nn::Linear<T> lin(r.features, 1, tessera::nn::LayerInit{.seed = 5, .std = 0.1});
  tessera::Parameter<T> probe(probe_name, Tensor<T>(Shape{probe_length(r.num_servers)}));
  ParameterList<T> params = lin.parameters();
  params.push_back(probe);
  std::int64_t probe_begin = 0;
  for (const tessera::Parameter<T>& p : lin.parameters()) probe_begin += p.value.numel();
  ParameterServer<T> ps(world, params, {.num_servers = r.num_servers, .mode = r.mode, .staleness = r.staleness});
  RegressionResult out;
  if (ps.is_server()) {
    ParameterList<T> model_part, probe_part;
    for (tessera::Parameter<T>& p : ps.shard_parameters()) (p.name == probe_name ? probe_part : model_part).push_back(p);
    struct Both {
      tessera::optim::SGD<T> model, probe;
      void step() {
        model.step();
        probe.step();
      }
    } opt{tessera::optim::SGD<T>(model_part, {.lr = r.lr}), tessera::optim::SGD<T>(probe_part, {.lr = 1.0})};
    out.server = true;
    out.index = ps.server_index();
    out.stats = ps.serve(opt);
    const std::int64_t lo = ps.layout().key_begin(out.index), hi = ps.layout().key_end(out.index);
    std::vector<T> flat(static_cast<std::size_t>(ps.layout().num_keys()), T(0));
    const std::vector<T> shard = flatten(ps.shard_parameters());
    std::copy(shard.begin(), shard.end(), flat.begin() + lo);
    out.versions = {{probe_version(flat, probe_begin, lo, hi, out.error)}};
    return out;
  }
  const int w = ps.worker_index(), W = ps.num_workers(), S = ps.num_servers();
  out.index = w;
  const std::int64_t lo = rows_begin(r.rows, w, W), hi = rows_begin(r.rows, w + 1, W);
  const Tensor<T> x = data.x.slice(0, lo, hi), y = data.y.slice(0, lo, hi);
  out.initial_loss = regression_loss(lin, data);
  for (int t = 1; t <= steps_of(r, w); ++t) {
    params.zero_grad();
    auto [pred, ctx] = lin.forward(x);
    Tensor<T> dy = pred.clone();
    dy.add_(y, T{-1});
    lin.backward(dy, ctx);
    probe.grad.fill(static_cast<T>(-(hi - lo)));
    if (w == r.slow_worker) std::this_thread::sleep_for(std::chrono::milliseconds(r.slow_ms));
    if (r.clocks) r.clocks[w].store(t);
    ps.step(params, hi - lo);
    const std::vector<T> flat = flatten(params);
    std::vector<std::int64_t>& seen = out.versions.emplace_back();
    for (int s = 0; s < S; ++s)
      seen.push_back(probe_version(flat, probe_begin, ps.layout().key_begin(s), ps.layout().key_end(s), out.error));
    if (r.clocks) {
      std::int64_t lowest = t;
      for (int q = 0; q < W; ++q) lowest = std::min(lowest, r.clocks[q].load());
      out.max_gap_seen = std::max(out.max_gap_seen, t - lowest);
    }
  }
  if (r.clocks) r.clocks[w].store(std::numeric_limits<std::int64_t>::max());
  ps.finish();
  out.final_loss = regression_loss(lin, data);
  out.stats = ps.stats();
  return out;
}

// The staleness a worker observed: for every pull (at its clock t) and server s,
// t - versions[t - 1][s], the number of its own steps the values it got lag behind.
struct ObservedStaleness {
  std::int64_t min = std::numeric_limits<std::int64_t>::max();  // over every pull and server
  std::vector<std::int64_t> max;  // per server: the largest (at least 0 once a pull happened)
  bool monotone = true;           // no server ever returned an older version than before
  std::int64_t pulls = 0;
};

inline ObservedStaleness observed_staleness(const RegressionResult& r, int num_servers) {
  ObservedStaleness o;
  o.max.assign(static_cast<std::size_t>(num_servers), std::numeric_limits<std::int64_t>::min());
  for (std::size_t i = 0; i < r.versions.size(); ++i) {
    const std::int64_t t = static_cast<std::int64_t>(i) + 1;
    for (int s = 0; s < num_servers; ++s) {
      const auto si = static_cast<std::size_t>(s);
      const std::int64_t v = r.versions[i][si];
      o.min = std::min(o.min, t - v);
      o.max[si] = std::max(o.max[si], t - v);
      if (i > 0 && v < r.versions[i - 1][si]) o.monotone = false;
    }
    ++o.pulls;
  }
  return o;
}

}  // namespace ps_bodies
