#pragma once
// The model of the DataParallel benchmarks (bench/dp/dp_bench.cpp on threads,
// bench/dp/dp_bench_mpi.cpp on MPI processes) and one timed training loop over any Comm: an MLP of
// 4 x (Linear(1024, 1024) + ReLU), batch 64 per rank, SGD, the loss 0.5 * sum (y - t)^2 normalized
// by the global sample count. bench/dp/torch_ddp.py is the same model in PyTorch.
//
// Every timed run also returns the parameters it ends with, so that the benchmarks check what
// they timed: after the same number of steps, DataParallel on n ranks must have applied the same
// updates as the bare model trained on the global batch (the n ranks' inputs stacked), and every
// replica must hold the same bits. A DataParallel that skipped or botched the all-reduce would
// run faster and fail this check.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <span>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/random.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/testing/compare.hpp"

namespace dp_bench {

using namespace tessera;
using Clock = std::chrono::steady_clock;

constexpr std::int64_t width = 1024, batch = 64, depth = 4;

// y = max(x, 0).
struct ReLU {
  static Tensor<float> forward(const Tensor<float>& x) {
    Tensor<float> y = Tensor<float>::empty(x.shape());
    const float* a = x.data();
    float* b = y.data();
    for (std::int64_t i = 0; i < x.numel(); ++i) b[i] = a[i] > 0 ? a[i] : 0.0f;
    return y;
  }
  // dx = dy where the output was positive (dy is consumed in place).
  static Tensor<float> backward(Tensor<float> dy, const Tensor<float>& y) {
    float* g = dy.data();
    const float* o = y.data();
    for (std::int64_t i = 0; i < dy.numel(); ++i)
      if (o[i] <= 0) g[i] = 0;
    return dy;
  }
};

// 4 x (Linear(1024, 1024) + ReLU): a user-defined Layer.
class Mlp {
 public:
  using Input = Tensor<float>;
  struct Context {
    std::vector<nn::Linear<float>::Context> linear;
    std::vector<Tensor<float>> relu_out;
  };
  explicit Mlp(std::uint64_t seed) {
    for (std::int64_t i = 0; i < depth; ++i)
      layers_.emplace_back(width, width, nn::LayerInit{.prefix = "fc" + std::to_string(i), .seed = seed, .std = 0.03});
  }
  ForwardResult<Tensor<float>, Context> forward(const Tensor<float>& x) const {
    Context c;
    Tensor<float> h = x;
    for (const auto& l : layers_) {
      auto [y, lc] = l.forward(h);
      c.linear.push_back(std::move(lc));
      h = ReLU::forward(y);
      c.relu_out.push_back(h);
    }
    return {std::move(h), std::move(c)};
  }
  Tensor<float> backward(const Tensor<float>& dy, const Context& c) {
    Tensor<float> g = dy.clone();
    for (std::size_t i = layers_.size(); i-- > 0;) g = layers_[i].backward(ReLU::backward(g, c.relu_out[i]), c.linear[i]);
    return g;
  }
  ParameterList<float> parameters() {
    ParameterList<float> ps;
    for (auto& l : layers_) ps.append(l.parameters());
    return ps;
  }

