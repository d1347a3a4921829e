// 06: example 04's Llama-style model (a user's model: examples/llama) trained on one GPU with
// DeviceLlama (examples/llama/device: tessera's device building blocks plus the model's own
// RMSNorm, rotary-embedding and SwiGLU kernels), on example 04's synthetic task (global batch
// 32 x 16, AdamW at 3e-3, gradients clipped to norm 1). It checks what tessera promises: the first 10 fp32 steps'
// losses equal the serial CPU Llama's (within 1e-4 relative), and the model learns (the loss
// after 60 steps below a tenth of the first; the CPU run reaches 0.04); then prints the GPU's step
// time in fp32 and bf16 (whose loss must halve over its 23 timed steps). Exits 77
// (a skip) where CUDA sees no device, saying why.
//
// With a layout, the same model then trains at dp x tp x pp as threads sharing the GPU (the
// policies composed over the user's model: DeviceDataParallel's buckets reduced while backward
// runs, Megatron-style tensor parallelism of DeviceLlama, and its pipeline stages under a
// schedule, LlamaDevicePipeline), and its first 10 losses must equal the same serial CPU run's;
// it prints that layout's step time beside one GPU's.
//
//   ./build/examples/06_llama_on_gpu
//   ./build/examples/06_llama_on_gpu --dp 2 --tp 2 --pp 2 [--schedule 1f1b|gpipe|interleaved]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "llama/device/device_llama.cuh"
#include "llama/device/flat_layer_layout.hpp"
#include "llama/device/llama_pipeline.cuh"
#include "llama/llama_model.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/thread_device_comm.cuh"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/schedule/gpipe.hpp"
#include "tessera/schedule/interleaved_one_f_one_b.hpp"
#include "tessera/schedule/one_f_one_b.hpp"
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

// The layout of the second part (--dp, --tp, --pp, --schedule).
struct RunLayout {
  int dp = 1, tp = 1, pp = 1;
  std::string schedule = "1f1b";
  bool any() const { return dp * tp * pp > 1; }
};

// The layout's first `steps` losses and its mean step time (ms, after 2 warm-up steps): dp x tp x
// pp ranks as threads sharing GPU 0, each with its tp shard (and pipeline stages) of the model.
std::pair<std::vector<double>, double> train_layout(const llama::LlamaConfig& config, llama::Llama<float>& init,
                                                    const RunLayout& lay, const optim::AdamWOptions& opts, int steps) {
  namespace ld = llama::device;
  const int dp = lay.dp, tp = lay.tp, pp = lay.pp, v = lay.schedule == "interleaved" ? 2 : 1;
  const int m = pp > 1 ? 2 * pp : 1;  // micro-batches per dp rank and step
  TESSERA_EXPECTS(kRows % (dp * m) == 0, "06: the batch's ", kRows, " rows do not split over dp ", dp, " x ", m,
                  " micro-batches");
  const std::int64_t rows = kRows / dp / m;
  const ld::FlatModelLayout layout = ld::flat_model_layout(config, tp);
  std::vector<std::vector<float>> shards;
  for (int r = 0; r < tp; ++r) shards.push_back(ld::pack_model(init, layout, false, r));
  const StagePartition part = StagePartition::even(static_cast<int>(ld::pipeline_num_layers(config)), pp * v);
  const auto out = threads::run(dp * tp * pp, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    tc::BlasLt b(compute);
    const int tp_rank = world.rank() % tp, dp_rank = world.rank() / tp % dp, pp_rank = world.rank() / (tp * dp);
    tc::ThreadDeviceComm tpc(world.split(pp_rank * dp + dp_rank, tp_rank), compute);
    tc::ThreadDeviceComm ppc(world.split(dp_rank * tp + tp_rank, pp_rank), compute);
    tc::ThreadDeviceComm dpc(world.split(pp_rank * tp + tp_rank, dp_rank), comm_stream);
    const std::vector<float>& whole = shards[static_cast<std::size_t>(tp_rank)];
    const schedule::Schedule sched = pp == 1                        ? schedule::Schedule{}
                                     : lay.schedule == "gpipe"       ? schedule::GPipe{m}.build(pp)
                                     : lay.schedule == "interleaved" ? schedule::InterleavedOneFOneB{m, v}.build(pp)
                                                                     : schedule::OneFOneB{m}.build(pp);
    // This rank's model chunks: the whole model (pp 1) or its stages of the cut.
    std::vector<std::unique_ptr<ld::DeviceLlama<float>>> chunks;
    for (int st : pp > 1 ? sched.stages_of(pp_rank) : std::vector<int>{0}) {
      const tc::DeviceStage stage = pp > 1 ? ld::llama_device_stage(part, st) : tc::DeviceStage{};
      const ld::FlatRange r = ld::stage_range(layout, stage.first, stage.end < 0 ? part.num_layers() : stage.end);
      chunks.push_back(std::make_unique<ld::DeviceLlama<float>>(
          config, pp > 1 ? rows : kRows / dp, kT, std::vector<float>(whole.begin() + r.lo, whole.begin() + r.hi),
          compute, b, &tpc, stage));
    }
    std::vector<ld::DeviceLlama<float>*> raw;
    for (auto& c : chunks) raw.push_back(c.get());
    std::unique_ptr<ld::LlamaDevicePipeline<float>> pipe;
    if (pp > 1) pipe = std::make_unique<ld::LlamaDevicePipeline<float>>(raw, ppc, part, sched);
    // Data parallelism: one DeviceDataParallel per chunk; without a pipeline its buckets are
    // reduced while backward runs (the hook), under one after the step's backward passes.
    std::vector<std::unique_ptr<tc::DeviceDataParallel>> ddp;
    if (dp > 1)
      for (ld::DeviceLlama<float>* c : raw)
        ddp.push_back(std::make_unique<tc::DeviceDataParallel>(dpc, compute, c->gradient_view(),
                                                               tc::device_grad_buckets(c->numel(), c->ready_offsets(),
                                                                                       (4LL << 20) / 4)));
    if (dp > 1 && pp == 1) raw[0]->set_backward_hook([&](std::int64_t offset) { ddp[0]->gradients_final_from(offset); });
    std::vector<double> losses;
    std::vector<std::int32_t> x, y;
    double ms = 0;
    for (int step = 0; step < steps; ++step) {
      const auto t0 = std::chrono::steady_clock::now();
      batch(step, config.vocab_size, x, y);
      const std::size_t mine = static_cast<std::size_t>(kRows / dp * kT), lo = mine * static_cast<std::size_t>(dp_rank);
      double loss = 0;
      if (pp == 1) {
        const double local = raw[0]->forward_backward(std::span<const std::int32_t>(x).subspan(lo, mine),
                                                      std::span<const std::int32_t>(y).subspan(lo, mine),
                                                      1.0 / static_cast<double>(kRows * kT));
        for (auto& d : ddp) d->finish();
        loss = world.all_reduce_value(local, ReduceOp::sum) / (dp * tp * pp);  // every tp rank holds its dp rank's
      } else {
        std::vector<tc::DeviceTensor<std::int32_t>> xd, yd;
        std::vector<tc::DeviceMicroBatch> micro;
        const std::size_t n = static_cast<std::size_t>(rows * kT);
        for (int q = 0; q < m; ++q) {
          const std::size_t at = lo + n * static_cast<std::size_t>(q);
          xd.push_back(tc::to_device<std::int32_t>(Tensor<std::int32_t>::from(Shape{rows, kT}, std::span<const std::int32_t>(x).subspan(at, n)), compute));
          yd.push_back(tc::to_device<std::int32_t>(Tensor<std::int32_t>::from(Shape{rows, kT}, std::span<const std::int32_t>(y).subspan(at, n)), compute));
        }
        for (int q = 0; q < m; ++q) micro.push_back({xd[static_cast<std::size_t>(q)], yd[static_cast<std::size_t>(q)], {}});
        pipe->forward_backward(micro, 1.f / static_cast<float>(kRows * kT));
        for (auto& d : ddp) d->finish();
        loss = world.all_reduce_value(pipe->take_loss_sum(), ReduceOp::sum) / tp / static_cast<double>(kRows * kT);
      }
      const double norm = pipe ? pipe->grad_norm() : raw[0]->grad_norm();
      for (ld::DeviceLlama<float>* c : raw) c->step(opts, ld::DeviceLlama<float>::clip_scale(norm, 1.0));
      compute.synchronize();
      if (step >= 2) ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      losses.push_back(loss);
    }
    return std::pair{losses, ms / std::max(1, steps - 2)};
  });
  return out.front();
}

