// The Llama example's own device kernels (examples/llama/device/llama_kernels.cuh) against its CPU
// layers (examples/llama/llama_layers.hpp), fp32 within 1e-5 relative (norm-wise), bf16 within its
// rounding: RMSNorm forward and backward (and its weight gradient bitwise the same on a second
// run), SwiGLU forward and backward, and causal grouped-query attention with rotary embeddings
// built as the device Llama builds it, rope_expand -> tessera's attention -> rope_reduce, against
// RotaryAttentionCore forward and backward; and the whole decoder layer on the device
// (DeviceDecoderLayer) against llama::DecoderLayer, and the whole model trained on the device
// (DeviceLlama, 4 AdamW steps) against the CPU Llama, and at dp 2 (threads sharing the GPU,
// DeviceDataParallel) against one rank on the whole batch; the layer at tp 2 (threads sharing the
// GPU) against the whole layer, and the whole model at tp 2 and dp 2 x tp 2 against the CPU
// Llama; the model's pipeline stages under 1F1B, GPipe and interleaved 1F1B at pp 2, pp 2 x tp 2
// and dp 2 x pp 2 against the CPU Llama. Needs a GPU (gpu_main.cpp skips without one).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "device_op_support.hpp"
#include "llama/device/device_decoder_layer.cuh"
#include "llama/device/device_llama.cuh"
#include "llama/device/llama_kernels.cuh"
#include "llama/device/llama_pipeline.cuh"
#include "llama/llama_layers.hpp"
#include "llama/llama_model.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device_data_parallel.hpp"
#include "tessera/cuda/device_grad_buckets.hpp"
#include "tessera/cuda/thread_device_comm.cuh"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/attention.cuh"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/schedule/gpipe.hpp"
#include "tessera/schedule/interleaved_one_f_one_b.hpp"
#include "tessera/schedule/one_f_one_b.hpp"
#include "tessera/schedule/zero_bubble_h1.hpp"

using namespace tessera;
using namespace device_op_test;
namespace tc = tessera::cuda;
namespace ld = llama::device;

namespace {

constexpr double kClipL = 0.05;  // below these models' gradient norms: every step clips

}  // namespace

TEST_CASE("llama kernels: RMSNorm forward and backward equal llama::RMSNorm (fp32; bf16 within its rounding)") {
  const std::int64_t B = 3, Tn = 97, C = 80;  // 291 rows: three weight-gradient chunks, the last partial
  const Tensor<float> x = randn(Shape{B, Tn, C}, 31), dy = randn(Shape{B, Tn, C}, 32), w = randn(Shape{C}, 33);
  llama::RMSNorm<float> norm(C, {}, 1e-6f);
  norm.weight().value.copy_from(w);
  auto [y_ref, ctx] = norm.forward(x);
  const Tensor<float> dx_ref = norm.backward(dy, ctx);
  auto xd = dev(x), dyd = dev(dy), wd = dev(w);
  auto y = tc::DeviceTensor<float>::empty(Shape{B, Tn, C}, stream());
  auto dx = tc::DeviceTensor<float>::empty(Shape{B, Tn, C}, stream());
  auto rstd = tc::DeviceTensor<float>::empty(Shape{B * Tn}, stream());
  auto partial = tc::DeviceTensor<float>::empty(Shape{ld::rms_norm_partial_size(B * Tn, C)}, stream());
  auto dw1 = dev(Tensor<float>(Shape{C})), dw2 = dev(Tensor<float>(Shape{C}));
  ld::rms_norm_forward<float>(stream(), xd, wd, y, rstd, 1e-6f);
  ld::rms_norm_backward<float>(stream(), dyd, xd, wd, rstd, dx, dw1, partial);
  ld::rms_norm_backward<float>(stream(), dyd, xd, wd, rstd, dx, dw2, partial);
  CHECK(rel(host(y), y_ref) < 1e-5);
  CHECK(rel(host(rstd), ctx.rstd) < 1e-5);
  CHECK(rel(host(dx), dx_ref) < 1e-5);
  CHECK(rel(host(dw1), norm.weight().grad) < 1e-5);
  const Tensor<float> g1 = host(dw1), g2 = host(dw2);
  for (std::int64_t j = 0; j < C; ++j) CHECK(g1.data()[j] == g2.data()[j]);  // deterministic
  // bf16 storage: within bf16 rounding of the fp32 layer.
  auto xb = dev<tc::bf16>(x), wb = dev<tc::bf16>(w);
  auto yb = tc::DeviceTensor<tc::bf16>::empty(Shape{B, Tn, C}, stream());
  ld::rms_norm_forward<tc::bf16>(stream(), xb, wb, yb, rstd, 1e-6f);
  CHECK(rel(host(yb), y_ref) < 1e-2);
  // Shapes that disagree are refused, naming them.
  auto bad = tc::DeviceTensor<float>::empty(Shape{C + 1}, stream());
  CHECK_THROWS_WITH_AS(ld::rms_norm_forward<float>(stream(), xd, bad, y, rstd), doctest::Contains("weight (81)"),
                       Error);
}

TEST_CASE("llama kernels: SwiGLU forward and backward equal llama::SwiGLU") {
  const std::int64_t rows = 131, F = 57;
  const Tensor<float> x = randn(Shape{rows, 2 * F}, 34), dy = randn(Shape{rows, F}, 35);
  llama::SwiGLU<float> act;
  auto [y_ref, ctx] = act.forward(x);
  const Tensor<float> dx_ref = act.backward(dy, ctx);
  auto xd = dev(x), dyd = dev(dy);
  auto y = tc::DeviceTensor<float>::empty(Shape{rows, F}, stream());
  auto dx = tc::DeviceTensor<float>::empty(Shape{rows, 2 * F}, stream());
  ld::swiglu_forward<float>(stream(), xd, y);
  ld::swiglu_backward<float>(stream(), xd, dyd, dx);
  CHECK(rel(host(y), y_ref) < 1e-5);
  CHECK(rel(host(dx), dx_ref) < 1e-5);
  CHECK_THROWS_WITH_AS(ld::swiglu_forward<float>(stream(), dyd, y), doctest::Contains("[gate | up]"), Error);
}