 private:
  std::vector<nn::Linear<float>> layers_;
};

// Loss 0.5 * sum (y - t)^2 * scale: its gradient (y - t) * scale.
inline Tensor<float> loss_grad(const Tensor<float>& y, const Tensor<float>& t, float scale) {
  Tensor<float> g = Tensor<float>::empty(y.shape());
  for (std::int64_t i = 0; i < y.numel(); ++i) g.data()[i] = (y.data()[i] - t.data()[i]) * scale;
  return g;
}

inline Tensor<float> random(const Shape& s, std::uint64_t seed, const char* name) {
  Tensor<float> t = Tensor<float>::empty(s);
  fill_normal(t, seed, name, 1.0);
  return t;
}

// What one timed training run leaves: seconds per timed step and the parameters after its last
// step, flattened in parameter order.
struct RunResult {
  double seconds = 0;
  std::vector<float> params;
};

inline std::vector<float> flatten(const ParameterList<float>& ps) {
  std::vector<float> flat;
  for (const auto& p : ps) {
    const Tensor<float> v = p.value.contiguous();
    flat.insert(flat.end(), v.data(), v.data() + v.numel());
  }
  return flat;
}

// The input of rank `rank`: (batch, width); the target is the same on every rank.
inline Tensor<float> rank_input(int rank) {
  return random(Shape{batch, width}, 2 + static_cast<std::uint64_t>(rank), "x");
}
inline Tensor<float> target() { return random(Shape{batch, width}, 3, "t"); }

// The bare model on this thread, trained on the global batch of `ranks` ranks (their inputs
// stacked: (ranks * batch, width)), the loss normalized by ranks * batch. ranks = 1: the
// bare-model baseline that is timed; ranks = n: the reference for DataParallel on n ranks.
inline RunResult serial_run(int ranks, int steps, int warmup) {
  Mlp model(1);
  optim::SGD<float> opt(model.parameters(), {.lr = 1e-3});
  const std::int64_t rows = ranks * batch;
  const Tensor<float> x = Tensor<float>::empty(Shape{rows, width}), t = Tensor<float>::empty(Shape{rows, width});
  const Tensor<float> t1 = target();
  for (int r = 0; r < ranks; ++r) {
    const Tensor<float> xr = rank_input(r);
    std::copy(xr.data(), xr.data() + xr.numel(), x.data() + r * batch * width);
    std::copy(t1.data(), t1.data() + t1.numel(), t.data() + r * batch * width);
  }
  Clock::time_point t0;
  for (int s = 0; s < warmup + steps; ++s) {
    if (s == warmup) t0 = Clock::now();
    auto [y, ctx] = model.forward(x);
    model.backward(loss_grad(y, t, 1.0f / static_cast<float>(rows)), ctx);
    opt.step();
    model.parameters().zero_grad();
  }
  const double sec = std::chrono::duration<double>(Clock::now() - t0).count() / steps;
  return {sec, flatten(model.parameters())};
}

// The parameters of the untrained model (every run starts from them).
inline std::vector<float> initial_params() { return flatten(Mlp(1).parameters()); }

// ||(got - init) - (want - init)|| / max(||got - init||, ||want - init||): the error of the
// updates that a run applied, against the reference's (the parameters themselves hardly move in
// 20 steps, so comparing them would hide a wrong gradient); +infinity on anything non-finite.
inline double update_error(const std::vector<float>& got, const std::vector<float>& want, const std::vector<float>& init) {
  if (got.size() != init.size() || want.size() != init.size()) return testing::infinite_error;
  std::vector<double> dg(init.size()), dw(init.size());
  for (std::size_t i = 0; i < init.size(); ++i) {
    dg[i] = static_cast<double>(got[i]) - init[i];
    dw[i] = static_cast<double>(want[i]) - init[i];
  }
  return testing::norm_rel_error(std::span<const double>(dg), std::span<const double>(dw));
}

// Tolerance of update_error: the reduced gradient sums the ranks' halves in another order than
// the serial GEMM, so the updates differ by fp32 round-off (seen about 1e-7 to 1e-6, the
// parameters' rounding in SGD included); a missing or wrong reduction is an error of order 1.
inline constexpr double update_tolerance = 1e-4;

// DataParallel on this rank of `world`: seconds per step (timed between two barriers) and this
// replica's parameters after the last step.
inline RunResult dp_run(Comm& world, const DataParallelOptions& o, int steps, int warmup) {
  DataParallel dp(Mlp(1), world, o);
  optim::SGD<float> opt(dp.parameters(), {.lr = 1e-3});
  const Tensor<float> x = rank_input(world.rank());
  const Tensor<float> t = target();
  Clock::time_point t0;
  for (int s = 0; s < warmup + steps; ++s) {
    if (s == warmup) {
      world.barrier();
      t0 = Clock::now();
    }
    const float scale = static_cast<float>(dp.loss_scale(batch));
    auto [y, ctx] = dp.forward(x);
    dp.backward(loss_grad(y, t, scale), ctx);
    opt.step();
    dp.zero_grad();
  }
  world.barrier();
  const double sec = std::chrono::duration<double>(Clock::now() - t0).count() / steps;
  return {sec, flatten(dp.parameters())};
}

// Seconds of one all_reduce of the model's gradient (4 x (1024^2 + 1024) floats) on this rank.
inline double all_reduce_seconds(Comm& world, int steps, int warmup) {
  std::vector<float> g(static_cast<std::size_t>(depth * (width * width + width)), 1.0f);
  Clock::time_point t0;
  for (int s = 0; s < warmup + steps; ++s) {
    if (s == warmup) {
      world.barrier();
      t0 = Clock::now();
    }
    world.iall_reduce(g).wait();
  }
  return std::chrono::duration<double>(Clock::now() - t0).count() / steps;
}

}  // namespace dp_bench
