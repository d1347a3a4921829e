// gpt_device_bench: tokens/s and model FLOPs utilization of DeviceGPT training steps (forward,
// backward, gradient norm, AdamW) on one GPU, the figures the GPU issue compares with PyTorch
// (bench/cuda/pytorch_gpt.py prints the same line for the same model). Random tokens (the speed
// does not depend on them); warmup steps first; the timed steps end with a stream synchronize.
// Prints one line: "tessera <name> <dtype> tokens/s <X> step_ms <Y> mfu <Z>". After it,
// --profile-steps more steps (default 3, after one uncounted) with DeviceGPT's phase timer on
// (CUDA events between the phases: a picture of where a step's time goes without a profiler)
// print one line "phases <name> <dtype>: <phase> <ms per step> ms [<TFLOP/s> TF/s], ..." (the
// GEMM, LM head and attention phases with their FLOP rates: GEMMs 2mnk, attention the causal
// half of its products, the fused backward 2.5 x forward as FlashAttention's papers count, the
// unfused 2 x). Exit 2 where
// the loss is not finite (a wrong result is not a speed), 77 where no GPU exists.
//
//   gpt_device_bench --layers 12 --d-model 768 --heads 12 --context 1024 --batch 16 --dtype bf16
//                    [--attention flash|flash-cuda-cores|unfused]   (the fused kernels: for bf16 on tensor
//                    cores; the fused kernels on CUDA cores; the unfused reference: default)
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/models/gpt.hpp"

using namespace tessera;
namespace tc = tessera::cuda;

