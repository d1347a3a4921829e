// The device layers against the CPU reference layers (tessera/nn, tessera/optim): every kernel
// and cuBLASLt product, forward and backward, odd sizes (T not a multiple of any tile), fp32
// within 1e-5 relative (norm-wise), bf16 within its rounding. Needs a GPU (gpu_main.cpp skips
// without one).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "device_op_support.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/caching_allocator.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/adamw.cuh"
#include "tessera/cuda/ops/attention.cuh"
#include "tessera/cuda/ops/cross_entropy.cuh"
#include "tessera/cuda/ops/embedding.cuh"
#include "tessera/cuda/ops/flash_attention.cuh"
#include "tessera/cuda/ops/gelu.cuh"
#include "tessera/cuda/ops/gemm_epilogue.cuh"
#include "tessera/cuda/ops/global_norm.cuh"
#include "tessera/cuda/ops/layer_norm.cuh"
#include "tessera/nn/core_attention.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/gelu.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/optim/adamw.hpp"

using namespace tessera;
namespace tc = tessera::cuda;
namespace ops = tessera::cuda::ops;

using namespace device_op_test;

namespace {

constexpr double fp32_tol = 1e-5;

}  // namespace

TEST_CASE("gemm fp32: Linear forward with the bias epilogue, and both backward products, equal nn::Linear") {
  const std::int64_t M = 37, in = 53, out = 29;
  nn::Linear<float> lin(in, out, nn::LayerInit{.prefix = "fc", .seed = 5, .std = 0.2});
  for (std::int64_t j = 0; j < out; ++j) lin.bias()->value(j) = 0.1f * static_cast<float>(j % 7) - 0.3f;
  const Tensor<float> x = randn(Shape{M, in}, 1), dy = randn(Shape{M, out}, 2);
  auto [y_ref, ctx] = lin.forward(x);
  const Tensor<float> dx_ref = lin.backward(dy, ctx);
  auto dx_d = dev(x), w_d = dev(lin.weight().value), b_d = dev(lin.bias()->value), dy_d = dev(dy);
  auto y_d = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  tc::EpilogueArgs ep{tc::Epilogue::bias, b_d.data(), nullptr};
  blas().gemm(stream(), tc::GemmShape{.m = M, .n = out, .k = in}, dx_d.data(), w_d.data(), y_d.data(), 1.f, 0.f, ep);
  CHECK(rel(host(y_d), y_ref) < fp32_tol);
  // dx = dy W^T (W stored in x out); dW = x^T dy.
  auto gx = tc::DeviceTensor<float>::empty(Shape{M, in}, stream());
  blas().gemm(stream(), tc::GemmShape{.trans_b = true, .m = M, .n = in, .k = out}, dy_d.data(), w_d.data(), gx.data());
  CHECK(rel(host(gx), dx_ref) < fp32_tol);
  auto gw = tc::DeviceTensor<float>::empty(Shape{in, out}, stream());
  blas().gemm(stream(), tc::GemmShape{.trans_a = true, .m = in, .n = out, .k = M}, dx_d.data(), dy_d.data(), gw.data());
  CHECK(rel(host(gw), lin.weight().grad) < fp32_tol);
}

TEST_CASE("gemm fp32: the GELU epilogue keeps the pre-activation, and dgelu applies GELU's derivative") {
  const std::int64_t M = 33, in = 40, out = 24;
  const Tensor<float> x = randn(Shape{M, in}, 3), w = randn(Shape{in, out}, 4, 0.3f), b = randn(Shape{out}, 5, 0.1f);
  nn::Linear<float> lin("fc", w.clone(), b.clone());
  nn::GELU<float> gelu;
  auto [pre, lctx] = lin.forward(x);
  auto [y_ref, gctx] = gelu.forward(pre);
  auto x_d = dev(x), w_d = dev(w), b_d = dev(b);
  auto y_d = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  auto aux = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  blas().gemm(stream(), tc::GemmShape{.m = M, .n = out, .k = in}, x_d.data(), w_d.data(), y_d.data(), 1.f, 0.f,
              tc::EpilogueArgs{tc::Epilogue::gelu_bias, b_d.data(), aux.data()});
  CHECK(rel(host(aux), pre) < fp32_tol);
  CHECK(rel(host(y_d), y_ref) < 1e-4);  // cuBLASLt's tanh against our sigmoid form of the same GELU
  // dpre = (dz W2^T) * gelu'(pre), with W2 (out x 17).
  const Tensor<float> w2 = randn(Shape{out, 17}, 6, 0.3f), dz = randn(Shape{M, 17}, 7);
  nn::Linear<float> lin2("proj", w2.clone());
  auto [z, ctx2] = lin2.forward(y_ref);
  const Tensor<float> dpre_ref = gelu.backward(lin2.backward(dz, ctx2), gctx);
  auto w2_d = dev(w2), dz_d = dev(dz);
  auto dpre = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  blas().gemm(stream(), tc::GemmShape{.trans_b = true, .m = M, .n = out, .k = 17}, dz_d.data(), w2_d.data(), dpre.data(),
              1.f, 0.f, tc::EpilogueArgs{tc::Epilogue::dgelu, nullptr, aux.data()});
  CHECK(rel(host(dpre), dpre_ref) < 1e-4);
}

