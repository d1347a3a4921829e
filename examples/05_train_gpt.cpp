// train_gpt: train a GPT-2-architecture model on a text file (byte-level tokens) across
// dp x pp x tp ranks, save and resume sharded checkpoints at any layout, sample from it, and
// evaluate a Hugging Face GPT-2 safetensors file.
//
//   ./build/examples/train_gpt --data data/kjv.txt --dp 2 --pp 2 --tp 2 --steps 300
//   ./build/examples/train_gpt --resume ckpt --generate --tp 2 --prompt "And God said"
//   mpirun -np 4 ./build/examples/train_gpt --backend mpi --dp 2 --tp 2
//   ./build/examples/train_gpt --eval-model gpt2/model.safetensors --eval-tokens ids.txt --tp 2
//
// Reads top to bottom like a training loop in a paper: make the world, the mesh, the model
// over it, loop over steps; only world rank 0 prints.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/checkpoint/checkpoint.hpp"
#include "tessera/checkpoint/hybrid_state.hpp"
#include "tessera/data/text_dataset.hpp"
#include "tessera/nn/sampling.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/tessera.hpp"
#include "tessera/testing/compare.hpp"
#ifdef TESSERA_HAVE_MPI
#include "tessera/mpi.hpp"
#endif

using namespace tessera;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string data = "data/kjv.txt";
  int dp = 2, tp = 1, pp = 1;
  std::string schedule = "1f1b";
  int virtual_stages = 1;
  int microbatches = 0;  // 0: pp * virtual_stages (at least 1)
  int accum = 1;
  bool zero1 = false;
  std::string backend = "threads";
  int steps = 300;
  int schedule_steps = 0;  // length of the learning-rate schedule (0: steps)
  int layers = 4, d_model = 128, heads = 4, context = 64;
  int batch = 16;  // global batch (sequences per optimizer step)
  double lr = 1e-3, min_lr = 1e-4, clip = 1.0, weight_decay = 0.0;
  int warmup = 20;
  std::uint64_t seed = 1;
  int val_every = 50, val_batches = 4, log_every = 10;
  int sample_len = 300;
  double temperature = 0.8;
  int top_k = 40;
  std::string prompt = "And God said";
  std::string save, resume;
  std::int64_t resume_step = 0;  // the checkpoint's step (read before the ranks start)
  int save_every = 0;
  bool generate = false;
  std::string eval_model, eval_tokens;
  std::string loss_csv, loss_svg;
  bool verify = false;
  bool quiet = false;

  int world() const { return dp * tp * pp; }
  int num_microbatches() const { return microbatches > 0 ? microbatches : std::max(1, pp * virtual_stages); }
  GPTConfig config() const {
    return {.vocab_size = data::ByteTokenizer::vocab_size, .n_positions = context, .n_layer = layers,
            .n_head = heads, .d_model = d_model};
  }
  HybridOptions hybrid() const {
    const PipelineScheduleKind kind = schedule == "gpipe"         ? PipelineScheduleKind::gpipe
                                      : schedule == "interleaved" ? PipelineScheduleKind::interleaved_one_f_one_b
                                                                  : PipelineScheduleKind::one_f_one_b;
    return {.schedule = kind, .virtual_stages = virtual_stages, .num_microbatches = num_microbatches(),
            .accumulation_steps = accum, .zero1 = zero1};
  }
  // Warmup + cosine over schedule_steps (default: --steps); warmup capped at the schedule.
  optim::WarmupCosine lr_schedule() const {
    const int total = schedule_steps > 0 ? schedule_steps : steps;
    return {.max_lr = lr, .min_lr = min_lr, .warmup_steps = std::min(warmup, total), .total_steps = total};
  }
};

// One point of the loss curve.
struct Point {
  int step;
  double train, val;  // val < 0: not measured at this step
};

