// 03: pipeline parallelism over a user's layers. The model is described once -- an embedding,
// six blocks, a head the user writes -- and cut into four stages, one per rank; PipelineParallel
// runs eight micro-batches per step in the 1F1B order (PipeDream-Flush), sending activations
// forward and gradients back, and the step's gradients are those of the whole batch. Only rank
// 0 prints.
//
//   OPENBLAS_NUM_THREADS=1 ./build/examples/03_pipeline
#include <cstdio>
#include <vector>

#include "example_main.hpp"
#include "tessera/tessera.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/parallel/hybrid/sequential_model.hpp"
#include "tessera/parallel/pipeline/pipeline_parallel.hpp"

using namespace tessera;

// The user's last layer: LayerNorm, then the output projection to the vocabulary.
struct Head {
  nn::LayerNorm<float> ln;
  nn::Linear<float> out;
  using Input = Tensor<float>;
  struct Context {
    nn::LayerNorm<float>::Context ln;
    nn::Linear<float>::Context out;
  };
  ForwardResult<Tensor<float>, Context> forward(const Tensor<float>& x) const {
    auto [h, c1] = ln.forward(x);
    auto [y, c2] = out.forward(h);
    return {std::move(y), Context{std::move(c1), std::move(c2)}};
  }
  Tensor<float> backward(const Tensor<float>& dy, const Context& c) { return ln.backward(out.backward(dy, c.out), c.ln); }
  ParameterList<float> parameters() {
    ParameterList<float> ps = ln.parameters();
    ps.append(out.parameters());
    return ps;
  }
};

// The model, described once: what each layer is and how it is initialized.
struct Model {
  using First = nn::Embedding<float>;
  using Block = nn::Block<float>;
  using Last = Head;
  static constexpr std::int64_t vocab = 32, d = 64;
  int num_blocks() const { return 6; }
  First first() const { return First(vocab, d, {.prefix = "embed", .seed = 5}); }
  Block block(int i) const { return Block(d, 4, {.prefix = "h." + std::to_string(i), .seed = 5}); }
  Last last() const { return Head{nn::LayerNorm<float>(d, {.prefix = "ln_f", .seed = 5}), nn::Linear<float>(d, vocab, {.prefix = "out", .seed = 5})}; }
};

int run() {
  const std::vector<double> ratio = threads::run(4, [](Comm& world) {
    double first_loss = 0, loss_now = 0;
    const Model model;
    const StagePartition cut = StagePartition::even(model.num_blocks() + 2, world.size());  // 8 layers, 4 stages
    PipelineParallel<float, Tensor<std::int32_t>> pipe(
        world, [&](int s) { return make_serial_stage(model, cut, s); },
        nn::CrossEntropy<float>({.reduction = nn::Reduction::sum}), {.schedule = PipelineScheduleKind::one_f_one_b});
    optim::AdamW<float> opt(pipe.parameters(), {.lr = 3e-3});

    for (int step = 0; step < 60; ++step) {
      // 32 sequences of 16 tokens counting up by 1, 2 or 3 (mod 32); targets: the next token.
      Tensor<std::int32_t> tokens(Shape{32, 16}), targets(Shape{32, 16});
      for (std::int64_t b = 0; b < 32; ++b)
        for (std::int64_t t = 0; t < 16; ++t) {
          tokens(b, t) = static_cast<std::int32_t>((7 * b + step + t * (1 + b % 3)) % Model::vocab);
          targets(b, t) = static_cast<std::int32_t>((tokens(b, t) + 1 + b % 3) % Model::vocab);
        }
      pipe.zero_grad();
      const float loss = pipe.step(tokens, targets, /*num_microbatches=*/8);  // mean over all tokens
      opt.step();
      if (step == 0) first_loss = loss;
      loss_now = loss;
      if (world.rank() == 0 && step % 15 == 0)
        std::printf("step %2d  loss %.4f  (%s, peak %d micro-batches in flight on rank 0)\n", step,
                    static_cast<double>(loss), pipe.last_step().schedule.c_str(), pipe.last_step().peak_in_flight);
    }
    return loss_now / first_loss;
  });
  std::printf("final loss / first loss = %.3f\n", ratio[0]);
  return ratio[0] < 0.5 ? 0 : 1;  // the example is a test too: it must have learned
}

int main(int argc, char** argv) {
  return examples::run_example(
      argc, argv,
      "pipeline parallelism over a user's layers: one model cut into 4 stages on 4 thread ranks, 8 "
      "micro-batches per step in the 1F1B order. Exit code 0 when the loss halved.",
      run);
}