TEST_CASE("gemm bf16: inputs rounded to bf16, fp32 accumulation, within bf16's rounding of the fp32 product") {
  const std::int64_t M = 64, in = 96, out = 80;
  const Tensor<float> x = randn(Shape{M, in}, 8), w = randn(Shape{in, out}, 9, 0.1f);
  nn::Linear<float> lin("fc", w.clone());
  auto [y_ref, ctx] = lin.forward(x);
  auto x_d = dev<tc::bf16>(x), w_d = dev<tc::bf16>(w);
  auto y_d = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  blas().gemm(stream(), tc::GemmShape{.m = M, .n = out, .k = in}, x_d.data(), w_d.data(), y_d.data());
  const double r = rel(host(y_d), y_ref);
  CHECK(r < 1e-2);
  CHECK(r > 1e-5);  // it did round: the check would notice an fp32 path posing as bf16
}

TEST_CASE("layer norm: forward and backward equal nn::LayerNorm (37 rows of 77)") {
  const std::int64_t R = 37, C = 77;
  nn::LayerNorm<float> ln(C);
  for (std::int64_t j = 0; j < C; ++j) {
    ln.weight().value(j) = 1.f + 0.01f * static_cast<float>(j);
    ln.bias().value(j) = 0.02f * static_cast<float>(j % 5);
  }
  const Tensor<float> x = randn(Shape{R, C}, 10, 2.f), dy = randn(Shape{R, C}, 12);
  auto [y_ref, ctx] = ln.forward(x);
  const Tensor<float> dx_ref = ln.backward(dy, ctx);
  auto x_d = dev(x), w_d = dev(ln.weight().value), b_d = dev(ln.bias().value), dy_d = dev(dy);
  auto y = tc::DeviceTensor<float>::empty(Shape{R, C}, stream());
  auto mean = tc::DeviceTensor<float>::empty(Shape{R}, stream()), rstd = tc::DeviceTensor<float>::empty(Shape{R}, stream());
  ops::layer_norm_forward<float>(stream(), x_d, w_d, b_d, y, mean, rstd);
  CHECK(rel(host(y), y_ref) < fp32_tol);
  CHECK(rel(host(rstd), ctx.rstd) < fp32_tol);
  auto dx = tc::DeviceTensor<float>::empty(Shape{R, C}, stream());
  auto dw = tc::DeviceTensor<float>::zeros(Shape{C}, stream()), db = tc::DeviceTensor<float>::zeros(Shape{C}, stream());
  auto ws = tc::DeviceTensor<float>::empty(Shape{2 * C * ops::layer_norm_chunks(R)}, stream());
  ops::layer_norm_backward<float>(stream(), dy_d, x_d, w_d, mean, rstd, dx, dw, db, ws);
  CHECK(rel(host(dx), dx_ref) < fp32_tol);
  CHECK(rel(host(dw), ln.weight().grad) < fp32_tol);
  CHECK(rel(host(db), ln.bias().grad) < fp32_tol);
}

