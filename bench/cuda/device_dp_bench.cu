// device_dp_bench: DeviceDataParallel on one GPU, dp ranks as threads sharing it (ThreadDeviceComm
// on a communication stream). Side by side in one run, the step time (forward, backward,
// reduction, gradient norm, AdamW; the median of the timed steps) of
//   - none:    every rank trains on its rows without reducing (the compute alone),
//   - end:     the buckets reduced after backward (DeviceDataParallel::finish only),
//   - overlap: each bucket reduced as soon as backward queued its last gradient (the hook),
// and the exposed communication per step (mode - none) and overlap's share hidden
// ((end - overlap) / (end - none)). The issue's benchmark "Overlap: DataParallel's backward with
// reduction on vs reduction off, and the exposed communication time per step". Then ZeRO-1
// (AdamW's moments sharded, the weights' shards all-gathered after the step), ZeRO-2 (the
// gradients too: per-bucket buffers reduced onto their owners) and ZeRO-3 (the weights too:
// each bucket's gathered when a product needs it), all overlapped, with the device's peak
// allocated bytes of the whole run (every rank, the caching allocator's) side by side. Exit 77 without a GPU, 2 when a loss is not
// finite.
//
//   device_dp_bench [--dp 2] [--layers 6 --d-model 192 --heads 6 --context 128 --batch 32] [--bucket-mib 1]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/cuda/caching_allocator.hpp"
#include "tessera/cuda/device.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_gpt.cuh"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/thread_device_comm.cuh"
#include "tessera/models/gpt.hpp"

using namespace tessera;
namespace tc = tessera::cuda;

