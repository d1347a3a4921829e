// 02: tensor parallelism from a plan. A user's feed-forward block y = x + down(gelu(up(ln(x))))
// declares which member is column-parallel, which row-parallel, which replicated; the type
// TensorParallel<FeedForward> then shards `up` by columns and `down` by rows over the tp ranks
// and inserts exactly one all-reduce forward (after `down`) and one backward (before `up`),
// chosen at compile time (Megatron-LM's ParallelMLP). Every tp size computes what the serial
// block computes; rank 0 prints the difference.
//
//   OPENBLAS_NUM_THREADS=1 ./build/examples/02_tensor_parallel_block
#include <cstdio>
#include <vector>

#include "example_main.hpp"
#include "tessera/tessera.hpp"
#include "tessera/nn/gelu.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/parallel/tensor/tensor_parallel.hpp"
#include "tessera/parallel/tensor/tensor_parallel_plan.hpp"

using namespace tessera;

// A user's block: the serial Layer (forward, backward, parameters) plus its plan.
struct FeedForward {
  nn::LayerNorm<float> ln;
  nn::Linear<float> up, down;
  nn::GELU<float> act;
  static constexpr auto tp_plan = tp::plan(tp::residual(tp::replicate(&FeedForward::ln), tp::column(&FeedForward::up),
                                                        tp::elementwise(&FeedForward::act), tp::row(&FeedForward::down)));
  using Input = Tensor<float>;
  struct Context {
    nn::LayerNorm<float>::Context ln;
    nn::Linear<float>::Context up, down;
    nn::GELU<float>::Context act;
  };
  ForwardResult<Tensor<float>, Context> forward(const Tensor<float>& x) const {
    auto [h, c1] = ln.forward(x);
    auto [u, c2] = up.forward(h);
    auto [a, c3] = act.forward(u);
    auto [y, c4] = down.forward(a);
    y.add_(x);
    return {std::move(y), Context{std::move(c1), std::move(c2), std::move(c4), std::move(c3)}};
  }
  Tensor<float> backward(const Tensor<float>& dy, const Context& c) {
    Tensor<float> dx = ln.backward(up.backward(act.backward(down.backward(dy, c.down), c.act), c.up), c.ln);
    dx.add_(dy);
    return dx;
  }
  ParameterList<float> parameters() {
    ParameterList<float> ps = ln.parameters();
    ps.append(up.parameters());
    ps.append(down.parameters());
    return ps;
  }
};

FeedForward make_block() {
  return FeedForward{nn::LayerNorm<float>(32, {.prefix = "ln", .seed = 3}), nn::Linear<float>(32, 128, {.prefix = "up", .seed = 3}),
                     nn::Linear<float>(128, 32, {.prefix = "down", .seed = 3}), nn::GELU<float>()};
}

int run() {
  Tensor<float> x(Shape{4, 16, 32});
  fill_normal(x, 7, "x", 1.0);
  FeedForward serial = make_block();
  const Tensor<float> want = serial.forward(x).output;

  const std::vector<double> worst_of = threads::run(4, [&](Comm& world) {
    TensorParallel<FeedForward> block(make_block(), world);  // this rank's shards of up and down
    auto [y, ctx] = block.forward({x});                      // x replicated in, y replicated out
    double worst = 0;
    for (std::int64_t i = 0; i < y.value.numel(); ++i)
      worst = std::max(worst, static_cast<double>(std::abs(y.value.data()[i] - want.data()[i])));
    if (world.rank() == 0)
      std::printf("tp = %d: up holds %lld of 128 columns per rank; max |y - y_serial| = %.2e\n", world.size(),
                  static_cast<long long>(block.parameters().at("up.weight").value.size(1)), worst);
    return worst;
  });
  return worst_of[0] < 1e-5 ? 0 : 1;  // fp32 round-off, or the example fails as a test
}

int main(int argc, char** argv) {
  return examples::run_example(
      argc, argv,
      "tensor parallelism from a plan: a user's feed-forward block sharded over 4 thread ranks by "
      "TensorParallel, its output compared with the serial block's. Exit code 0 when they agree.",
      run);
}