TEST_CASE("llama kernels: rope_expand -> tessera's attention -> rope_reduce equals RotaryAttentionCore (GQA, MQA, MHA)") {
  for (const auto& hg : {std::pair<std::int64_t, std::int64_t>{4, 2}, {4, 1}, {3, 3}}) {
    const std::int64_t H = hg.first, G = hg.second;  // query heads, KV heads
    CAPTURE(H);
    CAPTURE(G);
    const std::int64_t B = 2, Tn = 13, hd = 8, C = H * hd;
    const llama::device_math::RopeShape s{.seq = Tn, .heads = H, .kv_heads = G, .head_dim = hd};
    const Tensor<float> qkv = randn(Shape{B, Tn, s.gqa_cols()}, 36), dy = randn(Shape{B, Tn, C}, 37);
    llama::RotaryAttentionCore<float> core(H, G, hd, 10000.0);
    auto [y_ref, ctx] = core.forward(qkv);
    const Tensor<float> dqkv_ref = core.backward(dy, ctx);
    const ld::RopeTable table = ld::make_rope_table(stream(), Tn, hd, 10000.0);
    auto qkv_d = dev(qkv), dy_d = dev(dy);
    auto expd = tc::DeviceTensor<float>::empty(Shape{B, Tn, s.mha_cols()}, stream());
    auto dexp = tc::DeviceTensor<float>::empty(Shape{B, Tn, s.mha_cols()}, stream());
    auto dqkv = tc::DeviceTensor<float>::empty(Shape{B, Tn, s.gqa_cols()}, stream());
    auto probs = tc::DeviceTensor<float>::empty(Shape{B, H, Tn, Tn}, stream());
    auto dprobs = tc::DeviceTensor<float>::empty(Shape{B, H, Tn, Tn}, stream());
    auto y = tc::DeviceTensor<float>::empty(Shape{B, Tn, C}, stream());
    auto qkvp = tc::DeviceTensor<float>::empty(Shape{3 * B * H * Tn * hd}, stream());
    auto dqkvp = tc::DeviceTensor<float>::empty(Shape{3 * B * H * Tn * hd}, stream());
    auto heads = tc::DeviceTensor<float>::empty(Shape{B * H * Tn * hd}, stream());
    ld::rope_expand<float>(stream(), qkv_d, table, s, expd);
    tc::ops::attention_forward<float>(stream(), blas(), expd, H, qkvp, probs, heads, y);
    CHECK(rel(host(y), y_ref) < 1e-5);
    tc::ops::attention_backward<float>(stream(), blas(), dy_d, qkvp, H, probs, heads, dprobs, dqkvp, dexp);
    ld::rope_reduce<float>(stream(), dexp, table, s, dqkv);
    CHECK(rel(host(dqkv), dqkv_ref) < 1e-5);
  }
  const llama::device_math::RopeShape s{.seq = 4, .heads = 4, .kv_heads = 3, .head_dim = 8};
  const ld::RopeTable table = ld::make_rope_table(stream(), 4, 8, 10000.0);
  auto a = tc::DeviceTensor<float>::empty(Shape{1, 4, 80}, stream());
  auto b = tc::DeviceTensor<float>::empty(Shape{1, 4, 96}, stream());
  CHECK_THROWS_WITH_AS(ld::rope_expand<float>(stream(), a, table, s, b), doctest::Contains("kv_heads 3"), Error);
}

TEST_CASE("llama DeviceDecoderLayer: forward, input gradient and every weight gradient equal llama::DecoderLayer, with the unfused attention and with the fused kernels (fp32; bf16 forward within its rounding)") {
  const llama::LlamaConfig config{.vocab_size = 64, .n_layer = 2, .n_head = 4, .n_kv_head = 2, .d_model = 48,
                                  .ffn_hidden = 40};
  const std::int64_t B = 2, Tn = 11, d = config.d_model;
  llama::DecoderLayer<float> cpu = llama::decoder_layer<float>(config, 1, 5);
  unsigned seed = 50;  // every parameter its own values (the norms' weights too, not 1)
  for (Parameter<float>& p : cpu.parameters()) p.value.copy_from(randn(p.value.shape(), seed++, 0.2f));
  const Tensor<float> x = randn(Shape{B, Tn, d}, 41), dy = randn(Shape{B, Tn, d}, 42);
  auto [y_ref, ctx] = cpu.forward(x);
  const Tensor<float> dx_ref = cpu.backward(dy, ctx);
  ld::DeviceDecoderLayer<float> layer(config, B, Tn, stream(), blas());
  const ld::FlatLayerLayout& l = layer.layout();
  const std::vector<float> w_host = ld::pack_layer(cpu, l), g_ref = ld::pack_layer(cpu, l, /*grads=*/true);
  auto w = dev(Tensor<float>::from(Shape{l.total}, std::span<const float>(w_host)));
  auto xd = dev(x), dyd = dev(dy);
  // The unfused attention (this layer's), then the fused kernels (a layer on a fused scratch).
  auto fused_scratch = std::make_shared<ld::DecoderScratch<float>>(config, B, Tn, stream(), 1, /*fused_attention=*/true);
  ld::DeviceDecoderLayer<float> fused_layer(config, B, Tn, stream(), blas(), fused_scratch);
  for (ld::DeviceDecoderLayer<float>* run : {&layer, &fused_layer}) {
    CAPTURE(run == &fused_layer);
    auto g = dev(Tensor<float>(Shape{l.total}));
    auto y = tc::DeviceTensor<float>::empty(Shape{B, Tn, d}, stream());
    auto dx = tc::DeviceTensor<float>::empty(Shape{B, Tn, d}, stream());
    run->forward(xd, w.data(), y);
    run->backward(dyd, w.data(), g.data(), dx);
    CHECK(rel(host(y), y_ref) < 1e-5);
    CHECK(rel(host(dx), dx_ref) < 1e-5);
    const Tensor<float> gd = host(g);
    for (int t = 0; t < 6; ++t) {  // each tensor on its own, so one wrong gradient is named
      CAPTURE(t);
      const auto tt = static_cast<ld::LayerTensor>(t);
      Tensor<float> a(Shape{l.size(tt)}), b(Shape{l.size(tt)});
      for (std::int64_t i = 0; i < l.size(tt); ++i) {
        a.data()[i] = gd.data()[l.at(tt) + i];
        b.data()[i] = g_ref[static_cast<std::size_t>(l.at(tt) + i)];
      }
      CHECK(rel(a, b) < 1e-5);
    }
  }
  // bf16 storage (fp32 gradients): the forward within bf16's rounding of the fp32 layer.
  ld::DeviceDecoderLayer<tc::bf16> lb(config, B, Tn, stream(), blas());
  auto wb = dev<tc::bf16>(Tensor<float>::from(Shape{l.total}, std::span<const float>(w_host)));
  auto xb = dev<tc::bf16>(x);
  auto yb = tc::DeviceTensor<tc::bf16>::empty(Shape{B, Tn, d}, stream());
  lb.forward(xb, wb.data(), yb);
  CHECK(rel(host(yb), y_ref) < 3e-2);
  auto dyb = dev<tc::bf16>(dy);
  auto dxb = tc::DeviceTensor<tc::bf16>::empty(Shape{B, Tn, d}, stream());
  auto gb = dev(Tensor<float>(Shape{l.total}));
  lb.backward(dyb, wb.data(), gb.data(), dxb);
  CHECK(rel(host(dxb), dx_ref) < 5e-2);
  CHECK(rel(host(gb), Tensor<float>::from(Shape{l.total}, std::span<const float>(g_ref))) < 5e-2);
  CHECK_THROWS_WITH_AS(layer.forward(dyd, w.data(), tc::DeviceTensor<float>::empty(Shape{B, Tn + 1, d}, stream())),
                       doctest::Contains("must both be"), Error);
}