// Mean next-token loss over `a.val_batches` validation batches, each dp rank its rows; the same
// value on every rank (a control value: CASES C10).
double validation_loss(HybridGPT<float>& model, const data::TextDataset& ds, const Args& a) {
  Mesh& mesh = model.mesh();
  const int rows = a.batch / a.dp, r0 = mesh.coord().dp * rows;
  double sum = 0;
  for (int i = 0; i < a.val_batches; ++i) {
    const data::Batch b = ds.batch(data::Split::val, a.seed, i, a.batch, r0, r0 + rows);
    sum += model.evaluate(b.inputs, b.targets);
  }
  return sum / a.val_batches;
}

// Samples `a.sample_len` bytes after the prompt; every rank runs the same generation.
std::string sample(HybridGPT<float>& model, const Args& a) {
  auto last_logits = [&](const std::vector<std::int32_t>& ctx) {
    Tensor<std::int32_t> x(Shape{1, static_cast<std::int64_t>(ctx.size())});
    std::copy(ctx.begin(), ctx.end(), x.data());
    return model.next_token_logits(x);
  };
  const auto out = nn::generate<float>(data::ByteTokenizer::encode(a.prompt), a.sample_len, a.context, last_logits,
                                       {.temperature = a.temperature, .top_k = a.top_k}, a.seed);
  return data::ByteTokenizer::decode(out);
}

checkpoint::CheckpointMeta meta_of(const Args& a, int step) {
  checkpoint::CheckpointMeta m;
  m.config = checkpoint::gpt2_config_json(a.config());
  m.step = step;
  m.extra = {{"seed", a.seed}, {"batch", a.batch}, {"lr", a.lr}, {"min_lr", a.min_lr}, {"warmup", a.warmup},
             {"schedule_steps", a.schedule_steps > 0 ? a.schedule_steps : a.steps}};
  return m;
}

