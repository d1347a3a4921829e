// train_gpt: train a GPT-2-architecture model on a text file with byte-level tokens, across
// dp data-parallel ranks on the threads backend, and sample from it.
//
//   ./build/examples/train_gpt --data data/kjv.txt --dp 2 --steps 300
//
// Reads top to bottom like a training loop in a paper: make the world, the mesh, the serial
// model, wrap it in the parallel policy, loop over steps; only rank 0 prints.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "tessera/data/text_dataset.hpp"
#include "tessera/nn/sampling.hpp"
#include "tessera/parallel/data_parallel.hpp"
#include "tessera/tessera.hpp"

using namespace tessera;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string data = "data/kjv.txt";
  int dp = 2;
  int steps = 300;
  int layers = 4, d_model = 128, heads = 4, context = 64;
  int batch = 16;  // global batch (sequences per step), split over dp
  double lr = 3e-3, min_lr = 3e-4;
  int warmup = 20;
  std::uint64_t seed = 1;
  int val_every = 50, val_batches = 4;
  int sample_len = 300;
  double temperature = 0.8;
  int top_k = 40;
  bool verify = false;
};

// Mean next-token loss over `a.val_batches` validation batches (each rank its rows; all-reduced
// over dp so every rank gets the same number: a control value, CASES C10).
template <class Model>
double validation_loss(Model& model, const data::TextDataset& ds, const Args& a, Comm& dp) {
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});
  const int rows = a.batch / dp.size(), r0 = dp.rank() * rows;
  double sum = 0, count = 0;
  for (int i = 0; i < a.val_batches; ++i) {
    data::Batch b = ds.batch(data::Split::val, a.seed, i, a.batch, r0, r0 + rows);
    auto [logits, ctx] = model.forward(b.inputs);
    auto [loss, lctx] = ce.forward(logits, b.targets);
    sum += static_cast<double>(loss);
    count += static_cast<double>(lctx.num_valid);
  }
  sum = dp.all_reduce_value(sum);
  count = dp.all_reduce_value(count);
  return sum / count;
}