TEST_CASE("gelu: forward and backward equal nn::GELU") {
  const Tensor<float> x = randn(Shape{1000, 3}, 13, 3.f), dy = randn(Shape{1000, 3}, 14);
  nn::GELU<float> g;
  auto [y_ref, ctx] = g.forward(x);
  const Tensor<float> dx_ref = g.backward(dy, ctx);
  auto x_d = dev(x), dy_d = dev(dy);
  auto y = tc::DeviceTensor<float>::empty(x.shape(), stream()), dx = tc::DeviceTensor<float>::empty(x.shape(), stream());
  ops::gelu_forward<float>(stream(), x_d, y);
  ops::gelu_backward<float>(stream(), x_d, dy_d, dx);
  CHECK(rel(host(y), y_ref) < fp32_tol);
  CHECK(rel(host(dx), dx_ref) < fp32_tol);
}

TEST_CASE("softmax cross-entropy fused with the logits' gradient equals nn::CrossEntropy (padded vocabulary, ignored rows)") {
  const std::int64_t R = 29, V = 101, Vp = 128;
  const Tensor<float> logits = randn(Shape{R, V}, 15, 2.f);
  Tensor<std::int32_t> targets(Shape{R});
  for (std::int64_t r = 0; r < R; ++r) targets(r) = static_cast<std::int32_t>((r * 37) % V);
  targets(3) = -100;
  targets(17) = -100;
  nn::CrossEntropy<float> ce;
  auto [loss_ref, ctx] = ce.forward(logits, targets);
  const Tensor<float> dlogits_ref = ce.backward(1.f, ctx);
  Tensor<float> padded(Shape{R, Vp});
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t j = 0; j < Vp; ++j) padded(r, j) = j < V ? logits(r, j) : 1e4f;  // padding must be ignored
  auto l_d = dev(padded);
  auto t_d = tc::to_device<std::int32_t>(targets, stream());
  auto losses = tc::DeviceTensor<float>::empty(Shape{R}, stream());
  const float dloss = 1.f / static_cast<float>(R - 2);
  ops::softmax_cross_entropy<float>(stream(), l_d, V, t_d, losses, &dloss);
  const Tensor<float> lh = host(losses), gh = host(l_d);
  double total = 0;
  for (std::int64_t r = 0; r < R; ++r) total += lh(r);
  CHECK(lh(3) == 0.f);
  CHECK(total / static_cast<double>(R - 2) == doctest::Approx(loss_ref).epsilon(1e-6));
  Tensor<float> g(Shape{R, V});
  for (std::int64_t r = 0; r < R; ++r) {
    for (std::int64_t j = 0; j < V; ++j) g(r, j) = gh(r, j);
    for (std::int64_t j = V; j < Vp; ++j) CHECK(gh(r, j) == 0.f);
  }
  CHECK(rel(g, dlogits_ref) < fp32_tol);
}

TEST_CASE("embedding: lookup with positions added, and a deterministic backward, equal nn::Embedding") {
  const std::int64_t V = 50, C = 24, N = 300;
  nn::Embedding<float> emb(V, C, nn::LayerInit{.prefix = "wte", .seed = 1, .std = 0.5});
  Tensor<std::int32_t> ids(Shape{N});
  for (std::int64_t i = 0; i < N; ++i) ids(i) = static_cast<std::int32_t>((i * i + 3) % 17);  // many repeats
  const Tensor<float> base = randn(Shape{N, C}, 16), dy = randn(Shape{N, C}, 17);
  auto [rows, ctx] = emb.forward(ids);
  emb.backward(dy, ctx);
  auto ids_d = tc::to_device<std::int32_t>(ids, stream());
  auto w_d = dev(emb.weight().value);
  auto out = dev(base);
  ops::embedding_forward<float>(stream(), ids_d, w_d, out, /*accumulate=*/true);
  Tensor<float> expect = base.clone();
  for (std::int64_t i = 0; i < N * C; ++i) expect.data()[i] += rows.data()[i];
  CHECK(rel(host(out), expect) < fp32_tol);
  auto dy_d = dev(dy);
  auto dw1 = tc::DeviceTensor<float>::zeros(Shape{V, C}, stream()), dw2 = tc::DeviceTensor<float>::zeros(Shape{V, C}, stream());
  ops::embedding_backward<float>(stream(), ids_d, dy_d, dw1);
  ops::embedding_backward<float>(stream(), ids_d, dy_d, dw2);
  const Tensor<float> g1 = host(dw1), g2 = host(dw2);
  CHECK(rel(g1, emb.weight().grad) < fp32_tol);
  for (std::int64_t i = 0; i < V * C; ++i) CHECK(g1.data()[i] == g2.data()[i]);
}