// Trains on this rank of `world` (dp x pp x tp = world size) and returns the per-step losses
// (the same on every rank) and the loss curve.
std::vector<Point> train_rank(Comm& world, const Args& a, bool print) {
  Mesh mesh(world, MeshShape{.dp = a.dp, .pp = a.pp, .tp = a.tp});
  const bool rank0 = world.rank() == 0 && print;
  const data::TextDataset ds(a.data, a.context);
  HybridGPT<float> model(mesh, a.config(), a.seed, a.hybrid(), {.lr = a.lr, .weight_decay = a.weight_decay});
  const optim::WarmupCosine lr = a.lr_schedule();

  int start = 0;
  if (!a.resume.empty()) {
    const auto info = checkpoint::load_hybrid_checkpoint(a.resume, model, checkpoint::gpt2_config_json(a.config()));
    start = static_cast<int>(info.step);
    if (rank0)
      std::printf("resumed %s: step %d, saved at dp=%d pp=%d tp=%d, now dp=%d pp=%d tp=%d\n", a.resume.c_str(), start,
                  info.layout.dp, info.layout.pp, info.layout.tp, a.dp, a.pp, a.tp);
  }
  std::int64_t n_params = 0;
  for (const Parameter<float>& p : model.parameters()) n_params += p.value.numel();
  if (rank0)
    std::printf("GPT %d layers, d_model %d, %d heads, context %d; dp=%d pp=%d tp=%d (%s, %d micro-batches, accum %d%s); "
                "global batch %d x %d; rank 0 holds %lld parameters\n",
                a.layers, a.d_model, a.heads, a.context, a.dp, a.pp, a.tp, a.schedule.c_str(), a.num_microbatches(),
                a.accum, a.zero1 ? ", ZeRO-1" : "", a.batch, a.context, static_cast<long long>(n_params));

  const int rows = a.batch / a.dp, chunk = rows / a.accum, r0 = mesh.coord().dp * rows;
  std::vector<Point> curve;
  const auto t_start = Clock::now();
  double tokens = 0, elapsed = 0, compute = 0, comm = 0, bubble = 0;
  for (int step = start; step < a.steps; ++step) {
    const auto t0 = Clock::now();
    const data::Batch b = ds.batch(data::Split::train, a.seed, step, a.batch, r0, r0 + rows);
    model.zero_grad();
    double c = 0, m = 0, w = 0;
    for (int k = 0; k < a.accum; ++k) {
      const Tensor<std::int32_t> x = b.inputs.slice(0, k * chunk, (k + 1) * chunk).contiguous();
      const Tensor<std::int32_t> y = b.targets.slice(0, k * chunk, (k + 1) * chunk).contiguous();
      model.forward_backward(x, y);
      const HybridStepStats& s = model.last_step();
      c += s.compute_seconds;
      m += s.tp_comm_seconds + s.dp_comm_seconds;
      w += s.pp_wait_seconds;
    }
    if (a.clip > 0) model.clip_grad_norm(a.clip);
    model.set_lr(lr(step));
    model.optimizer_step();
    if (model.zero1()) m += model.optimizer_seconds();  // the parameter all-gather
    const double loss = model.accumulated_loss();
    TESSERA_EXPECTS(std::isfinite(loss), "train_gpt: the loss at step ", step, " is ", loss,
                    " (not finite): the training diverged; lower --lr (now ", a.lr, ") or --warmup");
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    tokens += static_cast<double>(a.batch) * a.context;
    elapsed += dt;
    compute += c;
    comm += m;
    bubble += w;
    Point pt{step, loss, -1.0};
    const bool last = step == a.steps - 1;
    if (a.val_every > 0 && (step % a.val_every == 0 || last)) pt.val = validation_loss(model, ds, a);
    curve.push_back(pt);
    if (rank0 && !a.quiet && (step % a.log_every == 0 || last)) {
      // Shares of rank 0's step time: compute (forward, backward, optimizer), communication
      // (tp collectives, dp gradient reduction, ZeRO-1 gather) and pipeline waits (bubble and
      // activation transfers), over the steps since the last line.
      const double other = std::max(0.0, elapsed - compute - comm - bubble);
      std::printf("step %4d  loss %.4f  lr %.2e  %6.0f tokens/s  compute %3.0f%%  comm %3.0f%%  bubble %3.0f%%\n", step,
                  loss, lr(step), tokens / elapsed, 100 * (compute + other) / elapsed, 100 * comm / elapsed,
                  100 * bubble / elapsed);
      tokens = elapsed = compute = comm = bubble = 0;
    }
    if (rank0 && pt.val >= 0) std::printf("step %4d  validation loss %.4f\n", step, pt.val);
    if (!a.save.empty() && ((a.save_every > 0 && (step + 1) % a.save_every == 0) || last)) {
      checkpoint::save_hybrid_checkpoint(a.save, model, meta_of(a, step + 1));
      if (rank0 && !a.quiet) std::printf("step %4d  saved %s\n", step, a.save.c_str());
    }
  }
  if (rank0 && a.steps > start)
    std::printf("trained steps %d..%d in %.1f s\n", start, a.steps - 1,
                std::chrono::duration<double>(Clock::now() - t_start).count());
  if (a.sample_len > 0) {
    const std::string text = sample(model, a);
    if (rank0) std::printf("--- sample ---\n%s\n--------------\n", text.c_str());
  }
  return curve;
}

// The same training on one rank without any policy: GPT, mean cross-entropy, clipping,
// AdamW with the same schedule and data. Returns the per-step losses of `steps` steps.
std::vector<double> serial_losses(const Args& a, int steps) {
  const data::TextDataset ds(a.data, a.context);
  GPT<float> gpt(a.config(), a.seed);
  ParameterList<float> ps = gpt.parameters();
  optim::AdamW<float> opt(ps, {.lr = a.lr, .weight_decay = a.weight_decay});
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  const optim::WarmupCosine lr = a.lr_schedule();
  std::vector<double> losses;
  for (int step = 0; step < steps; ++step) {
    const data::Batch b = ds.batch(data::Split::train, a.seed, step, a.batch, 0, a.batch);
    ps.zero_grad();
    auto [logits, ctx] = gpt.forward(b.inputs);
    auto [loss, lctx] = ce.forward(logits, b.targets);
    gpt.backward(ce.backward(1.0f, lctx), ctx);
    if (a.clip > 0) optim::clip_grad_norm(ps, a.clip);
    opt.set_lr(lr(step));
    opt.step();
    losses.push_back(static_cast<double>(loss));
  }
  return losses;
}