namespace {

struct Options {
  int dp = 2;
  std::int64_t layers = 6, d_model = 192, heads = 6, context = 128, batch = 32, vocab = 256;
  double bucket_mib = 1.0;  // small enough for several buckets on the main job's model
  int steps = 20, warmup = 3;
};

// Median step seconds of `mode` (0 none, 1 end, 2 overlap, 3 ZeRO-1 overlapped, 4 ZeRO-2
// overlapped, 5 ZeRO-3 overlapped) on every rank; NaN loss -> exit 2.
double run(const Options& o, int mode) {
  const GPTConfig cfg{.vocab_size = o.vocab, .n_positions = o.context, .n_layer = o.layers, .n_head = o.heads,
                      .d_model = o.d_model};
  const auto medians = threads::run(o.dp, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    tc::ThreadDeviceComm comm(world.split(0, world.rank()), comm_stream);
    GPT<float> host(cfg, 1);
    const int zero = mode >= 3 ? mode - 2 : 0;
    tc::DeviceGPT<float> model(cfg, host.parameters(), compute, 0, zero > 0 ? o.dp : 1);
    if (zero > 0) model.shard_optimizer(world.rank(), o.dp);
    auto buckets = tc::device_grad_buckets(model.numel(), model.ready_offsets(),
                                           static_cast<std::int64_t>(o.bucket_mib * (1 << 20) / 4));
    std::optional<tc::DeviceDataParallel> ddp;
    if (zero >= 2) {
      model.shard_gradients(std::move(buckets));
      ddp.emplace(comm, compute, *model.bucket_gradients());
      if (zero == 3) model.shard_parameters(*ddp);
    } else {
      ddp.emplace(comm, compute, model.gradient_view(), std::move(buckets));
    }
    if (mode >= 2) model.set_backward_hook([&](std::int64_t offset) { ddp->gradients_final_from(offset); });
    const std::int64_t rows = o.batch / o.dp;
    std::mt19937 rng(1 + static_cast<unsigned>(world.rank()));
    Tensor<std::int32_t> x(Shape{rows, o.context}), y(Shape{rows, o.context});
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      x.data()[i] = static_cast<std::int32_t>(rng() % o.vocab);
      y.data()[i] = static_cast<std::int32_t>(rng() % o.vocab);
    }
    auto xd = tc::to_device<std::int32_t>(x, compute), yd = tc::to_device<std::int32_t>(y, compute);
    const double tokens = static_cast<double>(o.batch * o.context);
    const optim::AdamWOptions adamw{.lr = 1e-4, .weight_decay = 0.1};
    std::vector<double> times;
    for (int s = 0; s < o.warmup + o.steps; ++s) {
      world.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      model.zero_grad();
      model.forward_backward(xd, yd, static_cast<float>(1.0 / tokens));
      if (mode != 0) ddp->finish();
      double norm = 0;  // a host sync, as the trainer's clipping does
      if (zero >= 2) {  // each rank's shard's squares, summed over dp
        const tc::DeviceView<float> sum = model.grad_sum_of_squares();
        ddp->all_reduce(sum);
        norm = model.reduce_grad_norm(sum);
      } else {
        norm = model.grad_norm();
      }
      model.step(adamw, 1e-4, norm > 1.0 ? static_cast<float>(1.0 / (norm + 1e-6)) : 1.f);
      if (zero == 1 || zero == 2) {  // every rank updated its shard: gather them all (ZeRO-3 keeps it)
        const Shape shard{model.shard_end() - model.shard_begin()};
        ddp->gather(tc::DeviceView<const float>(model.master_view().data + model.shard_begin(), shard), model.master_view());
      }
      compute.synchronize();
      const double dt = world.all_reduce_value(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                                               ReduceOp::max);
      if (s >= o.warmup) times.push_back(dt);
    }
    if (!std::isfinite(model.take_loss_sum())) throw Error("device_dp_bench: a loss is not finite");
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
  });
  return medians[0];
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const double v = std::atof(argv[i + 1]);
    if (k == "--dp") o.dp = static_cast<int>(v);
    else if (k == "--layers") o.layers = static_cast<std::int64_t>(v);
    else if (k == "--d-model") o.d_model = static_cast<std::int64_t>(v);
    else if (k == "--heads") o.heads = static_cast<std::int64_t>(v);
    else if (k == "--context") o.context = static_cast<std::int64_t>(v);
    else if (k == "--batch") o.batch = static_cast<std::int64_t>(v);
    else if (k == "--bucket-mib") o.bucket_mib = v;
    else if (k == "--steps") o.steps = static_cast<int>(v);
    else {
      std::fprintf(stderr, "device_dp_bench: unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  if (tc::device_count() == 0) {
    std::printf("SKIP: no CUDA device (%s)\n", tc::no_device_reason().c_str());
    return 77;
  }
  if (o.dp < 1 || o.batch % o.dp != 0) {
    std::fprintf(stderr, "device_dp_bench: --batch %lld must be a multiple of --dp %d\n", static_cast<long long>(o.batch), o.dp);
    return 2;
  }
  try {
    const double none = run(o, 0), end = run(o, 1);
    tc::set_device(0);
    auto& mem = tc::default_allocator();
    double peak = 0;  // of the last measured() run: the device's peak allocated bytes over it
    const auto measured = [&](int mode) {
      mem.reset_peak();
      const double t = run(o, mode);
      peak = static_cast<double>(mem.stats().peak_allocated_bytes);
      return t;
    };
    const double overlap = measured(2), peak_plain = peak;
    const double zero1 = measured(3), peak_zero1 = peak;
    const double zero2 = measured(4), peak_zero2 = peak;
    const double zero3 = measured(5), peak_zero3 = peak;
    std::printf("device_dp_bench dp %d (threads on one GPU), %lld layers d %lld, batch %lld x %lld, buckets %.3g MiB\n",
                o.dp, static_cast<long long>(o.layers), static_cast<long long>(o.d_model),
                static_cast<long long>(o.batch), static_cast<long long>(o.context), o.bucket_mib);
    std::printf("step_ms none %.3f end %.3f overlap %.3f exposed_ms end %.3f overlap %.3f hidden %.2f\n", 1e3 * none,
                1e3 * end, 1e3 * overlap, 1e3 * (end - none), 1e3 * (overlap - none),
                end > none ? (end - overlap) / (end - none) : 0.0);
    std::printf("zero_step_ms plain %.3f zero1 %.3f zero2 %.3f zero3 %.3f peak_MB plain %.1f zero1 %.1f zero2 %.1f zero3 %.1f\n",
                1e3 * overlap, 1e3 * zero1, 1e3 * zero2, 1e3 * zero3, peak_plain / 1e6, peak_zero1 / 1e6,
                peak_zero2 / 1e6, peak_zero3 / 1e6);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "device_dp_bench: %s\n", e.what());
    return 2;
  }
  return 0;
}