TEST_CASE("llama DeviceLlama: 4 clipped AdamW steps on one GPU equal the CPU Llama's (losses, gradient norms, gradients, weights; fp32, and bf16 within its rounding)") {
  const llama::LlamaConfig config{.vocab_size = 50, .n_layer = 2, .n_head = 4, .n_kv_head = 2, .d_model = 32,
                                  .ffn_hidden = 24};
  const std::int64_t B = 2, Tn = 9, N = B * Tn;
  const optim::AdamWOptions opts{.lr = 3e-3, .weight_decay = 0.1};
  llama::Llama<float> cpu(config, 3);
  ParameterList<float> ps = cpu.parameters();
  optim::AdamW<float> opt(optim::weight_decay_groups(ps, opts));
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  const ld::FlatModelLayout m = ld::flat_model_layout(config);
  const std::vector<float> w0 = ld::pack_model(cpu, m);
  ld::DeviceLlama<float> gpu(config, B, Tn, w0, stream(), blas());
  ld::DeviceLlama<tc::bf16> gpu_bf16(config, B, Tn, w0, stream(), blas());
  std::mt19937 rng(9);
  std::uniform_int_distribution<int> tok(0, static_cast<int>(config.vocab_size) - 1);
  double worst_loss = 0, worst_bf16 = 0;
  for (int step = 0; step < 4; ++step) {
    CAPTURE(step);
    std::vector<std::int32_t> x(static_cast<std::size_t>(N)), y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = tok(rng), y[i] = tok(rng);
    ps.zero_grad();
    auto [logits, ctx] = cpu.forward(Tensor<std::int32_t>::from(Shape{B, Tn}, std::span<const std::int32_t>(x)));
    auto [loss, lctx] = ce.forward(logits, Tensor<std::int32_t>::from(Shape{B, Tn}, std::span<const std::int32_t>(y)));
    cpu.backward(ce.backward(1.0f, lctx), ctx);
    const double l = gpu.forward_backward(x, y), lb = gpu_bf16.forward_backward(x, y);
    const double norm = gpu.grad_norm(), norm_bf16 = gpu_bf16.grad_norm();
    const double d = std::abs(l - loss) / std::abs(static_cast<double>(loss)),
                 db = std::abs(lb - loss) / std::abs(static_cast<double>(loss));
    if (!(d <= worst_loss)) worst_loss = d;  // a NaN sticks (std::max would drop it)
    if (!(db <= worst_bf16)) worst_bf16 = db;
    if (step == 0) {  // every gradient, before the first step (bf16: within its rounding)
      const std::vector<float> g_ref = ld::pack_model(cpu, m, /*grads=*/true), g = gpu.download_grads(),
                               gb = gpu_bf16.download_grads();
      const Tensor<float> want = Tensor<float>::from(Shape{m.total}, std::span<const float>(g_ref));
      CHECK(rel(Tensor<float>::from(Shape{m.total}, std::span<const float>(g)), want) < 1e-5);
      CHECK(rel(Tensor<float>::from(Shape{m.total}, std::span<const float>(gb)), want) < 5e-2);
    }
    const double norm_ref = optim::clip_grad_norm(ps, kClipL);
    CHECK(norm_ref > kClipL);  // every step clips (the check below is not empty)
    CHECK(std::abs(norm - norm_ref) <= 1e-5 * norm_ref);
    CHECK(std::abs(norm_bf16 - norm_ref) <= 5e-2 * norm_ref);
    opt.step();
    gpu.step(opts, ld::DeviceLlama<float>::clip_scale(norm, kClipL));
    gpu_bf16.step(opts, ld::DeviceLlama<tc::bf16>::clip_scale(norm_bf16, kClipL));
  }
  CHECK(worst_loss < 1e-5);
  CHECK(worst_bf16 < 2e-2);
  const std::vector<float> w_ref = ld::pack_model(cpu, m), w = gpu.download(), wb = gpu_bf16.download();
  CHECK(rel(Tensor<float>::from(Shape{m.total}, std::span<const float>(w)),
              Tensor<float>::from(Shape{m.total}, std::span<const float>(w_ref))) < 1e-5);
  // bf16: what the 4 steps moved, against what the CPU's moved (a frozen model would be 1 away,
  // a wrong sign 2; bf16's rounding of the gradients flips only near-zero elements' steps).
  Tensor<float> moved(Shape{m.total}), moved_ref(Shape{m.total});
  for (std::int64_t i = 0; i < m.total; ++i) {
    moved.data()[i] = wb[static_cast<std::size_t>(i)] - w0[static_cast<std::size_t>(i)];
    moved_ref.data()[i] = w_ref[static_cast<std::size_t>(i)] - w0[static_cast<std::size_t>(i)];
  }
  CHECK(rel(moved, moved_ref) < 0.3);
  // Bad input is refused before any work, naming it.
  std::vector<std::int32_t> bad(static_cast<std::size_t>(N), 1);
  bad[5] = static_cast<std::int32_t>(config.vocab_size);
  CHECK_THROWS_WITH_AS(gpu.forward_backward(bad, bad), doctest::Contains("outside the vocabulary [0, 50)"), Error);
  CHECK_THROWS_WITH_AS(ld::DeviceLlama<float>(config, B, Tn, std::vector<float>(7), stream(), blas()),
                       doctest::Contains("7 weights"), Error);
}