// Loads a checkpoint (any layout) and samples from it at this layout.
void generate_rank(Comm& world, const Args& a) {
  Mesh mesh(world, MeshShape{.dp = a.dp, .pp = a.pp, .tp = a.tp});
  HybridGPT<float> model(mesh, a.config(), a.seed, a.hybrid());
  const auto info = checkpoint::load_hybrid_checkpoint(a.resume, model, checkpoint::gpt2_config_json(a.config()), false);
  const std::string text = sample(model, a);
  if (world.rank() == 0)
    std::printf("checkpoint %s (step %lld), sampled at dp=%d pp=%d tp=%d:\n%s\n", a.resume.c_str(),
                static_cast<long long>(info.step), a.dp, a.pp, a.tp, text.c_str());
}

// Token ids (whitespace-separated integers) from a text file.
std::vector<std::int32_t> read_token_ids(const std::string& path) {
  TESSERA_EXPECTS(std::filesystem::is_regular_file(path), "train_gpt: the token file ", path, " is not a regular file");
  std::ifstream in(path);
  TESSERA_EXPECTS(in.good(), "train_gpt: cannot open the token file ", path);
  std::vector<std::int32_t> ids;
  long long v;
  while (in >> v) {
    TESSERA_EXPECTS(v >= 0 && v <= std::numeric_limits<std::int32_t>::max(), "train_gpt: token id ", v, " at position ",
                    ids.size(), " of ", path, " is not a token id (negative or past int32)");
    ids.push_back(static_cast<std::int32_t>(v));
  }
  TESSERA_EXPECTS(in.eof(), "train_gpt: ", path, " holds something other than integers after ", ids.size(), " ids");
  TESSERA_EXPECTS(ids.size() >= 2, "train_gpt: ", path, " holds ", ids.size(), " token ids; at least 2 are needed");
  return ids;
}

// The configuration of a Hugging Face GPT-2 safetensors file: vocab and width from wte, context
// from wpe, depth from the h.N tensors; n_head from --heads (not stored in the weights).
GPTConfig config_of_file(const std::string& path, int heads) {
  const checkpoint::SafetensorsFile f(path);
  const auto* wte = f.find("wte.weight") ? f.find("wte.weight") : f.find("transformer.wte.weight");
  const auto* wpe = f.find("wpe.weight") ? f.find("wpe.weight") : f.find("transformer.wpe.weight");
  TESSERA_EXPECTS(wte && wpe, "train_gpt: ", path, " has no wte.weight / wpe.weight: not a GPT-2 checkpoint");
  std::int64_t layers = 0;
  while (f.find("h." + std::to_string(layers) + ".ln_1.weight") ||
         f.find("transformer.h." + std::to_string(layers) + ".ln_1.weight"))
    ++layers;
  return {.vocab_size = wte->shape[0], .n_positions = wpe->shape[0], .n_layer = layers, .n_head = heads,
          .d_model = wte->shape[1]};
}

