// 04: a user's Llama-style model (examples/llama: RMSNorm, rotary embeddings, grouped-query
// attention, SwiGLU, untied head; tessera does not ship it) trained at dp 2 x pp 2 x tp 2 on 8
// ranks, through the same Hybrid as the GPT: the model's one description
// (llama/llama_model.hpp) is cut into pipeline stages whose layers run tensor-parallel by their
// plans, each stage replicated over dp, the loss vocab-parallel. Only rank 0 prints.
//
//   OPENBLAS_NUM_THREADS=1 ./build/examples/04_hybrid_llama
#include <cstdio>
#include <vector>

#include "example_main.hpp"
#include "llama/llama_model.hpp"
#include "tessera/tessera.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/parallel/hybrid/hybrid.hpp"
#include "tessera/parallel/hybrid/sequential_model.hpp"
#include "tessera/parallel/tensor/vocab_parallel_cross_entropy.hpp"

using namespace tessera;

int run() {
  const llama::LlamaConfig config{.vocab_size = 64, .n_layer = 4, .n_head = 8, .n_kv_head = 4, .d_model = 64,
                                  .ffn_hidden = 128};
  const llama::LlamaDescription<float> model(config, /*seed=*/1);

  const std::vector<double> ratio = threads::run(8, [&](Comm& world) {
    double first_loss = 0, loss_now = 0;
    Mesh mesh(world, MeshShape{.dp = 2, .pp = 2, .tp = 2});
    const StagePartition cut = StagePartition::even(model.num_blocks() + 2, mesh.shape().pp);
    Hybrid<float> llama(
        mesh, sequential_stages(model, cut),
        [&](Comm tp) {  // the head's logits are split over the vocabulary: a vocab-parallel loss
          return sequential_loss<llama::LlamaDescription<float>>(
              VocabParallelCrossEntropy<float>(tp, config.vocab_size, {.reduction = nn::Reduction::sum}));
        },
        {.num_microbatches = 4});
    // The optimizer is outside the model: AdamW over its parameters (ZeRO-1 here: the state
    // sharded over dp), no weight decay on the RMSNorm weights.
    DistributedOptimizer<optim::AdamW<float>> opt(
        llama, optim::weight_decay_groups(llama.parameters(), optim::AdamWOptions{.lr = 3e-3, .weight_decay = 0.01}),
        /*zero1=*/true);

    const std::int64_t rows = 16, T = 16, r0 = mesh.coord().dp * rows;  // this dp rank's rows of 32
    for (int step = 0; step < 60; ++step) {
      Tensor<std::int32_t> tokens(Shape{rows, T}), targets(Shape{rows, T});
      for (std::int64_t b = 0; b < rows; ++b)
        for (std::int64_t t = 0; t < T; ++t) {
          const std::int64_t g = r0 + b, stride = 1 + g % 3;
          tokens(b, t) = static_cast<std::int32_t>((5 * g + step + t * stride) % config.vocab_size);
          targets(b, t) = static_cast<std::int32_t>((tokens(b, t) + stride) % config.vocab_size);
        }
      llama.zero_grad();
      const double loss = llama.forward_backward(tokens, targets);  // the global batch's mean
      optim::clip_grad_norm(llama.gradients(), 1.0);
      opt.step();
      if (step == 0) first_loss = loss;
      loss_now = loss;
      if (world.rank() == 0 && step % 15 == 0) std::printf("step %2d  loss %.4f\n", step, loss);
    }
    return loss_now / first_loss;
  });
  std::printf("final loss / first loss = %.3f\n", ratio[0]);
  return ratio[0] < 0.5 ? 0 : 1;  // the example is a test too: it must have learned
}

int main(int argc, char** argv) {
  return examples::run_example(
      argc, argv,
      "a user's Llama-style model trained at dp 2 x pp 2 x tp 2 on 8 thread ranks through Hybrid. Exit "
      "code 0 when the loss halved.",
      run);
}