TEST_CASE("llama DeviceLlama under DeviceDataParallel: dp 2 on one GPU (threads) trains as one DeviceLlama on the whole batch") {
  const llama::LlamaConfig config{.vocab_size = 50, .n_layer = 2, .n_head = 4, .n_kv_head = 2, .d_model = 32,
                                  .ffn_hidden = 24};
  const std::int64_t rows = 4, Tn = 9;
  const int steps = 4, dp = 2;
  const optim::AdamWOptions opts{.lr = 3e-3, .weight_decay = 0.1};
  llama::Llama<float> init(config, 3);
  const ld::FlatModelLayout m = ld::flat_model_layout(config);
  const std::vector<float> w0 = ld::pack_model(init, m);
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> tok(0, static_cast<int>(config.vocab_size) - 1);
  std::vector<std::vector<std::int32_t>> xs, ys;
  for (int s = 0; s < steps; ++s) {
    xs.emplace_back(static_cast<std::size_t>(rows * Tn));
    ys.emplace_back(static_cast<std::size_t>(rows * Tn));
    for (std::size_t i = 0; i < xs.back().size(); ++i) xs.back()[i] = tok(rng), ys.back()[i] = (xs.back()[i] * 3 + 1) % 50;
  }
  // The single rank on the whole batch.
  ld::DeviceLlama<float> one(config, rows, Tn, w0, stream(), blas());
  std::vector<double> ref_losses;
  for (int s = 0; s < steps; ++s) {
    ref_losses.push_back(one.forward_backward(xs[static_cast<std::size_t>(s)], ys[static_cast<std::size_t>(s)]));
    one.step(opts);
  }
  CHECK(ref_losses.back() < ref_losses.front());
  const std::vector<float> ref = one.download();
  // dp 2: each rank its half of the rows, the gradients summed by DeviceDataParallel while backward runs.
  struct Out {
    std::vector<double> losses;
    std::vector<float> params;
  };
  const std::vector<Out> outs = threads::run(dp, [&](Comm& world) {
    tc::set_device(0);
    const tc::Stream compute, comm_stream;
    tc::BlasLt b(compute);
    tc::ThreadDeviceComm comm(world.split(0, world.rank()), comm_stream);
    ld::DeviceLlama<float> model(config, rows / dp, Tn, w0, compute, b);
    tc::DeviceDataParallel ddp(comm, compute, model.gradient_view(),
                               tc::device_grad_buckets(model.numel(), model.ready_offsets(), 3000));
    model.set_backward_hook([&](std::int64_t offset) { ddp.gradients_final_from(offset); });
    Out o;
    const std::size_t half = static_cast<std::size_t>(rows / dp * Tn), lo = half * static_cast<std::size_t>(world.rank());
    for (int s = 0; s < steps; ++s) {
      const auto& x = xs[static_cast<std::size_t>(s)];
      const auto& y = ys[static_cast<std::size_t>(s)];
      const double local = model.forward_backward(std::span<const std::int32_t>(x).subspan(lo, half),
                                                  std::span<const std::int32_t>(y).subspan(lo, half),
                                                  1.0 / static_cast<double>(rows * Tn));
      ddp.finish();
      model.step(opts);
      o.losses.push_back(world.all_reduce_value(local, ReduceOp::sum) / dp);
    }
    o.params = model.download();
    return o;
  });
  for (const Out& o : outs) {
    for (int s = 0; s < steps; ++s)
      CHECK(std::abs(o.losses[static_cast<std::size_t>(s)] - ref_losses[static_cast<std::size_t>(s)]) <=
            1e-5 * std::abs(ref_losses[static_cast<std::size_t>(s)]));
    CHECK(rel(Tensor<float>::from(Shape{m.total}, std::span<const float>(o.params)),
                Tensor<float>::from(Shape{m.total}, std::span<const float>(ref))) < 1e-5);
    CHECK(o.params == outs[0].params);  // every replica holds the same weights
  }
}

