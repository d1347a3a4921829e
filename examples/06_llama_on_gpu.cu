// 06: example 04's Llama-style model (a user's model: examples/llama) trained on one GPU with
// DeviceLlama (examples/llama/device: tessera's device building blocks plus the model's own
// RMSNorm, rotary-embedding and SwiGLU kernels), on example 04's synthetic task (global batch
// 32 x 16, AdamW at 3e-3, gradients clipped to norm 1). It checks what tessera promises: the first 10 fp32 steps'
// losses equal the serial CPU Llama's (within 1e-4 relative), and the model learns (the loss
// after 60 steps below a tenth of the first; the CPU run reaches 0.04); then prints the GPU's step
// time in fp32 and bf16 (whose loss must halve over its 23 timed steps). Exits 77
// (a skip) where CUDA sees no device, saying why.
//
//   ./build/examples/06_llama_on_gpu
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <span>
#include <vector>

#include "llama/device/device_llama.cuh"
#include "llama/device/flat_layer_layout.hpp"
#include "llama/llama_model.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/optim/param_group.hpp"

using namespace tessera;
namespace tc = tessera::cuda;

namespace {

constexpr std::int64_t kRows = 32, kT = 16;

// Example 04's batch of step `step`: row g reads with stride 1 + g % 3 and predicts the next token.
void batch(int step, std::int64_t vocab, std::vector<std::int32_t>& x, std::vector<std::int32_t>& y) {
  x.resize(static_cast<std::size_t>(kRows * kT));
  y.resize(x.size());
  for (std::int64_t g = 0; g < kRows; ++g)
    for (std::int64_t t = 0; t < kT; ++t) {
      const std::int64_t stride = 1 + g % 3;
      const auto i = static_cast<std::size_t>(g * kT + t);
      x[i] = static_cast<std::int32_t>((5 * g + step + t * stride) % vocab);
      y[i] = static_cast<std::int32_t>((x[i] + stride) % vocab);
    }
}

}  // namespace

int main() {
  if (tc::device_count() == 0) {
    std::printf("SKIP: no CUDA device (%s): this example trains on a GPU\n", tc::no_device_reason().c_str());
    return 77;
  }
  const llama::LlamaConfig config{.vocab_size = 64, .n_layer = 4, .n_head = 8, .n_kv_head = 4, .d_model = 64,
                                  .ffn_hidden = 128};
  const optim::AdamWOptions opts{.lr = 3e-3, .weight_decay = 0.01};
  const int steps = 60, checked = 10;
  try {
    tc::set_device(0);
    llama::Llama<float> cpu(config, /*seed=*/1);
    const llama::device::FlatModelLayout layout = llama::device::flat_model_layout(config);
    const std::vector<float> w0 = llama::device::pack_model(cpu, layout);
    tc::Stream stream;
    tc::BlasLt blas(stream);
    llama::device::DeviceLlama<float> gpu(config, kRows, kT, w0, stream, blas);

    // The serial CPU run of the first steps, for the comparison.
    ParameterList<float> ps = cpu.parameters();
    optim::AdamW<float> opt(optim::weight_decay_groups(ps, opts));
    nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
    std::vector<std::int32_t> x, y;
    double worst = 0, first = 0, last = 0;
    for (int step = 0; step < steps; ++step) {
      batch(step, config.vocab_size, x, y);
      const double loss = gpu.forward_backward(x, y);
      gpu.step(opts, llama::device::DeviceLlama<float>::clip_scale(gpu.grad_norm(), 1.0));
      if (step < checked) {
        ps.zero_grad();
        auto [logits, ctx] = cpu.forward(Tensor<std::int32_t>::from(Shape{kRows, kT}, std::span<const std::int32_t>(x)));
        auto [ref, lctx] = ce.forward(logits, Tensor<std::int32_t>::from(Shape{kRows, kT}, std::span<const std::int32_t>(y)));
        cpu.backward(ce.backward(1.0f, lctx), ctx);
        optim::clip_grad_norm(ps, 1.0);
        opt.step();
        const double d = std::abs(loss - ref) / std::abs(static_cast<double>(ref));
        if (!(d <= worst)) worst = d;  // a NaN loss makes it NaN, and the check below fails
      }
      if (step == 0) first = loss;
      last = loss;
      if (step % 15 == 0) std::printf("step %2d  loss %.4f\n", step, loss);
    }
    std::printf("first %d steps against the serial CPU Llama: max relative loss difference %.2e\n", checked, worst);
    std::printf("final loss / first loss = %.3f\n", last / first);

    // Step time, fp32 and bf16 (mixed precision), after a warm-up, on the last batch; bf16 from
    // the initial weights, so its loss must fall over those 23 steps.
    double bf16_first = 0, bf16_last = 0;
    const auto time_steps = [&](auto& model, bool bf16) {
      int n = 0;
      const auto one = [&] {
        const double l = model.forward_backward(x, y);
        model.step(opts, model.clip_scale(model.grad_norm(), 1.0));
        if (bf16) (n++ == 0 ? bf16_first : bf16_last) = l;
      };
      for (int i = 0; i < 3; ++i) one();
      stream.synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 20; ++i) one();
      stream.synchronize();
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 20;
    };
    llama::device::DeviceLlama<tc::bf16> gpu_bf16(config, kRows, kT, w0, stream, blas);
    const double ms32 = time_steps(gpu, false), ms16 = time_steps(gpu_bf16, true);
    std::printf("bf16 from the initial weights, 23 steps on one batch: loss %.4f -> %.4f\n", bf16_first, bf16_last);
    cudaDeviceProp prop{};
    const char* name = cudaGetDeviceProperties(&prop, 0) == cudaSuccess ? prop.name : "CUDA device";
    std::printf("step time on %s: fp32 %.2f ms, bf16 %.2f ms (batch %lld x %lld tokens)\n", name, ms32, ms16,
                static_cast<long long>(kRows), static_cast<long long>(kT));
    const bool ok = worst < 1e-4 && last / first < 0.1 && bf16_last < 0.5 * bf16_first;
    std::printf("%s\n", ok ? "ok" : "FAIL: the GPU run differs from the CPU's or did not learn");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("FAIL: %s\n", e.what());
    return 1;
  }
}