TEST_CASE("attention: causal forward and backward equal nn::CoreAttention (T = 13, 3 heads of 8)") {
  const std::int64_t B = 2, Tn = 13, H = 3, hd = 8, C = H * hd;
  const Tensor<float> qkv = randn(Shape{B, Tn, 3 * C}, 18), dy = randn(Shape{B, Tn, C}, 19);
  nn::CoreAttention<float> attn(H);
  auto [y_ref, ctx] = attn.forward(qkv);
  const Tensor<float> dqkv_ref = attn.backward(dy, ctx);
  auto qkv_d = dev(qkv), dy_d = dev(dy);
  auto probs = tc::DeviceTensor<float>::empty(Shape{B, H, Tn, Tn}, stream());
  auto dprobs = tc::DeviceTensor<float>::empty(Shape{B, H, Tn, Tn}, stream());
  auto y = tc::DeviceTensor<float>::empty(Shape{B, Tn, C}, stream());
  auto dqkv = tc::DeviceTensor<float>::empty(Shape{B, Tn, 3 * C}, stream());
  auto qkvp = tc::DeviceTensor<float>::empty(Shape{3 * B * H * Tn * hd}, stream());
  auto dqkvp = tc::DeviceTensor<float>::empty(Shape{3 * B * H * Tn * hd}, stream());
  auto heads = tc::DeviceTensor<float>::empty(Shape{B * H * Tn * hd}, stream());
  ops::attention_forward<float>(stream(), blas(), qkv_d, H, qkvp, probs, heads, y);
  CHECK(rel(host(y), y_ref) < fp32_tol);
  CHECK(rel(host(probs), ctx.probs) < fp32_tol);
  // The split heads are q, k, v of head h at (which, b, h, t, e).
  const Tensor<float> qh = host(qkvp);
  CHECK(qh.data()[((1 * B + 1) * H + 2) * Tn * hd + 5 * hd + 3] == qkv(1, 5, C + 2 * hd + 3));
  ops::attention_backward<float>(stream(), blas(), dy_d, qkvp, H, probs, heads, dprobs, dqkvp, dqkv);
  CHECK(rel(host(dqkv), dqkv_ref) < fp32_tol);
}