TEST_CASE("llama DeviceDecoderLayer at tp 2 on one GPU (threads): y and dx equal the whole layer's, each rank's gradients its shard of the whole layer's (fp32; bf16 within its rounding)") {
  // 4 query heads on 2 KV heads (one KV head per rank) and 8 on 4 (two per rank, so the group
  // mapping inside a rank's shard is exercised).
  for (const auto& hg : {std::pair<std::int64_t, std::int64_t>{4, 2}, {8, 4}}) {
    const llama::LlamaConfig config{.vocab_size = 64, .n_layer = 2, .n_head = hg.first, .n_kv_head = hg.second,
                                    .d_model = 64, .ffn_hidden = 40};
    CAPTURE(config.n_head);
    const std::int64_t B = 2, Tn = 11, d = config.d_model;
    const int tp = 2;
    llama::DecoderLayer<float> cpu = llama::decoder_layer<float>(config, 1, 5);
    unsigned seed = 70;
    for (Parameter<float>& p : cpu.parameters()) p.value.copy_from(randn(p.value.shape(), seed++, 0.2f));
    const Tensor<float> x = randn(Shape{B, Tn, d}, 71), dy = randn(Shape{B, Tn, d}, 72);
    auto [y_ref, ctx] = cpu.forward(x);
    const Tensor<float> dx_ref = cpu.backward(dy, ctx);
    const ld::FlatLayerLayout l = ld::flat_layer_layout(config, tp);
    struct Out {
      Tensor<float> y, dx, y16, dx16;
      std::vector<float> g, g16, g_ref;
    };
    const std::vector<Out> outs = threads::run(tp, [&](Comm& world) {
      tc::set_device(0);
      const tc::Stream compute;
      tc::BlasLt b(compute);
      tc::ThreadDeviceComm comm(world.split(0, world.rank()), compute);
      const std::vector<float> w_host = ld::pack_layer(cpu, l, false, world.rank());
      const Tensor<float> w_t = Tensor<float>::from(Shape{l.total}, std::span<const float>(w_host));
      const auto run = [&](auto zero) {  // fp32 or bf16 storage, by the type of `zero`
        using C = decltype(zero);
        ld::DeviceDecoderLayer<C> layer(config, B, Tn, compute, b, nullptr, &comm);
        auto w = tc::to_device<C>(w_t, compute);
        auto g = tc::to_device<float>(Tensor<float>(Shape{l.total}), compute);
        auto xd = tc::to_device<C>(x, compute), dyd = tc::to_device<C>(dy, compute);
        auto y = tc::DeviceTensor<C>::empty(Shape{B, Tn, d}, compute);
        auto dx = tc::DeviceTensor<C>::empty(Shape{B, Tn, d}, compute);
        layer.forward(xd, w.data(), y);
        layer.backward(dyd, w.data(), g.data(), dx);
        const Tensor<float> gh = tc::to_host(g, compute);
        return std::tuple{tc::to_host(y, compute), tc::to_host(dx, compute),
                          std::vector<float>(gh.data(), gh.data() + gh.numel())};
      };
      auto [y, dx, g] = run(0.f);
      auto [y16, dx16, g16] = run(tc::bf16{});
      return Out{y, dx, y16, dx16, g, g16, ld::pack_layer(cpu, l, /*grads=*/true, world.rank())};
    });
    for (std::size_t r = 0; r < outs.size(); ++r) {
      CAPTURE(r);
      CHECK(rel(outs[r].y, y_ref) < 1e-5);
      CHECK(rel(outs[r].dx, dx_ref) < 1e-5);
      CHECK(rel(outs[r].y16, y_ref) < 3e-2);
      CHECK(rel(outs[r].dx16, dx_ref) < 5e-2);
      for (int t = 0; t < 6; ++t) {  // each tensor on its own, so one wrong gradient is named
        CAPTURE(t);
        const auto tt = static_cast<ld::LayerTensor>(t);
        Tensor<float> a(Shape{l.size(tt)}), a16(Shape{l.size(tt)}), want(Shape{l.size(tt)});
        for (std::int64_t i = 0; i < l.size(tt); ++i) {
          const auto k = static_cast<std::size_t>(l.at(tt) + i);
          a.data()[i] = outs[r].g[k];
          a16.data()[i] = outs[r].g16[k];
          want.data()[i] = outs[r].g_ref[k];
        }
        CHECK(rel(a, want) < 1e-5);
        CHECK(rel(a16, want) < 5e-2);
      }
    }
    // Every rank holds the same y, dx and norm gradients, bitwise (the sums are one value written
    // to every rank; the norms need no all-reduce because their inputs are replicated).
    CHECK(rel(outs[1].y, outs[0].y) == 0);
    CHECK(rel(outs[1].dx, outs[0].dx) == 0);
    for (ld::LayerTensor t : {ld::LayerTensor::input_norm, ld::LayerTensor::post_norm})
      CHECK(std::equal(outs[1].g.begin() + l.at(t), outs[1].g.begin() + l.at(t) + l.size(t), outs[0].g.begin() + l.at(t)));
  }
}