// Trains on `dp` ranks (dp = 1: serial) and returns rank 0's per-step losses.
std::vector<double> train(const Args& a, int dp_size, bool print) {
  const data::TextDataset ds(a.data, a.context);
  const nn::GPTConfig config{.vocab_size = data::ByteTokenizer::vocab_size, .n_positions = a.context,
                             .n_layer = a.layers, .n_head = a.heads, .d_model = a.d_model};
  auto losses = threads::run(dp_size, [&](Comm& world) {
    Mesh mesh(world, MeshShape{.dp = dp_size});
    const bool rank0 = world.rank() == 0 && print;
    // The serial model, then the policy around it.
    nn::GPT<float> gpt(config, a.seed);
    DataParallel<nn::GPT<float>> model(std::move(gpt), mesh.dp());
    optim::AdamW<float> opt(model.parameters(), {.lr = a.lr, .weight_decay = 0.0});
    const optim::WarmupCosine schedule{.max_lr = a.lr, .min_lr = a.min_lr, .warmup_steps = a.warmup,
                                       .total_steps = a.steps};
    nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});
    const int rows = a.batch / dp_size, r0 = mesh.dp().rank() * rows;

    if (rank0)
      std::printf("GPT %d layers, d_model %d, %d heads, context %d: %lld parameters; dp=%d, global batch %d x %d\n",
                  a.layers, a.d_model, a.heads, a.context, static_cast<long long>(model.parameters().numel()), dp_size,
                  a.batch, a.context);
    std::vector<double> step_losses;
    const auto t_start = Clock::now();
    for (int step = 0; step < a.steps; ++step) {
      const auto t0 = Clock::now();
      data::Batch b = ds.batch(data::Split::train, a.seed, step, a.batch, r0, r0 + rows);
      // Mean over every valid token of the global batch, declared once: the loss is a sum and
      // the scale is 1 / (tokens over all dp ranks).
      const double scale = model.loss_scale(ce.count_valid(b.targets));
      model.zero_grad();
      auto [logits, ctx] = model.forward(b.inputs);
      auto [loss, lctx] = ce.forward(logits, b.targets);
      const auto t_bwd = Clock::now();
      // Backward; DataParallel all-reduces the gradient buckets as they become final.
      model.backward(ce.backward(static_cast<float>(scale), lctx), ctx);
      const double backward_s = std::chrono::duration<double>(Clock::now() - t_bwd).count();
      opt.set_lr(schedule(step));
      opt.step();
      const double global_loss = mesh.dp().all_reduce_value(static_cast<double>(loss)) * scale;
      step_losses.push_back(global_loss);
      const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
      if (rank0 && (step % 10 == 0 || step == a.steps - 1))
        std::printf("step %4d  loss %.4f  lr %.2e  %.0f tokens/s  backward+reduce %.0f%% of the step\n", step,
                    global_loss, schedule(step), a.batch * a.context / dt, 100.0 * backward_s / dt);
      if (a.val_every > 0 && (step % a.val_every == 0 || step == a.steps - 1)) {
        const double v = validation_loss(model, ds, a, mesh.dp());
        if (rank0) std::printf("step %4d  validation loss %.4f\n", step, v);
      }
    }
    if (rank0) {
      const double total = std::chrono::duration<double>(Clock::now() - t_start).count();
      std::printf("trained %d steps in %.1f s\n", a.steps, total);
    }
    // A sample (every rank runs the same deterministic generation; rank 0 prints it).
    if (a.sample_len > 0) {
      auto last_logits = [&](const std::vector<std::int32_t>& ctx) {
        Tensor<std::int32_t> x(Shape{1, static_cast<std::int64_t>(ctx.size())});
        std::copy(ctx.begin(), ctx.end(), x.data());
        auto [logits, c] = model.forward(x);
        const std::int64_t V = logits.size(-1), Tn = logits.size(1);
        return std::vector<float>(logits.data() + (Tn - 1) * V, logits.data() + Tn * V);
      };
      auto out = nn::generate<float>(data::ByteTokenizer::encode("And God said"), a.sample_len, a.context,
                                     last_logits, {.temperature = a.temperature, .top_k = a.top_k}, a.seed);
      if (rank0) std::printf("--- sample ---\n%s\n--------------\n", data::ByteTokenizer::decode(out).c_str());
    }
    return step_losses;
  });
  return losses[0];
}

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"Train a GPT on a text file with tessera (byte-level tokens, threads backend)"};
  app.add_option("--data", a.data, "text file to train on")->check(CLI::ExistingFile);
  app.add_option("--dp", a.dp, "data-parallel ranks")->check(CLI::Range(1, 64));
  app.add_option("--steps", a.steps, "optimizer steps")->check(CLI::PositiveNumber);
  app.add_option("--layers", a.layers, "transformer blocks")->check(CLI::PositiveNumber);
  app.add_option("--d-model", a.d_model, "model width")->check(CLI::PositiveNumber);
  app.add_option("--heads", a.heads, "attention heads")->check(CLI::PositiveNumber);
  app.add_option("--context", a.context, "sequence length")->check(CLI::PositiveNumber);
  app.add_option("--batch", a.batch, "global batch in sequences (split over dp)")->check(CLI::PositiveNumber);
  app.add_option("--lr", a.lr, "peak learning rate");
  app.add_option("--min-lr", a.min_lr, "final learning rate of the cosine decay");
  app.add_option("--warmup", a.warmup, "warmup steps");
  app.add_option("--seed", a.seed, "seed of the init and the data order");
  app.add_option("--val-every", a.val_every, "validation interval in steps (0: never)");
  app.add_option("--sample-len", a.sample_len, "bytes to sample at the end (0: none)");
  app.add_option("--temperature", a.temperature, "sampling temperature");
  app.add_option("--top-k", a.top_k, "sampling top-k (0: all)");
  app.add_flag("--verify", a.verify, "also train serially in this process and print the largest loss difference");
  CLI11_PARSE(app, argc, argv);
  try {
    TESSERA_EXPECTS(a.batch % a.dp == 0, "train_gpt: global batch ", a.batch, " is not divisible by dp ", a.dp);
    TESSERA_EXPECTS(a.d_model % a.heads == 0, "train_gpt: d_model ", a.d_model, " is not divisible by heads ",
                    a.heads);
    const auto losses = train(a, a.dp, true);
    if (a.verify) {
      Args s = a;
      s.val_every = 0;
      s.sample_len = 0;
      const auto serial = train(s, 1, false);
      double worst = 0;
      for (std::size_t i = 0; i < losses.size(); ++i)
        worst = std::max(worst, std::abs(losses[i] - serial[i]) / std::abs(serial[i]));
      std::printf("verify: largest relative loss difference vs the serial run over %zu steps: %.3g\n", losses.size(),
                  worst);
      if (!(worst < 1e-4)) return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_gpt: %s\n", e.what());
    return 1;
  }
  return 0;
}