TEST_CASE("fused attention: the flash kernels' forward (y and each row's log-sum-exp) and backward equal nn::CoreAttention (T not a multiple of the tiles, head_dim 8 to 128; fp32, bf16 within its rounding), bitwise the same twice") {
  struct Size {
    std::int64_t B, Tn, H, hd;
  };
  for (const Size z : {Size{2, 13, 3, 8}, Size{1, 70, 2, 20}, Size{2, 129, 2, 64}, Size{1, 100, 1, 128}}) {
    CAPTURE(z.Tn);
    CAPTURE(z.hd);
    const std::int64_t B = z.B, Tn = z.Tn, H = z.H, hd = z.hd, C = H * hd;
    const Tensor<float> qkv = randn(Shape{B, Tn, 3 * C}, 40 + static_cast<unsigned>(hd)), dy = randn(Shape{B, Tn, C}, 41);
    nn::CoreAttention<float> attn(H);
    auto [y_ref, ctx] = attn.forward(qkv);
    const Tensor<float> dqkv_ref = attn.backward(dy, ctx);
    // Each row's log-sum-exp, directly (double).
    Tensor<float> lse_ref(Shape{B, H, Tn});
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t t = 0; t < Tn; ++t) {
          std::vector<double> s(static_cast<std::size_t>(t + 1));
          double mx = -1e300, sum = 0;
          for (std::int64_t j = 0; j <= t; ++j) {
            double d = 0;
            for (std::int64_t e = 0; e < hd; ++e) d += static_cast<double>(qkv(b, t, h * hd + e)) * qkv(b, j, C + h * hd + e);
            s[static_cast<std::size_t>(j)] = d * scale;
            mx = std::max(mx, d * scale);
          }
          for (double v : s) sum += std::exp(v - mx);
          lse_ref(b, h, t) = static_cast<float>(mx + std::log(sum));
        }
    const auto run = [&](auto zero) {  // fp32 or bf16 storage, by the type of `zero`
      using T = decltype(zero);
      auto qkv_d = dev<T>(qkv), dy_d = dev<T>(dy);
      auto y = tc::DeviceTensor<T>::empty(Shape{B, Tn, C}, stream());
      auto dqkv = tc::DeviceTensor<T>::empty(Shape{B, Tn, 3 * C}, stream());
      auto lse = tc::DeviceTensor<float>::empty(Shape{B, H, Tn}, stream());
      auto D = tc::DeviceTensor<float>::empty(Shape{B, H, Tn}, stream());
      // NaN in every output first: an element a kernel does not write fails the checks.
      for (const auto& [p, bytes] : {std::pair{static_cast<void*>(y.data()), y.bytes()},
                                     std::pair{static_cast<void*>(dqkv.data()), dqkv.bytes()},
                                     std::pair{static_cast<void*>(lse.data()), lse.bytes()}})
        REQUIRE(cudaMemsetAsync(p, 0xFF, bytes, stream().get()) == cudaSuccess);
      ops::flash_attention_forward<T>(stream(), qkv_d, H, y, lse);
      ops::flash_attention_backward<T>(stream(), dy_d, qkv_d, y, lse, H, D, dqkv);
      return std::tuple{host(y), host(lse), host(dqkv)};
    };
    const auto [y, lse, dqkv] = run(0.f);
    CHECK(rel(y, y_ref) < fp32_tol);
    CHECK(rel(lse, lse_ref) < fp32_tol);
    CHECK(rel(dqkv, dqkv_ref) < fp32_tol);
    const auto [y2, lse2, dqkv2] = run(0.f);  // no atomics: the same bits on a second run
    CHECK(rel(y2, y) == 0);
    CHECK(rel(dqkv2, dqkv) == 0);
    const auto [y16, lse16, dqkv16] = run(tc::bf16{});
    CHECK(rel(y16, y_ref) < 2e-2);
    CHECK(rel(dqkv16, dqkv_ref) < 5e-2);
    CHECK(rel(lse16, lse_ref) < 2e-2);
    CHECK(rel(lse2, lse) == 0);
  }
  // Sizes that do not fit are refused, naming them.
  auto qkv = tc::DeviceTensor<float>::empty(Shape{1, 4, 3 * 256}, stream());
  auto y = tc::DeviceTensor<float>::empty(Shape{1, 4, 256}, stream());
  auto lse = tc::DeviceTensor<float>::empty(Shape{1, 1, 4}, stream());
  CHECK_THROWS_WITH_AS(ops::flash_attention_forward<float>(stream(), qkv, 1, y, lse),
                       doctest::Contains("head_dim 256 exceeds 128"), Error);
}