TEST_CASE("llama DeviceLlama at tp 2 and dp 2 x tp 2 on one GPU (threads): losses, clipped gradient norms, each rank's gradients and weights its shard of the CPU Llama's over 3 AdamW steps (fp32; bf16 within its rounding)") {
  const llama::LlamaConfig config{.vocab_size = 50, .n_layer = 2, .n_head = 4, .n_kv_head = 2, .d_model = 32,
                                  .ffn_hidden = 24};
  const std::int64_t B = 2, Tn = 9, N = B * Tn;
  const int tp = 2, steps = 3;
  const optim::AdamWOptions opts{.lr = 3e-3, .weight_decay = 0.1};
  const ld::FlatModelLayout m = ld::flat_model_layout(config, tp);
  std::mt19937 rng(13);
  std::uniform_int_distribution<int> tok(0, static_cast<int>(config.vocab_size) - 1);
  std::vector<std::vector<std::int32_t>> xs, ys;
  for (int s = 0; s < steps; ++s) {
    xs.emplace_back(static_cast<std::size_t>(N));
    ys.emplace_back(static_cast<std::size_t>(N));
    for (std::size_t i = 0; i < xs.back().size(); ++i) xs.back()[i] = tok(rng), ys.back()[i] = tok(rng);
  }
  // The CPU Llama on the whole batch: its losses, clipped norms, each tp rank's shard of its
  // first gradients and of its final weights.
  llama::Llama<float> cpu(config, 3);
  ParameterList<float> ps = cpu.parameters();
  optim::AdamW<float> opt(optim::weight_decay_groups(ps, opts));
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  std::vector<std::vector<float>> w0, g_ref, w_ref;
  for (int r = 0; r < tp; ++r) w0.push_back(ld::pack_model(cpu, m, false, r));
  std::vector<double> ref_losses, ref_norms;
  for (int s = 0; s < steps; ++s) {
    ps.zero_grad();
    const Shape bt{B, Tn};
    auto [logits, ctx] = cpu.forward(Tensor<std::int32_t>::from(bt, std::span<const std::int32_t>(xs[static_cast<std::size_t>(s)])));
    auto [loss, lctx] = ce.forward(logits, Tensor<std::int32_t>::from(bt, std::span<const std::int32_t>(ys[static_cast<std::size_t>(s)])));
    cpu.backward(ce.backward(1.0f, lctx), ctx);
    ref_losses.push_back(loss);
    if (s == 0)
      for (int r = 0; r < tp; ++r) g_ref.push_back(ld::pack_model(cpu, m, /*grads=*/true, r));
    ref_norms.push_back(optim::clip_grad_norm(ps, kClipL));
    CHECK(ref_norms.back() > kClipL);  // every step clips
    opt.step();
  }
  for (int r = 0; r < tp; ++r) w_ref.push_back(ld::pack_model(cpu, m, false, r));
  const auto flat = [](const std::vector<float>& v) {
    return Tensor<float>::from(Shape{static_cast<std::int64_t>(v.size())}, std::span<const float>(v));
  };
  struct Out {
    std::vector<double> losses, norms, losses16, norms16;
    std::vector<float> g, w;
    int tp_rank = 0;
  };
  for (const int world_size : {tp, 2 * tp}) {  // tp 2, then dp 2 x tp 2
    CAPTURE(world_size);
    const int dp = world_size / tp;
    const std::vector<Out> outs = threads::run(world_size, [&](Comm& world) {
      tc::set_device(0);
      const tc::Stream compute, comm_stream;
      tc::BlasLt b(compute);
      const int tp_rank = world.rank() % tp, dp_rank = world.rank() / tp;
      tc::ThreadDeviceComm tpc(world.split(dp_rank, tp_rank), compute);
      tc::ThreadDeviceComm dpc(world.split(100 + tp_rank, dp_rank), comm_stream);
      const std::size_t rows = static_cast<std::size_t>(N / dp), lo = rows * static_cast<std::size_t>(dp_rank);
      Out o;
      o.tp_rank = tp_rank;
      const auto train = [&](auto zero, std::vector<double>& losses, std::vector<double>& norms, bool keep) {
        using C = decltype(zero);
        ld::DeviceLlama<C> model(config, B / dp, Tn, w0[static_cast<std::size_t>(tp_rank)], compute, b, &tpc);
        CHECK(model.tp_size() == tp);
        std::unique_ptr<tc::DeviceDataParallel> ddp;
        if (dp > 1) {
          ddp = std::make_unique<tc::DeviceDataParallel>(dpc, compute, model.gradient_view(),
                                                         tc::device_grad_buckets(model.numel(), model.ready_offsets(), 3000));
          model.set_backward_hook([&](std::int64_t offset) { ddp->gradients_final_from(offset); });
        }
        for (int s = 0; s < steps; ++s) {
          const auto& x = xs[static_cast<std::size_t>(s)];
          const auto& y = ys[static_cast<std::size_t>(s)];
          const double local = model.forward_backward(std::span<const std::int32_t>(x).subspan(lo, rows),
                                                      std::span<const std::int32_t>(y).subspan(lo, rows),
                                                      1.0 / static_cast<double>(N));
          if (ddp) ddp->finish();
          // Every tp rank has its dp rank's losses: the mean over the world is the batch's.
          losses.push_back(world.all_reduce_value(local, ReduceOp::sum) / world_size);
          const double norm = model.grad_norm();
          norms.push_back(norm);
          if (keep && s == 0) o.g = model.download_grads();
          model.step(opts, ld::DeviceLlama<C>::clip_scale(norm, kClipL));
        }
        if (keep) o.w = model.download();
      };
      train(0.f, o.losses, o.norms, true);
      if (dp == 1) train(tc::bf16{}, o.losses16, o.norms16, false);
      if (world.rank() == 0) {  // refusals (no collective before them): the whole model's weights
        // given to a tp rank, a tp group on another stream
        CHECK_THROWS_WITH_AS(ld::DeviceLlama<float>(config, B, Tn, std::vector<float>(static_cast<std::size_t>(
                                                        ld::flat_model_layout(config).total)), compute, b, &tpc),
                             doctest::Contains("(one rank's shard at tp 2)"), Error);
        CHECK_THROWS_WITH_AS(ld::DeviceLlama<float>(config, B, Tn, w0[0], comm_stream, b, &tpc),
                             doctest::Contains("must run its collectives on the model's stream"), Error);
      }
      return o;
    });
    for (std::size_t r = 0; r < outs.size(); ++r) {
      CAPTURE(r);
      const Out& o = outs[r];
      const auto k = static_cast<std::size_t>(o.tp_rank);
      REQUIRE(o.losses.size() == static_cast<std::size_t>(steps));
      for (int s = 0; s < steps; ++s) {
        CAPTURE(s);
        const auto i = static_cast<std::size_t>(s);
        CHECK(std::abs(o.losses[i] - ref_losses[i]) <= 1e-5 * std::abs(ref_losses[i]));
        CHECK(std::abs(o.norms[i] - ref_norms[i]) <= 1e-5 * ref_norms[i]);
        if (dp == 1) {
          CHECK(std::abs(o.losses16[i] - ref_losses[i]) <= 2e-2 * std::abs(ref_losses[i]));
          CHECK(std::abs(o.norms16[i] - ref_norms[i]) <= 5e-2 * ref_norms[i]);
        }
      }
      CHECK(rel(flat(o.g), flat(g_ref[k])) < 1e-5);
      CHECK(rel(flat(o.w), flat(w_ref[k])) < 1e-5);
    }
    // The replicated weights (the norms) stay the same on every rank, bitwise, and the dp
    // replicas of a tp rank hold the same shard, bitwise.
    for (std::size_t r = 1; r < outs.size(); ++r) {
      CAPTURE(r);
      for (const ld::FlatGroup& g : ld::adamw_segments(m))
        if (g.group == 1)
          CHECK(std::equal(outs[r].w.begin() + g.offset, outs[r].w.begin() + g.offset + g.numel, outs[0].w.begin() + g.offset));
      if (r >= static_cast<std::size_t>(tp)) CHECK(outs[r].w == outs[r - static_cast<std::size_t>(tp)].w);
    }
  }
}