// Mean next-token cross-entropy of a GPT-2 safetensors file over a token file, windows of the
// model's context, at this layout.
void eval_rank(Comm& world, const Args& a) {
  const GPTConfig cfg = config_of_file(a.eval_model, a.heads);
  TESSERA_EXPECTS(cfg.d_model % cfg.n_head == 0, "train_gpt: the file's width d_model ", cfg.d_model,
                  " is not divisible by --heads ", cfg.n_head, " (GPT-2 small has 12)");
  TESSERA_EXPECTS(cfg.n_head % a.tp == 0, "train_gpt: tp ", a.tp, " does not divide the ", cfg.n_head, " heads");
  Mesh mesh(world, MeshShape{.dp = a.dp, .pp = a.pp, .tp = a.tp});
  HybridGPT<float> model(mesh, cfg, a.seed, a.hybrid());
  checkpoint::load_gpt2_safetensors(a.eval_model, model.parameters(), mesh.coord().tp, a.tp, {.allow_unused = true});
  const std::vector<std::int32_t> ids = read_token_ids(a.eval_tokens);
  for (std::int32_t t : ids)
    TESSERA_EXPECTS(t >= 0 && t < cfg.vocab_size, "train_gpt: token id ", t, " in ", a.eval_tokens,
                    " is outside the vocabulary [0, ", cfg.vocab_size, ")");
  const std::int64_t T = std::min<std::int64_t>(cfg.n_positions, static_cast<std::int64_t>(ids.size()) - 1);
  double sum = 0, count = 0;
  for (std::size_t start = 0; start + 1 < ids.size(); start += static_cast<std::size_t>(T)) {
    const std::int64_t n = std::min<std::int64_t>(T, static_cast<std::int64_t>(ids.size() - start) - 1);
    Tensor<std::int32_t> x(Shape{1, n}), y(Shape{1, n});
    for (std::int64_t t = 0; t < n; ++t) {
      x.data()[t] = ids[start + static_cast<std::size_t>(t)];
      y.data()[t] = ids[start + static_cast<std::size_t>(t) + 1];
    }
    // dp replicas evaluate the same windows here (each would take its own share of a corpus).
    sum += model.evaluate(x, y) * static_cast<double>(n);
    count += static_cast<double>(n);
  }
  if (world.rank() == 0)
    std::printf("eval %s: %d layers, d_model %lld, %lld heads, vocab %lld; %.0f tokens: mean cross-entropy %.4f "
                "(perplexity %.2f) at dp=%d pp=%d tp=%d\n",
                a.eval_model.c_str(), static_cast<int>(cfg.n_layer), static_cast<long long>(cfg.d_model),
                static_cast<long long>(cfg.n_head), static_cast<long long>(cfg.vocab_size), count, sum / count,
                std::exp(sum / count), a.dp, a.pp, a.tp);
}

// The loss curve as CSV and as an SVG line chart (train loss, and validation points).
void write_curve(const Args& a, const std::vector<Point>& curve) {
  if (!a.loss_csv.empty()) {
    std::ofstream f(a.loss_csv);
    f << "step,train_loss,val_loss\n";
    for (const Point& p : curve) f << p.step << ',' << p.train << ',' << (p.val >= 0 ? std::to_string(p.val) : "") << '\n';
  }
  if (!a.loss_svg.empty() && !curve.empty()) {
    const double W = 640, H = 360, L = 50, R = 20, Tm = 30, B = 40;
    double lo = 1e300, hi = -1e300;
    for (const Point& p : curve) {
      lo = std::min({lo, p.train, p.val >= 0 ? p.val : p.train});
      hi = std::max({hi, p.train, p.val >= 0 ? p.val : p.train});
    }
    const double s0 = curve.front().step, s1 = std::max<double>(curve.back().step, s0 + 1);
    auto X = [&](double s) { return L + (s - s0) / (s1 - s0) * (W - L - R); };
    auto Y = [&](double v) { return Tm + (hi - v) / std::max(hi - lo, 1e-9) * (H - Tm - B); };
    std::ofstream f(a.loss_svg);
    f << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H << "' font-family='sans-serif' font-size='12'>\n"
      << "<rect width='100%' height='100%' fill='white'/>\n"
      << "<text x='" << L << "' y='18'>train_gpt: loss per step (dp=" << a.dp << " pp=" << a.pp << " tp=" << a.tp
      << "), blue train, orange validation</text>\n"
      << "<line x1='" << L << "' y1='" << H - B << "' x2='" << W - R << "' y2='" << H - B << "' stroke='black'/>\n"
      << "<line x1='" << L << "' y1='" << Tm << "' x2='" << L << "' y2='" << H - B << "' stroke='black'/>\n";
    for (int i = 0; i <= 4; ++i) {
      const double v = lo + (hi - lo) * i / 4;
      f << "<text x='4' y='" << Y(v) + 4 << "'>" << std::to_string(v).substr(0, 5) << "</text>\n";
    }
    f << "<text x='" << L << "' y='" << H - 20 << "'>step " << static_cast<int>(s0) << "</text>"
      << "<text x='" << W - R - 60 << "' y='" << H - 20 << "'>step " << static_cast<int>(s1) << "</text>\n";
    f << "<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='";
    for (const Point& p : curve) f << X(p.step) << ',' << Y(p.train) << ' ';
    f << "'/>\n<polyline fill='none' stroke='#ff7f0e' stroke-width='2' points='";
    for (const Point& p : curve)
      if (p.val >= 0) f << X(p.step) << ',' << Y(p.val) << ' ';
    f << "'/>\n</svg>\n";
  }
}