TEST_CASE("tensor-core attention: the mma kernels (bf16) equal nn::CoreAttention of the same bf16 inputs within bf16 round-off and the CUDA-core kernels; either backward takes either forward's log-sum-exp; bitwise the same twice; what they do not take is refused or falls back") {
  using tc::bf16;
  using ops::FlashPath;
  if (!ops::flash_mma_supported(128, {})) {
    MESSAGE("skipped: this device or build does not run the tensor-core attention kernels (compute capability 8.0, "
            "a build for it, ", ops::flash_mma_shared_bytes(128, true), " bytes of shared memory per block)");
    return;
  }
  struct Size {
    std::int64_t B, Tn, H, hd;
  };
  const auto round_host = [](Tensor<float> t) {  // the values as bf16 holds them
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = tc::detail::to_float(tc::detail::from_float<bf16>(t.data()[i]));
    return t;
  };
  for (const Size z : {Size{2, 1, 2, 16}, Size{2, 65, 3, 32}, Size{1, 150, 2, 64}, Size{2, 64, 2, 48}, Size{1, 200, 1, 128},
                       Size{1, 1030, 2, 64}, Size{1, 70, 2, 8}}) {
    CAPTURE(z.Tn);
    CAPTURE(z.hd);
    const std::int64_t B = z.B, Tn = z.Tn, H = z.H, hd = z.hd, C = H * hd;
    const Tensor<float> qkv = round_host(randn(Shape{B, Tn, 3 * C}, 60 + static_cast<unsigned>(Tn), 2.f));
    const Tensor<float> dy = round_host(randn(Shape{B, Tn, C}, 61));
    nn::CoreAttention<float> attn(H);
    auto [y_ref, ctx] = attn.forward(qkv);
    const Tensor<float> dqkv_ref = attn.backward(dy, ctx);
    const auto qkv_d = dev<bf16>(qkv), dy_d = dev<bf16>(dy);
    // Forward by `fwd`, backward by `bwd`; NaN in every output first, so an element not written fails.
    const auto run = [&](FlashPath fwd, FlashPath bwd) {
      auto y = tc::DeviceTensor<bf16>::empty(Shape{B, Tn, C}, stream());
      auto dqkv = tc::DeviceTensor<bf16>::empty(Shape{B, Tn, 3 * C}, stream());
      auto lse = tc::DeviceTensor<float>::empty(Shape{B, H, Tn}, stream());
      auto D = tc::DeviceTensor<float>::empty(Shape{B, H, Tn}, stream());
      for (const auto& [p, bytes] : {std::pair{static_cast<void*>(y.data()), y.bytes()},
                                     std::pair{static_cast<void*>(dqkv.data()), dqkv.bytes()},
                                     std::pair{static_cast<void*>(lse.data()), lse.bytes()}})
        REQUIRE(cudaMemsetAsync(p, 0xFF, bytes, stream().get()) == cudaSuccess);
      ops::flash_attention_forward<bf16>(stream(), qkv_d, H, y, lse, fwd);
      ops::flash_attention_backward<bf16>(stream(), dy_d, qkv_d, y, lse, H, D, dqkv, bwd);
      return std::tuple{host(y), host(lse), host(dqkv)};
    };
    const auto [y, lse, dqkv] = run(FlashPath::tensor_cores, FlashPath::tensor_cores);
    CHECK(rel(y, y_ref) < 1e-2);
    CHECK(rel(dqkv, dqkv_ref) < 2e-2);
    const auto [y_c, lse_c, dqkv_c] = run(FlashPath::cuda_cores, FlashPath::cuda_cores);
    CHECK(rel(lse, lse_c) < 1e-5);  // both from fp32 scores of the same bf16 inputs
    CHECK(rel(y, y_c) < 1e-2);
    CHECK(rel(dqkv, dqkv_c) < 2e-2);
    const auto [y_x, lse_x, dqkv_x] = run(FlashPath::cuda_cores, FlashPath::tensor_cores);
    CHECK(rel(dqkv_x, dqkv_ref) < 2e-2);
    const auto [y_z, lse_z, dqkv_z] = run(FlashPath::tensor_cores, FlashPath::cuda_cores);
    CHECK(rel(dqkv_z, dqkv_ref) < 2e-2);
    const auto [y_a, lse_a, dqkv_a] = run(FlashPath::automatic, FlashPath::automatic);  // bf16: the mma kernels
    CHECK(rel(y_a, y) == 0);
    CHECK(rel(dqkv_a, dqkv) == 0);  // no atomics: the same bits on a second run
    CHECK(rel(lse_a, lse) == 0);
  }
  // head_dim 12 (not a multiple of 8) and fp32 storage are refused by name; automatic takes
  // the CUDA-core kernels for them.
  {
    const std::int64_t B = 1, Tn = 40, H = 2, hd = 12, C = H * hd;
    const Tensor<float> qkv = round_host(randn(Shape{B, Tn, 3 * C}, 70));
    auto qkv_d = dev<bf16>(qkv);
    auto y = tc::DeviceTensor<bf16>::empty(Shape{B, Tn, C}, stream());
    auto lse = tc::DeviceTensor<float>::empty(Shape{B, H, Tn}, stream());
    CHECK_THROWS_WITH_AS(ops::flash_attention_forward<bf16>(stream(), qkv_d, H, y, lse, FlashPath::tensor_cores),
                         doctest::Contains("do not take head_dim 12"), Error);
    ops::flash_attention_forward<bf16>(stream(), qkv_d, H, y, lse);
    nn::CoreAttention<float> attn(H);
    CHECK(rel(host(y), attn.forward(qkv).output) < 1e-2);
    auto qkv_f = dev<float>(qkv);
    auto y_f = tc::DeviceTensor<float>::empty(Shape{B, Tn, C}, stream());
    CHECK_THROWS_WITH_AS(ops::flash_attention_forward<float>(stream(), qkv_f, H, y_f, lse, FlashPath::tensor_cores),
                         doctest::Contains("take bf16 storage, not fp32"), Error);
  }
  // A view 2 bytes off a 16-byte boundary: refused by the mma kernels, taken by automatic's CUDA cores.
  {
    const std::int64_t B = 1, Tn = 70, H = 2, hd = 32, C = H * hd;
    const Tensor<float> qkv = round_host(randn(Shape{B, Tn, 3 * C}, 71));
    Tensor<float> padded(Shape{qkv.numel() + 1});
    padded.data()[0] = 0.f;
    for (std::int64_t i = 0; i < qkv.numel(); ++i) padded.data()[i + 1] = qkv.data()[i];
    auto padded_d = dev<bf16>(padded);
    const tc::DeviceView<const bf16> view(padded_d.data() + 1, Shape{B, Tn, 3 * C});
    auto y = tc::DeviceTensor<bf16>::empty(Shape{B, Tn, C}, stream());
    auto lse = tc::DeviceTensor<float>::empty(Shape{B, H, Tn}, stream());
    CHECK_THROWS_WITH_AS(ops::flash_attention_forward<bf16>(stream(), view, H, y, lse, FlashPath::tensor_cores),
                         doctest::Contains("unaligned views"), Error);
    ops::flash_attention_forward<bf16>(stream(), view, H, y, lse);
    nn::CoreAttention<float> attn(H);
    CHECK(rel(host(y), attn.forward(qkv).output) < 1e-2);
  }
}