TEST_CASE("llama LlamaDevicePipeline: 1F1B, GPipe and interleaved 1F1B at pp 2 (an embedding-only and a head-only stage), pp 2 x tp 2 and dp 2 x pp 2 on one GPU (threads) train as the CPU Llama: losses, clipped norms, first gradients and weights of each rank's stages (fp32; bf16 within its rounding)") {
  const llama::LlamaConfig config{.vocab_size = 50, .n_layer = 4, .n_head = 4, .n_kv_head = 2, .d_model = 32,
                                  .ffn_hidden = 24};
  const std::int64_t B = 4, Tn = 9, N = B * Tn;
  const int steps = 3, micro_batches = 4;  // per step, over the dp ranks (one row each)
  const optim::AdamWOptions opts{.lr = 3e-3, .weight_decay = 0.1};
  std::mt19937 rng(17);
  std::uniform_int_distribution<int> tok(0, static_cast<int>(config.vocab_size) - 1);
  std::vector<Tensor<std::int32_t>> xs, ys;
  for (int s = 0; s < steps; ++s) {
    xs.emplace_back(Shape{B, Tn});
    ys.emplace_back(Shape{B, Tn});
    for (std::int64_t i = 0; i < N; ++i) xs.back().data()[i] = tok(rng), ys.back().data()[i] = tok(rng);
  }
  // The CPU Llama on the whole batch: its losses, clipped norms, and per tp size (1, 2) and tp
  // rank the flat shards of its initial weights, first gradients (before clipping) and final weights.
  llama::Llama<float> cpu(config, 3);
  ParameterList<float> ps = cpu.parameters();
  optim::AdamW<float> opt(optim::weight_decay_groups(ps, opts));
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  const std::vector<int> tps{1, 2};
  std::vector<std::vector<std::vector<float>>> w0_tp(3), g_ref_tp(3), w_ref_tp(3);  // [tp][tp rank]
  const auto shards = [&](std::vector<std::vector<std::vector<float>>>& out, bool grads) {
    for (int tp : tps)
      for (int r = 0; r < tp; ++r) out[static_cast<std::size_t>(tp)].push_back(ld::pack_model(cpu, ld::flat_model_layout(config, tp), grads, r));
  };
  shards(w0_tp, false);
  std::vector<double> ref_losses, ref_norms;
  for (int s = 0; s < steps; ++s) {
    ps.zero_grad();
    auto [logits, ctx] = cpu.forward(xs[static_cast<std::size_t>(s)]);
    auto [loss, lctx] = ce.forward(logits, ys[static_cast<std::size_t>(s)]);
    cpu.backward(ce.backward(1.0f, lctx), ctx);
    ref_losses.push_back(loss);
    if (s == 0) shards(g_ref_tp, true);
    ref_norms.push_back(optim::clip_grad_norm(ps, kClipL));
    CHECK(ref_norms.back() > kClipL);  // every step clips
    opt.step();
  }
  shards(w_ref_tp, false);
  enum class Kind { one_f_one_b, gpipe, interleaved };
  struct Layout {
    const char* name;
    Kind kind;
    int dp, pp, tp, v;
    std::vector<int> cuts;  // of the 6 pipeline layers into pp x v stages (empty: StagePartition::even)
    bool bf16 = false;
  };
  const std::vector<Layout> layouts{
      {"1F1B pp 2", Kind::one_f_one_b, 1, 2, 1, 1, {}},
      {"GPipe pp 2", Kind::gpipe, 1, 2, 1, 1, {}},
      {"interleaved 1F1B pp 2 x 2 chunks (a head-only stage)", Kind::interleaved, 1, 2, 1, 2, {}},
      {"interleaved 1F1B pp 2 x 2 chunks, cut 1|2|2|1 (an embedding-only stage)", Kind::interleaved, 1, 2, 1, 2, {1, 3, 5}},
      {"1F1B pp 2 x tp 2", Kind::one_f_one_b, 1, 2, 2, 1, {}},
      {"1F1B dp 2 x pp 2", Kind::one_f_one_b, 2, 2, 1, 1, {}},
      {"1F1B pp 2 bf16", Kind::one_f_one_b, 1, 2, 1, 1, {}, true}};
  struct Out {
    std::vector<double> losses, norms;
    std::vector<float> g, g_want, w, w_want;  // this rank's stages' first gradients and final weights, and the CPU's
  };
  for (const Layout& lay : layouts) {
    CAPTURE(lay.name);
    const int world_size = lay.dp * lay.pp * lay.tp, tp = lay.tp, dp = lay.dp, pp = lay.pp;
    const int m = micro_batches / dp;     // micro-batches per dp rank
    const std::int64_t rows = B / dp / m;  // rows per micro-batch
    const ld::FlatModelLayout layout = ld::flat_model_layout(config, tp);
    const int layers = static_cast<int>(ld::pipeline_num_layers(config));
    const StagePartition part = lay.cuts.empty() ? StagePartition::even(layers, pp * lay.v)
                                                 : StagePartition::from_cuts(layers, lay.cuts);
    const std::vector<Out> outs = threads::run(world_size, [&](Comm& world) {
      tc::set_device(0);
      const tc::Stream compute, comm_stream;
      tc::BlasLt b(compute);
      const int tp_rank = world.rank() % tp, dp_rank = world.rank() / tp % dp, pp_rank = world.rank() / (tp * dp);
      tc::ThreadDeviceComm tpc(world.split(pp_rank * dp + dp_rank, tp_rank), compute);
      tc::ThreadDeviceComm ppc(world.split(dp_rank * tp + tp_rank, pp_rank), compute);
      tc::ThreadDeviceComm dpc(world.split(pp_rank * tp + tp_rank, dp_rank), comm_stream);
      const schedule::Schedule sched = lay.kind == Kind::gpipe        ? schedule::GPipe{m}.build(pp)
                                       : lay.kind == Kind::interleaved ? schedule::InterleavedOneFOneB{m, lay.v}.build(pp)
                                                                       : schedule::OneFOneB{m}.build(pp);
      const auto k = static_cast<std::size_t>(tp);
      const auto kr = static_cast<std::size_t>(tp_rank);
      const auto run = [&](auto zero) {  // fp32 or bf16 storage, by the type of `zero`
        using C = decltype(zero);
        std::vector<std::unique_ptr<ld::DeviceLlama<C>>> owned;
        std::vector<ld::DeviceLlama<C>*> chunks;
        Out o;
        const auto range = [](const std::vector<float>& v, ld::FlatRange r) {
          return std::vector<float>(v.begin() + r.lo, v.begin() + r.hi);
        };
        for (int st : sched.stages_of(pp_rank)) {
          const ld::FlatRange r = ld::stage_range(layout, part.begin(st), part.end(st));
          owned.push_back(std::make_unique<ld::DeviceLlama<C>>(config, rows, Tn, range(w0_tp[k][kr], r), compute, b,
                                                               &tpc, ld::llama_device_stage(part, st)));
          chunks.push_back(owned.back().get());
          for (const auto& [from, to] : {std::pair{&g_ref_tp, &o.g_want}, std::pair{&w_ref_tp, &o.w_want}}) {
            const std::vector<float> part_of = range((*from)[k][kr], r);
            to->insert(to->end(), part_of.begin(), part_of.end());
          }
        }
        ld::LlamaDevicePipeline<C> pipe(chunks, ppc, part, sched);
        std::vector<std::unique_ptr<tc::DeviceDataParallel>> ddp;
        if (dp > 1)  // no backward hook: finish() reduces every bucket after the step's backward passes
          for (ld::DeviceLlama<C>* c : chunks)
            ddp.push_back(std::make_unique<tc::DeviceDataParallel>(dpc, compute, c->gradient_view(),
                                                                   tc::device_grad_buckets(c->numel(), c->ready_offsets(), 3000)));
        for (int s = 0; s < steps; ++s) {
          std::vector<tc::DeviceTensor<std::int32_t>> xd, yd;
          std::vector<tc::DeviceMicroBatch> micro;
          for (int q = 0; q < m; ++q) {
            const std::int64_t lo = (dp_rank * m + q) * rows;
            xd.push_back(tc::to_device<std::int32_t>(xs[static_cast<std::size_t>(s)].slice(0, lo, lo + rows).contiguous(), compute));
            yd.push_back(tc::to_device<std::int32_t>(ys[static_cast<std::size_t>(s)].slice(0, lo, lo + rows).contiguous(), compute));
          }
          for (int q = 0; q < m; ++q) micro.push_back({xd[static_cast<std::size_t>(q)], yd[static_cast<std::size_t>(q)], {}});
          pipe.forward_backward(micro, 1.f / static_cast<float>(N));
          for (auto& x : ddp) x->finish();
          if (s == 0)
            for (ld::DeviceLlama<C>* c : chunks) {
              const std::vector<float> g = c->download_grads();
              o.g.insert(o.g.end(), g.begin(), g.end());
            }
          const double norm = pipe.grad_norm();
          o.norms.push_back(norm);
          for (ld::DeviceLlama<C>* c : chunks) c->step(opts, ld::DeviceLlama<C>::clip_scale(norm, kClipL));
          // The last stage's tp ranks each hold their dp rank's loss sum: over the world, each once.
          o.losses.push_back(world.all_reduce_value(pipe.take_loss_sum(), ReduceOp::sum) / tp / static_cast<double>(N));
        }
        for (ld::DeviceLlama<C>* c : chunks) {
          const std::vector<float> w = c->download();
          o.w.insert(o.w.end(), w.begin(), w.end());
        }
        if (world.rank() == 0 && lay.v == 1 && tp == 1) {  // refusals, with no collective before them
          CHECK_THROWS_WITH_AS(ld::LlamaDevicePipeline<C>(chunks, ppc, part, schedule::ZeroBubbleH1{m}.build(pp)),
                               doctest::Contains("splits backward"), Error);
          CHECK_THROWS_WITH_AS(ld::LlamaDevicePipeline<C>(chunks, ppc, StagePartition::from_cuts(6, {2}), sched),
                               doctest::Contains("holds pipeline layers [0, 3), the partition gives it [0, 2)"), Error);
          CHECK_THROWS_WITH_AS(ld::DeviceLlama<C>(config, rows, Tn, std::vector<float>(), compute, b, nullptr,
                                                  tc::DeviceStage{3, 2}),
                               doctest::Contains("pipeline layers [3, 2) of a model of 6"), Error);
          const std::vector<std::int32_t> ids(static_cast<std::size_t>(rows * Tn), 1);
          CHECK_THROWS_WITH_AS(chunks.front()->forward_backward(ids, ids),
                               doctest::Contains("is the pipeline stage of layers [0, 3)"), Error);
          const auto zeros = tc::to_device<std::int32_t>(Tensor<std::int32_t>(Shape{rows, Tn}), compute);
          CHECK_THROWS_WITH_AS(chunks.front()->stage_backward(0, zeros, {}, {}),
                               doctest::Contains("holds no forward with a gradient"), Error);
        }
        return o;
      };
      return lay.bf16 ? run(tc::bf16{}) : run(0.f);
    });
    const double tol = lay.bf16 ? 2e-2 : 1e-5, tol_norm = lay.bf16 ? 5e-2 : 1e-5, tol_g = lay.bf16 ? 5e-2 : 1e-5;
    const auto flat = [](const std::vector<float>& v) {
      return Tensor<float>::from(Shape{static_cast<std::int64_t>(v.size())}, std::span<const float>(v));
    };
    for (std::size_t r = 0; r < outs.size(); ++r) {
      CAPTURE(r);
      const Out& o = outs[r];
      REQUIRE(o.losses.size() == static_cast<std::size_t>(steps));
      for (int s = 0; s < steps; ++s) {
        CAPTURE(s);
        const auto i = static_cast<std::size_t>(s);
        CHECK(std::abs(o.losses[i] - ref_losses[i]) <= tol * std::abs(ref_losses[i]));
        CHECK(std::abs(o.norms[i] - ref_norms[i]) <= tol_norm * ref_norms[i]);
      }
      REQUIRE(o.g.size() == o.g_want.size());
      REQUIRE(o.w.size() == o.w_want.size());
      CHECK(rel(flat(o.g), flat(o.g_want)) < tol_g);
      if (!lay.bf16) CHECK(rel(flat(o.w), flat(o.w_want)) < 1e-5);
    }
  }
}