// --dp N --tp N --pp N --schedule S; exits 2 naming a bad argument.
RunLayout parse(int argc, char** argv) {
  RunLayout lay;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "06: %s needs a value (usage: --dp N --tp N --pp N --schedule 1f1b|gpipe|interleaved)\n", a.c_str());
      std::exit(2);
    }
    const std::string value = argv[++i];
    if (a == "--schedule") {
      if (value != "1f1b" && value != "gpipe" && value != "interleaved") {
        std::fprintf(stderr, "06: --schedule %s: expected 1f1b, gpipe or interleaved\n", value.c_str());
        std::exit(2);
      }
      lay.schedule = value;
      continue;
    }
    int* field = a == "--dp" ? &lay.dp : a == "--tp" ? &lay.tp : a == "--pp" ? &lay.pp : nullptr;
    char* end = nullptr;
    const long n = std::strtol(value.c_str(), &end, 10);
    if (field == nullptr || end == value.c_str() || *end != '\0' || n < 1 || n > 8) {
      std::fprintf(stderr, "06: %s %s: expected --dp, --tp or --pp with a count from 1 to 8, or --schedule\n", a.c_str(),
                   value.c_str());
      std::exit(2);
    }
    *field = static_cast<int>(n);
  }
  return lay;
}

}  // namespace

int main(int argc, char** argv) {
  const RunLayout lay = parse(argc, argv);
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
    std::vector<double> cpu_losses;
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
        cpu_losses.push_back(ref);
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
    bool ok = worst < 1e-4 && last / first < 0.1 && bf16_last < 0.5 * bf16_first;
    if (lay.any()) {  // the same model at the layout, from the same initial weights
      llama::Llama<float> init(config, /*seed=*/1);
      const auto [losses, ms] = train_layout(config, init, lay, opts, checked);
      double worst_layout = 0;
      for (int i = 0; i < checked; ++i) {
        const double d = std::abs(losses[static_cast<std::size_t>(i)] - cpu_losses[static_cast<std::size_t>(i)]) /
                         std::abs(cpu_losses[static_cast<std::size_t>(i)]);
        if (!(d <= worst_layout)) worst_layout = d;
      }
      std::printf("dp %d x tp %d x pp %d%s on one GPU (threads): first %d steps against the serial CPU Llama: max "
                  "relative loss difference %.2e; step time %.2f ms (one GPU: %.2f ms)\n", lay.dp, lay.tp, lay.pp,
                  lay.pp > 1 ? (" (" + lay.schedule + ")").c_str() : "", checked, worst_layout, ms, ms32);
      ok = ok && worst_layout < 1e-4;
    }
    std::printf("%s\n", ok ? "ok" : "FAIL: the GPU run differs from the CPU's or did not learn");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("FAIL: %s\n", e.what());
    return 1;
  }
}