TEST_CASE("adamw: one launch over a flat buffer of two parameters in two groups equals optim::AdamW") {
  Parameter<float> w("w", randn(Shape{5000}, 20)), b("b", randn(Shape{77}, 21));
  optim::AdamWOptions decay{3e-3, 0.9, 0.95, 1e-8, 0.1}, no_decay = decay;
  no_decay.weight_decay = 0;
  Tensor<float> flat(Shape{5077});
  for (std::int64_t i = 0; i < 5000; ++i) flat(i) = w.value(i);
  for (std::int64_t i = 0; i < 77; ++i) flat(5000 + i) = b.value(i);
  optim::AdamW<float> opt(std::vector<optim::ParamGroup<float, optim::AdamWOptions>>{
      {ParameterList<float>{&w}, decay}, {ParameterList<float>{&b}, no_decay}});
  auto p_d = dev(flat);
  auto m_d = tc::DeviceTensor<float>::zeros(Shape{5077}, stream()), v_d = tc::DeviceTensor<float>::zeros(Shape{5077}, stream());
  const ops::AdamWChunks chunks = ops::adamw_chunks(stream(), {{0, 5000, 0}, {5000, 77, 1}}, 1024);
  CHECK(chunks.chunks == 6);
  for (int t = 1; t <= 3; ++t) {
    const Tensor<float> g = randn(Shape{5077}, 30 + t);
    for (std::int64_t i = 0; i < 5000; ++i) w.grad(i) = g(i);
    for (std::int64_t i = 0; i < 77; ++i) b.grad(i) = g(5000 + i);
    opt.step();
    auto g_d = dev(g);
    ops::AdamWGroupScalars s{};
    s.group[0] = tc::math::adamw_scalars(decay.lr, decay.beta1, decay.beta2, decay.eps, decay.weight_decay, t);
    s.group[1] = tc::math::adamw_scalars(no_decay.lr, no_decay.beta1, no_decay.beta2, no_decay.eps, 0, t);
    ops::adamw_step<float>(stream(), p_d, g_d, m_d, v_d, chunks, s);
  }
  const Tensor<float> ph = host(p_d);
  Tensor<float> ref(Shape{5077});
  for (std::int64_t i = 0; i < 5000; ++i) ref(i) = w.value(i);
  for (std::int64_t i = 0; i < 77; ++i) ref(5000 + i) = b.value(i);
  CHECK(rel(ph, ref) < 1e-6);
}

TEST_CASE("global norm: the sum of squares of a buffer, the same on every run") {
  const Tensor<float> g = randn(Shape{123457}, 40);
  double ref = 0;
  for (std::int64_t i = 0; i < g.numel(); ++i) ref += static_cast<double>(g.data()[i]) * g.data()[i];
  auto g_d = dev(g);
  auto out = tc::DeviceTensor<float>::empty(Shape{1}, stream());
  auto ws = tc::DeviceTensor<float>::empty(Shape{ops::norm_blocks}, stream());
  ops::global_sum_of_squares(stream(), g_d, out, ws);
  const float first = host(out)(0);
  ops::global_sum_of_squares(stream(), g_d, out, ws);
  CHECK(host(out)(0) == first);
  CHECK(first == doctest::Approx(ref).epsilon(1e-5));
}

