#pragma once
// The model of the DataParallel benchmarks (bench/dp/dp_bench.cpp on threads,
// bench/dp/dp_bench_mpi.cpp on MPI processes) and one timed training loop over any Comm: an MLP of
// 4 x (Linear(1024, 1024) + ReLU), batch 64 per rank, SGD, the loss 0.5 * sum (y - t)^2 normalized
// by the global sample count. bench/dp/torch_ddp.py is the same model in PyTorch.

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/random.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/data_parallel.hpp"

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

// Seconds per step of the bare model on this thread.
inline double serial_step(int steps, int warmup) {
  Mlp model(1);
  optim::SGD<float> opt(model.parameters(), {.lr = 1e-3});
  const Tensor<float> x = random(Shape{batch, width}, 2, "x"), t = random(Shape{batch, width}, 3, "t");
  Clock::time_point t0;
  for (int s = 0; s < warmup + steps; ++s) {
    if (s == warmup) t0 = Clock::now();
    auto [y, ctx] = model.forward(x);
    model.backward(loss_grad(y, t, 1.0f / batch), ctx);
    opt.step();
    model.parameters().zero_grad();
  }
  return std::chrono::duration<double>(Clock::now() - t0).count() / steps;
}

// Seconds per step of DataParallel on this rank of `world` (timed between two barriers).
inline double dp_step_seconds(Comm& world, const DataParallelOptions& o, int steps, int warmup) {
  DataParallel dp(Mlp(1), world, o);
  optim::SGD<float> opt(dp.parameters(), {.lr = 1e-3});
  const Tensor<float> x = random(Shape{batch, width}, 2 + static_cast<std::uint64_t>(world.rank()), "x");
  const Tensor<float> t = random(Shape{batch, width}, 3, "t");
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
  return std::chrono::duration<double>(Clock::now() - t0).count() / steps;
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
