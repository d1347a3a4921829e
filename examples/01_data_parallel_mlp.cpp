// 01: data parallelism over a user's own layers. Four ranks (threads) each hold a replica of a
// small MLP and train on their own quarter of every batch; DataParallel reduces the gradients
// in buckets during backward, so every replica takes the same step as one process on the whole
// batch. Only rank 0 prints.
//
//   OPENBLAS_NUM_THREADS=1 ./build/examples/01_data_parallel_mlp
#include <cstdio>
#include <vector>

#include "example_main.hpp"
#include "tessera/tessera.hpp"
#include "tessera/nn/gelu.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/pipeline/stage_chain.hpp"

using namespace tessera;
using MLP = StageChain<nn::Linear<float>, nn::GELU<float>, nn::Linear<float>>;  // 16 -> 64 -> 4

int run() {
  const std::vector<double> last = threads::run(4, [](Comm& world) {
    double first_loss = 0, loss_now = 0;
    // Every rank builds the model (any seed: DataParallel broadcasts rank 0's values).
    MLP mlp(nn::Linear<float>(16, 64, {.prefix = "fc1", .seed = 1}), nn::GELU<float>(),
            nn::Linear<float>(64, 4, {.prefix = "fc2", .seed = 1}));
    DataParallel<MLP> model(std::move(mlp), world);
    optim::AdamW<float> opt(model.parameters(), {.lr = 3e-3});
    nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});

    const std::int64_t global_batch = 64, local = global_batch / world.size();
    for (int step = 0; step < 200; ++step) {
      // This rank's rows of the global batch: x random, the class the sign pattern of x's
      // first two features.
      Tensor<float> x(Shape{local, 16});
      fill_normal(x, 1000 + step, "x" + std::to_string(world.rank()), 1.0);
      Tensor<std::int32_t> y(Shape{local});
      for (std::int64_t i = 0; i < local; ++i) y(i) = (x(i, 0) > 0 ? 1 : 0) + (x(i, 1) > 0 ? 2 : 0);

      model.zero_grad();
      auto [logits, ctx] = model.forward(x);
      auto [loss, lctx] = ce.forward(logits, y);
      const float scale = static_cast<float>(model.loss_scale(local));  // 1 / global batch, once
      model.backward(ce.backward(scale, lctx), ctx);                   // reduces over the ranks
      opt.step();
      const double mean = world.all_reduce_value(static_cast<double>(loss), ReduceOp::sum) / global_batch;
      if (step == 0) first_loss = mean;
      loss_now = mean;
      if (world.rank() == 0 && step % 50 == 0) std::printf("step %3d  loss %.4f\n", step, mean);
    }
    return loss_now / first_loss;
  });
  std::printf("final loss / first loss = %.3f\n", last[0]);
  return last[0] < 0.5 ? 0 : 1;  // the example is a test too: it must have learned
}

int main(int argc, char** argv) {
  return examples::run_example(
      argc, argv,
      "data parallelism over a user's own layers: 4 thread ranks train one small MLP on their quarters "
      "of each batch; DataParallel reduces the gradients in buckets during backward. Exit code 0 when "
      "the loss halved.",
      run);
}