TEST_CASE("caching allocator on the device: a repeated step makes no cudaMalloc after its first, and OOM names the sizes") {
  tc::CachingAllocator<>& a = tc::default_allocator();
  auto step = [&] {
    auto t1 = tc::DeviceTensor<float>::empty(Shape{1000, 1000}, stream());
    auto t2 = tc::DeviceTensor<float>::empty(Shape{77}, stream());
    ops::gelu_forward<float>(stream(), t2, t2);
  };
  step();
  const std::int64_t raw = a.stats().raw_allocations;
  for (int i = 0; i < 5; ++i) step();
  CHECK(a.stats().raw_allocations == raw);
  CHECK(a.stats().peak_allocated_bytes >= 4000000);
  CHECK_THROWS_WITH_AS(tc::DeviceTensor<float>::empty(Shape{std::int64_t{1} << 48}, stream()),
                       doctest::Contains("out of device memory allocating 1125899906842624 bytes"), tc::OutOfDeviceMemory);
  // The device still works after the refusal.
  step();
  stream().synchronize();
}

TEST_CASE("gemm epilogue fallback: the plain product then the epilogue kernels equal Linear + GELU and GELU's backward") {
  const std::int64_t M = 21, in = 40, out = 24;
  const Tensor<float> x = randn(Shape{M, in}, 50), w = randn(Shape{in, out}, 51, 0.3f), b = randn(Shape{out}, 52, 0.1f);
  nn::Linear<float> lin("fc", w.clone(), b.clone());
  nn::GELU<float> gelu;
  auto [pre, lctx] = lin.forward(x);
  auto [y_ref, gctx] = gelu.forward(pre);
  const Tensor<float> dy = randn(Shape{M, out}, 53);
  const Tensor<float> dpre_ref = gelu.backward(dy, gctx);
  auto x_d = dev(x), w_d = dev(w), b_d = dev(b), dy_d = dev(dy);
  auto y = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  auto aux = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  const tc::GemmShape g{.m = M, .n = out, .k = in};
  blas().gemm(stream(), g, x_d.data(), w_d.data(), y.data());
  ops::kernels::epilogue_bias_gelu<float><<<4, 256, 0, stream().get()>>>(y.data(), aux.data(), b_d.data(), M, out, out, true);
  CHECK(rel(host(aux), pre) < fp32_tol);
  CHECK(rel(host(y), y_ref) < fp32_tol);
  ops::kernels::epilogue_dgelu<float><<<4, 256, 0, stream().get()>>>(dy_d.data(), aux.data(), M, out, out);
  CHECK(rel(host(dy_d), dpre_ref) < fp32_tol);
  // And through gemm_epilogue (fused or not, whichever this cuBLASLt offers): the same values.
  auto y2 = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  auto aux2 = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  const bool fused = ops::gemm_epilogue<float>(stream(), blas(), g, x_d.data(), w_d.data(), y2.data(), 1.f, 0.f,
                                               tc::EpilogueArgs{tc::Epilogue::gelu_bias, b_d.data(), aux2.data()});
  MESSAGE("cuBLASLt fuses bias + GELU for fp32 here: ", fused);
  CHECK(rel(host(y2), y_ref) < 1e-4);
  // A bias 4 bytes off a 16-byte boundary: never handed to cuBLASLt (try_gemm refuses it), the
  // unfused path gives the same values.
  auto b_off = tc::DeviceTensor<float>::empty(Shape{out + 1}, stream());
  tc::detail::check(cudaMemcpyAsync(b_off.data() + 1, b_d.data(), out * sizeof(float), cudaMemcpyDeviceToDevice,
                                    stream().get()),
                    "cudaMemcpyAsync", "test");
  auto y3 = tc::DeviceTensor<float>::empty(Shape{M, out}, stream());
  CHECK_FALSE(ops::gemm_epilogue<float>(stream(), blas(), g, x_d.data(), w_d.data(), y3.data(), 1.f, 0.f,
                                        tc::EpilogueArgs{tc::Epilogue::gelu_bias, b_off.data() + 1, aux2.data()}));
  CHECK(rel(host(y3), y_ref) < 1e-4);
  CHECK(rel(host(aux2), pre) < 1e-4);
}