// Runs fn(world) on every rank of the chosen backend.
template <class Fn>
int run_ranks(const Args& a, int& argc, char**& argv, Fn&& fn) {
  if (a.backend == "mpi") {
#ifdef TESSERA_HAVE_MPI
    return mpi::run(argc, argv, [&](Comm& world) {
      TESSERA_EXPECTS(world.size() == a.world(), "train_gpt: mpirun started ", world.size(),
                      " processes but dp(", a.dp, ") x pp(", a.pp, ") x tp(", a.tp, ") = ", a.world());
      fn(world);
    });
#else
    (void)argc;
    (void)argv;
    throw Error("train_gpt: this build has no MPI backend (configure with -Dmpi=enabled)");
#endif
  }
  threads::run(a.world(), [&](Comm& world) { fn(world); });
  return 0;
}

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"Train a GPT on a text file with tessera across dp x pp x tp ranks (byte-level tokens)"};
  app.add_option("--data", a.data, "text file to train on");
  app.add_option("--dp", a.dp, "data-parallel ranks")->check(CLI::Range(1, 64));
  app.add_option("--tp", a.tp, "tensor-parallel ranks (divides --heads)")->check(CLI::Range(1, 64));
  app.add_option("--pp", a.pp, "pipeline stages (ranks)")->check(CLI::Range(1, 64));
  app.add_option("--schedule", a.schedule, "pipeline schedule")->check(CLI::IsMember({"gpipe", "1f1b", "interleaved"}));
  app.add_option("--virtual-stages", a.virtual_stages, "model chunks per pipeline rank (interleaved)")->check(CLI::Range(1, 64));
  app.add_option("--microbatches", a.microbatches, "micro-batches per forward/backward (0: pp x virtual stages)")
      ->check(CLI::Range(0, 4096));
  app.add_option("--accum", a.accum, "gradient accumulation steps per optimizer step")->check(CLI::Range(1, 4096));
  app.add_flag("--zero1", a.zero1, "shard the optimizer state over dp (ZeRO-1)");
  app.add_option("--backend", a.backend, "threads (no launcher) or mpi (under mpirun)")->check(CLI::IsMember({"threads", "mpi"}));
  app.add_option("--steps", a.steps, "optimizer steps (in all, counting resumed ones)")->check(CLI::Range(1, 1 << 30));
  app.add_option("--schedule-steps", a.schedule_steps, "length of the learning-rate schedule (0: --steps; on --resume: the checkpoint's)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--layers", a.layers, "transformer blocks")->check(CLI::Range(1, 1 << 30));
  app.add_option("--d-model", a.d_model, "model width")->check(CLI::Range(1, 1 << 30));
  app.add_option("--heads", a.heads, "attention heads")->check(CLI::Range(1, 1 << 30));
  app.add_option("--context", a.context, "sequence length")->check(CLI::Range(1, 65536));
  app.add_option("--batch", a.batch, "global batch in sequences per optimizer step")->check(CLI::Range(1, 1 << 30));
  app.add_option("--lr", a.lr, "peak learning rate");
  app.add_option("--min-lr", a.min_lr, "final learning rate of the cosine decay");
  app.add_option("--warmup", a.warmup, "warmup steps")->check(CLI::Range(0, 1 << 30));
  app.add_option("--clip", a.clip, "clip the global gradient norm to this (0: no clipping)");
  app.add_option("--weight-decay", a.weight_decay, "AdamW's decoupled weight decay");
  app.add_option("--seed", a.seed, "seed of the init, the data order and the sampling");
  app.add_option("--val-every", a.val_every, "validation interval in steps (0: never)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--log-every", a.log_every, "progress line interval in steps")->check(CLI::Range(1, 1 << 30));
  app.add_option("--sample-len", a.sample_len, "bytes to sample at the end (0: none)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--prompt", a.prompt, "text the sample starts from");
  app.add_option("--temperature", a.temperature, "sampling temperature (> 0)");
  app.add_option("--top-k", a.top_k, "sampling top-k (0: all)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--save", a.save, "checkpoint directory written at the end (and every --save-every steps)");
  app.add_option("--save-every", a.save_every, "checkpoint interval in steps (0: only at the end)")->check(CLI::Range(0, 1 << 30));
  app.add_option("--resume", a.resume, "checkpoint directory to continue from (saved at any layout)");
  app.add_flag("--generate", a.generate, "load --resume and only sample from it at this layout");
  app.add_option("--eval-model", a.eval_model, "evaluate a Hugging Face GPT-2 .safetensors file (needs --eval-tokens)");
  app.add_option("--eval-tokens", a.eval_tokens, "file of whitespace-separated token ids for --eval-model");
  app.add_option("--loss-csv", a.loss_csv, "write the loss curve as CSV");
  app.add_option("--loss-svg", a.loss_svg, "write the loss curve as an SVG picture");
  app.add_flag("--verify", a.verify, "also train serially in this process and print the largest loss difference");
  app.add_flag("--quiet", a.quiet, "no per-step lines");
  CLI11_PARSE(app, argc, argv);
  try {
    namespace fs = std::filesystem;
    // Started by mpirun without --backend mpi: every process would run the whole job alone.
    for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
      if (const char* n = std::getenv(var); n != nullptr && std::atoi(n) > 1 && a.backend != "mpi")
        throw Error(detail::str("train_gpt: started by mpirun as ", n, " processes but --backend is ", a.backend,
                                ": pass --backend mpi (or run without mpirun: the threads backend needs no launcher)"));
    TESSERA_EXPECTS(std::isfinite(a.lr) && a.lr > 0, "train_gpt: --lr ", a.lr, " must be a positive number");
    TESSERA_EXPECTS(std::isfinite(a.min_lr) && a.min_lr >= 0 && a.min_lr <= a.lr, "train_gpt: --min-lr ", a.min_lr,
                    " must be in [0, --lr ", a.lr, "]");
    TESSERA_EXPECTS(std::isfinite(a.clip) && a.clip >= 0, "train_gpt: --clip ", a.clip, " must be >= 0 (0: no clipping)");
    TESSERA_EXPECTS(std::isfinite(a.weight_decay) && a.weight_decay >= 0, "train_gpt: --weight-decay ", a.weight_decay,
                    " must be >= 0");
    TESSERA_EXPECTS(std::isfinite(a.temperature) && a.temperature > 0, "train_gpt: --temperature ", a.temperature,
                    " must be positive");
    if (!a.eval_model.empty()) {
      TESSERA_EXPECTS(!a.eval_tokens.empty(), "train_gpt: --eval-model needs --eval-tokens");
      run_ranks(a, argc, argv, [&](Comm& world) { eval_rank(world, a); });
      return 0;
    }
    TESSERA_EXPECTS(a.d_model % a.heads == 0, "train_gpt: d_model ", a.d_model, " is not divisible by heads ", a.heads);
    TESSERA_EXPECTS(a.heads % a.tp == 0, "train_gpt: tp ", a.tp, " does not divide the ", a.heads, " heads");
    TESSERA_EXPECTS(a.pp * a.virtual_stages <= a.layers + 2, "train_gpt: pp(", a.pp, ") x virtual stages(",
                    a.virtual_stages, ") exceeds the ", a.layers + 2, " pipeline layers (embedding, ", a.layers,
                    " blocks, head)");
    if (a.generate) {
      TESSERA_EXPECTS(!a.resume.empty(), "train_gpt: --generate needs --resume DIR");
      run_ranks(a, argc, argv, [&](Comm& world) { generate_rank(world, a); });
      return 0;
    }
    TESSERA_EXPECTS(fs::is_regular_file(a.data), "train_gpt: the text file ", a.data,
                    fs::exists(a.data) ? " is not a regular file" : " does not exist",
                    " (bash scripts/main_job.sh writes data/kjv.txt)");
    TESSERA_EXPECTS(a.batch % (a.dp * a.accum) == 0, "train_gpt: global batch ", a.batch,
                    " is not divisible by dp(", a.dp, ") x accum(", a.accum, ") = ", a.dp * a.accum);
    TESSERA_EXPECTS(a.batch / (a.dp * a.accum) >= a.num_microbatches(), "train_gpt: each forward/backward gets ",
                    a.batch / (a.dp * a.accum), " sequences (batch ", a.batch, " / dp ", a.dp, " / accum ", a.accum,
                    "), fewer than the ", a.num_microbatches(), " micro-batches");
    if (a.verify) {
      TESSERA_EXPECTS(a.backend == "threads", "train_gpt: --verify runs the serial reference in this process: use the "
                      "threads backend (drop --backend mpi)");
      TESSERA_EXPECTS(a.resume.empty(), "train_gpt: --verify compares a run from step 0; drop --resume");
    }
    // Everything a save or resume needs is checked before the first step, not after the last.
    if (!a.save.empty()) {
      const fs::path dir = fs::path(a.save).has_filename() ? fs::path(a.save) : fs::path(a.save).parent_path();
      if (fs::exists(dir)) {
        TESSERA_EXPECTS(fs::is_directory(dir), "train_gpt: --save ", dir, " exists and is not a directory");
        TESSERA_EXPECTS(fs::is_empty(dir) || fs::exists(dir / "index.json"), "train_gpt: --save ", dir,
                        " exists and is neither empty nor a checkpoint: refusing to replace it");
      } else {
        std::error_code ec;
        fs::create_directories(dir.has_parent_path() ? dir.parent_path() : fs::path("."), ec);
        TESSERA_EXPECTS(!ec, "train_gpt: cannot create the parent directory of --save ", dir, ": ", ec.message());
      }
    }
    if (!a.resume.empty()) {
      const checkpoint::CheckpointReader reader(a.resume);
      a.resume_step = reader.info().step;
      TESSERA_EXPECTS(a.steps > a.resume_step, "train_gpt: --steps ", a.steps, " is not beyond the checkpoint's step ",
                      a.resume_step, " (", a.resume, "); --steps counts all steps, the resumed ones included");
      // The learning-rate schedule continues where it was unless --schedule-steps says otherwise.
      if (a.schedule_steps == 0 && reader.info().extra.contains("schedule_steps"))
        a.schedule_steps = reader.info().extra["schedule_steps"].get<int>();
    }
    std::vector<Point> curve;
    run_ranks(a, argc, argv, [&](Comm& world) {
      auto c = train_rank(world, a, true);
      if (world.rank() == 0) curve = std::move(c);
    });
    if (!curve.empty()) write_curve(a, curve);
    if (a.verify) {
      // Round-off differences grow chaotically over a long run, so the serial check covers the
      // first 20 steps run here (same learning-rate schedule), the window the equivalence tests use.
      const int n = std::min<int>(20, static_cast<int>(curve.size()));
      // One line per step (9 digits, so a script can redo the comparison), then the largest
      // difference; a non-finite loss on either side counts as an infinite difference.
      const std::vector<double> serial = serial_losses(a, n);
      testing::WorstError worst;
      for (int i = 0; i < n; ++i) {
        const double parallel = curve[static_cast<std::size_t>(i)].train, ref = serial[static_cast<std::size_t>(i)];
        const double e = testing::rel_error(parallel, ref);
        worst.add(e);
        std::printf("verify: step %4d  loss %.9g  serial %.9g  relative difference %.3g\n", i, parallel, ref, e);
      }
      std::printf("verify: largest relative loss difference vs the serial run over the first %d steps: %.3g\n", n,
                  worst.value());
      if (!(worst.value() < 1e-4)) return 1;
    }
  } catch (const std::exception& e) {
    const std::string what = e.what();
    std::fprintf(stderr, "%s%s\n", what.rfind("train_gpt:", 0) == 0 ? "" : "train_gpt: ", what.c_str());
    return 1;
  }
  return 0;
}