TEST_CASE("llama fused attention: DeviceLlama on the fused kernels trains as the unfused DeviceLlama (4 clipped AdamW steps: losses, norms and weights within 1e-5; bf16 within 5e-2)") {
  const std::int64_t B = 2, Tn = 11;
  // The whole model: fused against unfused, from the same weights and batches.
  const llama::LlamaConfig mc{.vocab_size = 50, .n_layer = 2, .n_head = 4, .n_kv_head = 2, .d_model = 32,
                              .ffn_hidden = 24};
  llama::Llama<float> init(mc, 3);
  const ld::FlatModelLayout m = ld::flat_model_layout(mc);
  const std::vector<float> w0 = ld::pack_model(init, m);
  const optim::AdamWOptions opts{.lr = 3e-3, .weight_decay = 0.1};
  const auto train = [&](auto zero, bool fused) {
    using C = decltype(zero);
    ld::DeviceLlama<C> model(mc, B, Tn, w0, stream(), blas());
    model.set_fused_attention(fused);
    CHECK(model.fused_attention() == fused);
    std::mt19937 rng(23);
    std::uniform_int_distribution<int> tok(0, static_cast<int>(mc.vocab_size) - 1);
    std::vector<double> losses;
    for (int s = 0; s < 4; ++s) {
      std::vector<std::int32_t> xs(static_cast<std::size_t>(B * Tn)), ys(xs.size());
      for (std::size_t i = 0; i < xs.size(); ++i) xs[i] = tok(rng), ys[i] = tok(rng);
      losses.push_back(model.forward_backward(xs, ys));
      losses.push_back(model.grad_norm());
      model.step(opts, ld::DeviceLlama<C>::clip_scale(losses.back(), kClipL));
    }
    return std::pair{losses, model.download()};
  };
  const auto [ref, w_ref] = train(0.f, false);
  const auto [got, w_got] = train(0.f, true);
  const auto [got16, w16] = train(tc::bf16{}, true);
  const auto flat = [](const std::vector<float>& v) {
    return Tensor<float>::from(Shape{static_cast<std::int64_t>(v.size())}, std::span<const float>(v));
  };
  for (std::size_t i = 0; i < ref.size(); ++i) {
    CAPTURE(i);
    CHECK(std::abs(got[i] - ref[i]) <= 1e-5 * std::abs(ref[i]));
    CHECK(std::abs(got16[i] - ref[i]) <= 5e-2 * std::abs(ref[i]));
  }
  CHECK(rel(flat(w_got), flat(w_ref)) < 1e-5);
  (void)w16;
}