namespace {

struct Options {
  std::int64_t layers = 6, d_model = 192, heads = 6, context = 128, batch = 32, vocab = 256;
  int steps = 20, warmup = 3, profile_steps = 3;
  std::string dtype = "fp32", name = "gpt", attention = "unfused";
  double peak_tflops = 989.0;  // H100/H200 SXM dense bf16 (the issue's reference)
};

template <class C>
int run(const Options& o) {
  const GPTConfig cfg{.vocab_size = o.vocab, .n_positions = o.context, .n_layer = o.layers, .n_head = o.heads,
                      .d_model = o.d_model};
  GPT<float> host(cfg, 1);
  tc::Stream stream;
  tc::DeviceGPT<C> model(cfg, host.parameters(), stream);
  model.set_fused_attention(o.attention != "unfused",
                            o.attention == "flash-cuda-cores" ? tc::ops::FlashPath::cuda_cores : tc::ops::FlashPath::automatic);
  std::mt19937 rng(1);
  Tensor<std::int32_t> x(Shape{o.batch, o.context}), y(Shape{o.batch, o.context});
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    x.data()[i] = static_cast<std::int32_t>(rng() % o.vocab);
    y.data()[i] = static_cast<std::int32_t>(rng() % o.vocab);
  }
  auto xd = tc::to_device<std::int32_t>(x, stream), yd = tc::to_device<std::int32_t>(y, stream);
  const double tokens = static_cast<double>(o.batch * o.context);
  const optim::AdamWOptions adamw{.lr = 1e-4, .weight_decay = 0.1};
  auto one_step = [&] {
    model.zero_grad();
    model.forward_backward(xd, yd, static_cast<float>(1.0 / tokens));
    const double norm = model.grad_norm();  // a host sync, as the trainer's clipping does
    model.step(adamw, 1e-4, norm > 1.0 ? static_cast<float>(1.0 / (norm + 1e-6)) : 1.f);
  };
  for (int i = 0; i < o.warmup; ++i) one_step();
  stream.synchronize();
  (void)model.take_loss_sum();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < o.steps; ++i) one_step();
  stream.synchronize();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double loss = model.take_loss_sum() / (tokens * o.steps);
  if (!std::isfinite(loss)) {
    std::printf("tessera %s %s: the loss is not finite (%g)\n", o.name.c_str(), o.dtype.c_str(), loss);
    return 2;
  }
  // FLOPs per token: 6 N (forward and backward through every parameter) + 12 L d T (attention's
  // two products forward and backward), as PaLM's appendix counts it.
  const double n = static_cast<double>(model.parameter_count());
  const double flops_per_token = 6 * n + 12.0 * o.layers * o.d_model * o.context;
  const double tps = tokens * o.steps / s;
  std::printf("tessera %s %s tokens/s %.0f step_ms %.3f mfu %.4f loss %.4f params %.0f\n", o.name.c_str(),
              o.dtype.c_str(), tps, 1e3 * s / o.steps, tps * flops_per_token / (o.peak_tflops * 1e12), loss, n);
  std::fflush(stdout);  // the figure stands whatever the profiling below does
  // Where the time goes: a few more steps with the phase timer on (its synchronizations are
  // outside the timed steps above).
  if (o.profile_steps > 0) try {
    model.phase_timer().enable(true);
    for (int i = 0; i <= o.profile_steps; ++i) {  // the first creates the events: not counted
      one_step();
      model.phase_timer().end_step(stream);
      if (i == 0) model.phase_timer().clear();
    }
    model.phase_timer().enable(false);
    const double N = tokens, D = static_cast<double>(o.d_model), L = static_cast<double>(o.layers);
    const double V = static_cast<double>(o.vocab), T = static_cast<double>(o.context);
    const double gemm_fwd = L * 24.0 * N * D * D, head_fwd = 2.0 * N * D * V;
    const double attn_fwd = L * 2.0 * N * T * D;  // QK^T and PV, 2 T hd per head and row each, the causal half
    const auto flops = [&](const std::string& ph) {
      if (ph == "gemm fwd") return gemm_fwd;
      if (ph == "gemm bwd") return 2 * gemm_fwd;
      if (ph == "lm head fwd") return head_fwd;
      if (ph == "lm head bwd") return 2 * head_fwd;
      if (ph == "attention fwd") return attn_fwd;
      // FlashAttention's backward recomputes the scores (2.5 x forward, as its papers count); the
      // unfused one reads the stored probabilities (2 x).
      if (ph == "attention bwd") return (o.attention == "unfused" ? 2.0 : 2.5) * attn_fwd;
      return 0.0;
    };
    const tc::PhaseTotals& t = model.phase_timer().totals();
    std::string line;
    for (const auto& [ph, ms] : t.totals()) {
      const double per = ms / t.steps();
      char buf[160];
      if (flops(ph) > 0 && per > 0)
        std::snprintf(buf, sizeof buf, "%s%s %.2f ms %.0f TF/s", line.empty() ? "" : ", ", ph.c_str(), per,
                      flops(ph) / (per * 1e-3) / 1e12);
      else
        std::snprintf(buf, sizeof buf, "%s%s %.2f ms", line.empty() ? "" : ", ", ph.c_str(), per);
      line += buf;
    }
    std::printf("phases %s %s: %s (sum %.2f ms per step)\n", o.name.c_str(), o.dtype.c_str(), line.c_str(),
                t.total_ms() / t.steps());
  } catch (const std::exception& e) {  // the speed above stands; say why there is no breakdown
    std::printf("phases %s %s: not measured (%s)\n", o.name.c_str(), o.dtype.c_str(), e.what());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--layers") o.layers = std::atoll(v.c_str());
    else if (k == "--d-model") o.d_model = std::atoll(v.c_str());
    else if (k == "--heads") o.heads = std::atoll(v.c_str());
    else if (k == "--context") o.context = std::atoll(v.c_str());
    else if (k == "--batch") o.batch = std::atoll(v.c_str());
    else if (k == "--vocab") o.vocab = std::atoll(v.c_str());
    else if (k == "--steps") o.steps = std::atoi(v.c_str());
    else if (k == "--warmup") o.warmup = std::atoi(v.c_str());
    else if (k == "--profile-steps") o.profile_steps = std::atoi(v.c_str());
    else if (k == "--dtype") o.dtype = v;
    else if (k == "--name") o.name = v;
    else if (k == "--attention") o.attention = v;
    else if (k == "--peak-tflops") o.peak_tflops = std::atof(v.c_str());
    else {
      std::fprintf(stderr, "gpt_device_bench: unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  if (o.attention != "flash" && o.attention != "flash-cuda-cores" && o.attention != "unfused") {
    std::fprintf(stderr, "gpt_device_bench: --attention %s is not flash, flash-cuda-cores or unfused\n", o.attention.c_str());
    return 2;
  }
  if (tc::device_count() == 0) {
    std::printf("SKIP: no CUDA device (%s)\n", tc::no_device_reason().c_str());
    return 77;
  }
  try {
    if (o.dtype == "bf16") return run<tc::bf16>(o);
    if (o.dtype == "fp32") return run<float>(o);
    std::fprintf(stderr, "gpt_device_bench: --dtype %s is not fp32 or bf16\n", o.dtype.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt_device_bench: %s\n", e.what());
    return 2;
  }
}
