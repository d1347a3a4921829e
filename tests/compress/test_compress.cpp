// Gradient compression through GradBuckets' communication hook (parallel/data/compression):
// each compressor's arithmetic against a direct computation on the main thread, error feedback
// keeping the sum, "none" through the hook bitwise equal to plain DataParallel, and the hooks
// composed with buckets, accumulation and ZeRO-1. Threads backend.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "dp/dp_bodies.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/data/compression/local_gradient_hook.hpp"
#include "tessera/parallel/data/compression/make_comm_hook.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;
using testing::run_ranks;

namespace {

// A deterministic gradient value of (step, rank, element), in about [-1, 1], with a few large
// entries so that top-k has a clear choice.
float grad_value(int step, int rank, std::size_t i) {
  const std::uint64_t h = dp_bodies::mix((static_cast<std::uint64_t>(step) << 40) ^ (static_cast<std::uint64_t>(rank) << 32) ^ i);
  const double u = static_cast<double>(h >> 11) * 0x1p-53 * 2.0 - 1.0;
  return static_cast<float>(h % 7 == 0 ? 4.0 * u : u);
}

std::vector<float> grads_of(int step, int rank, std::size_t n) {
  std::vector<float> g(n);
  for (std::size_t i = 0; i < n; ++i) g[i] = grad_value(step, rank, i);
  return g;
}

// DGC's top-k with momentum correction computed directly in double, for `world` ranks whose
// gradients are grad_value(step, rank, i) over n entries: per rank U = m U + G; a dense step
// (k = 0) sums the U's; a compressed step takes M = E + U, sums the k largest |M| (ties: the
// lower index) and zeroes them in M (which becomes E) and in U.
struct DirectDgc {
  std::vector<std::vector<double>> E, U;
  double m;
  DirectDgc(int world, std::size_t n, double momentum)
      : E(static_cast<std::size_t>(world), std::vector<double>(n, 0.0)), U(E), m(momentum) {}
  // The bucket every rank holds after reduction `step` with k entries sent per rank (0: dense).
  std::vector<double> reduce(int step, std::size_t k) {
    const std::size_t n = E.front().size();
    std::vector<double> sum(n, 0.0);
    for (std::size_t w = 0; w < E.size(); ++w) {
      for (std::size_t i = 0; i < n; ++i) U[w][i] = m * U[w][i] + static_cast<double>(grad_value(step, static_cast<int>(w), i));
      if (k == 0) {
        for (std::size_t i = 0; i < n; ++i) sum[i] += U[w][i];
        continue;
      }
      std::vector<double> M(n);
      for (std::size_t i = 0; i < n; ++i) M[i] = E[w][i] + U[w][i];
      std::vector<std::int32_t> idx(n);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](std::int32_t a, std::int32_t b) { return std::abs(M[a]) > std::abs(M[b]); });
      idx.resize(k);
      for (std::int32_t i : idx) {
        sum[i] += M[i];
        M[i] = 0;
        U[w][i] = 0;
      }
      E[w] = M;
    }
    return sum;
  }
};

}  // namespace

TEST_CASE("half_float: rounding to bf16 and fp16, nearest with ties to even") {
  CHECK(float_to_bf16(1.0f) == 0x3f80);
  CHECK(float_to_bf16(1.0f + 0x1p-8f) == 0x3f80);       // tie: to even (down)
  CHECK(float_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82);   // tie: to even (up)
  CHECK(float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81);
  CHECK(float_to_bf16(-2.0f) == 0xc000);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  CHECK(bf16_to_float(0x3f81) == 1.0f + 0x1p-7f);
  CHECK(float_to_fp16(1.0f) == 0x3c00);
  CHECK(float_to_fp16(65504.0f) == 0x7bff);
  CHECK(float_to_fp16(65519.0f) == 0x7bff);
  CHECK(float_to_fp16(65520.0f) == 0x7c00);            // tie at the top rounds to infinity
  CHECK(float_to_fp16(0x1p-24f) == 0x0001);            // smallest subnormal
  CHECK(float_to_fp16(0x1p-25f) == 0x0000);            // half of it: tie to even (0)
  CHECK(float_to_fp16(3 * 0x1p-26f) == 0x0001);
  CHECK(float_to_fp16(1.0f / 3.0f) == 0x3555);
  CHECK(float_to_fp16(-0x1p-14f) == 0x8400);           // smallest normal
  CHECK(fp16_to_float(0x3555) == 0x1.554p-2f);
  CHECK(fp16_to_float(0x0001) == 0x1p-24f);
  CHECK(fp16_to_float(0x7c00) == INFINITY);
  // Every fp16 value survives the round trip.
  int bad = 0;
  for (std::uint32_t h = 0; h < 0x10000; ++h)
    if ((h & 0x7c00) != 0x7c00 && float_to_fp16(fp16_to_float(static_cast<std::uint16_t>(h))) != h) ++bad;
  CHECK(bad == 0);
}

TEST_CASE("make_comm_hook: names and refusals") {
  CHECK(make_comm_hook<float>("none")->name() == "none");
  CHECK(make_comm_hook<float>("bf16")->name() == "bf16");
  CHECK(make_comm_hook<float>("fp16")->name() == "fp16");
  CHECK(make_comm_hook<float>("powersgd:4")->name() == "powersgd:4");
  CHECK(make_comm_hook<float>("topk:0.01")->name() == "topk:0.01");
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:0"), doctest::Contains("rank \"0\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:1.5"), doctest::Contains("fraction \"1.5\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:x"), doctest::Contains("not in (0, 1]"), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("int8"), doctest::Contains("\"int8\" is unknown"), Error);
}

TEST_CASE("HalfPrecisionHook: 16-bit addends summed in fp32 in rank order, the sum rounded once") {
  for (HalfFormat f : {HalfFormat::bf16, HalfFormat::fp16}) {
    for (int world : {1, 2, 3, 4}) {
      for (std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{64}}) {
        CAPTURE(world);
        CAPTURE(n);
        auto out = run_ranks(world, [&](Comm& c) {
          HalfPrecisionHook<float> hook(f);
          std::vector<float> g = grads_of(0, c.rank(), n);
          GradBucketView<float> v{.index = 0, .grad = g, .tensors = {{0, Shape{static_cast<std::int64_t>(n)}}}};
          hook.reduce(v, c);
          return g;
        });
        int wrong = 0;
        for (std::size_t i = 0; i < n; ++i) {
          float sum = 0;
          for (int r = 0; r < world; ++r) sum += decode_half(f, encode_half(f, grad_value(0, r, i)));
          const float expect = decode_half(f, encode_half(f, sum));
          for (int r = 0; r < world; ++r) wrong += out[static_cast<std::size_t>(r)][i] != expect;
        }
        CHECK(wrong == 0);
      }
    }
  }
}

namespace {

// Direct PowerSGD step for one matrix (double): Ms are every rank's M = G + E (n x m), q the
// warm start (m x r); returns P^ (n x r), Q (sum, m x r) and P^ Q^T.
struct DirectPowerSGD {
  std::vector<double> p_hat, q_sum, approx;
};
DirectPowerSGD direct_powersgd(const std::vector<std::vector<double>>& Ms, const std::vector<double>& q, std::int64_t n,
                               std::int64_t m, std::int64_t r) {
  DirectPowerSGD d;
  d.p_hat.assign(static_cast<std::size_t>(n * r), 0.0);
  for (const auto& M : Ms)
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < r; ++c)
        for (std::int64_t j = 0; j < m; ++j) d.p_hat[i * r + c] += M[i * m + j] * q[j * r + c];
  // Gram-Schmidt: column c minus its projections on the earlier (normalized) columns.
  for (std::int64_t c = 0; c < r; ++c) {
    for (std::int64_t k = 0; k < c; ++k) {
      double dot = 0;
      for (std::int64_t i = 0; i < n; ++i) dot += d.p_hat[i * r + c] * d.p_hat[i * r + k];
      for (std::int64_t i = 0; i < n; ++i) d.p_hat[i * r + c] -= dot * d.p_hat[i * r + k];
    }
    double norm = 0;
    for (std::int64_t i = 0; i < n; ++i) norm += d.p_hat[i * r + c] * d.p_hat[i * r + c];
    for (std::int64_t i = 0; i < n; ++i) d.p_hat[i * r + c] /= std::sqrt(norm);
  }
  d.q_sum.assign(static_cast<std::size_t>(m * r), 0.0);
  for (const auto& M : Ms)
    for (std::int64_t j = 0; j < m; ++j)
      for (std::int64_t c = 0; c < r; ++c)
        for (std::int64_t i = 0; i < n; ++i) d.q_sum[j * r + c] += M[i * m + j] * d.p_hat[i * r + c];
  d.approx.assign(static_cast<std::size_t>(n * m), 0.0);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < m; ++j)
      for (std::int64_t c = 0; c < r; ++c) d.approx[i * m + j] += d.p_hat[i * r + c] * d.q_sum[j * r + c];
  return d;
}

double max_abs_diff(std::span<const float> a, std::span<const double> b) {
  if (a.size() != b.size()) return INFINITY;
  double w = 0;
  for (std::size_t i = 0; i < a.size(); ++i) w = std::max(w, std::abs(static_cast<double>(a[i]) - b[i]));
  return std::isfinite(w) ? w : INFINITY;
}

}  // namespace

TEST_CASE("PowerSGDHook: P, Q, the result and the residual against a direct computation") {
  // A bucket of a (6, 5) matrix, a bias of 5 and a (2, 3) matrix too small to compress
  // (r (n + m) >= n m), over 3 ranks, rank 2; two steps (the second uses the warm start and
  // the residual of the first).
  constexpr int world = 3;
  constexpr std::int64_t n = 6, m = 5, r = 2;
  const std::size_t total = n * m + 5 + 6;
  struct RankOut {
    std::vector<float> q0, e0, q1, e1, out1;
  };
  auto outs = run_ranks(world, [&](Comm& c) {
    PowerSGDHook<float> hook({.rank = r});
    RankOut o;
    for (int step = 0; step < 2; ++step) {
      std::vector<float> g = grads_of(step, c.rank(), total);
      GradBucketView<float> v{.index = 3, .grad = g, .tensors = {{0, Shape{n, m}}, {n * m, Shape{5}}, {n * m + 5, Shape{2, 3}}}};
      hook.reduce(v, c);
      const auto& s = hook.matrices(3).at(0);
      (step == 0 ? o.q0 : o.q1) = s.q;
      (step == 0 ? o.e0 : o.e1) = s.error;
      if (step == 1) o.out1 = g;
      REQUIRE(hook.matrices(3).size() == 1);  // the (2, 3) matrix and the bias are sent uncompressed
    }
    return o;
  });
  // Step 2 (index 1) from the warm start and residuals left by step 1, directly.
  std::vector<std::vector<double>> Ms;
  for (int w = 0; w < world; ++w) {
    std::vector<double> M(n * m);
    for (std::size_t i = 0; i < M.size(); ++i) M[i] = grad_value(1, w, i) + static_cast<double>(outs[w].e0[i]);
    Ms.push_back(std::move(M));
  }
  std::vector<double> q(outs[0].q0.begin(), outs[0].q0.end());
  for (int w = 1; w < world; ++w) CHECK(outs[w].q0 == outs[0].q0);  // the warm start is the same on every rank
  const DirectPowerSGD d = direct_powersgd(Ms, q, n, m, r);
  for (int w = 0; w < world; ++w) {
    CAPTURE(w);
    CHECK(max_abs_diff(std::span<const float>(outs[w].out1).first(n * m), d.approx) < 2e-5);
    std::vector<double> q_mean(d.q_sum), e(n * m);
    for (double& x : q_mean) x /= world;
    CHECK(max_abs_diff(outs[w].q1, q_mean) < 2e-5);
    for (std::size_t i = 0; i < e.size(); ++i) e[i] = Ms[w][i] - d.approx[i] / world;
    CHECK(max_abs_diff(outs[w].e1, e) < 2e-5);
    // The bias and the small matrix: the exact sum.
    for (std::size_t i = n * m; i < total; ++i) {
      double sum = 0;
      for (int k = 0; k < world; ++k) sum += grad_value(1, k, i);
      CHECK(std::abs(outs[w].out1[i] - sum) < 1e-5);
    }
  }
}

TEST_CASE("PowerSGDHook warm-up: the first N reductions are the plain all-reduce bitwise, then compression starts afresh") {
  constexpr int world = 3, warmup = 2;
  constexpr std::int64_t n = 8, m = 6;
  const std::size_t total = n * m + 4;
  const std::vector<GradBucketTensor> tensors{{0, Shape{n, m}}, {n * m, Shape{4}}};
  auto ok = run_ranks(world, [&](Comm& c) {
    PowerSGDHook<float> warm({.rank = 2, .warmup_steps = warmup});
    PowerSGDHook<float> fresh({.rank = 2});
    AllReduceHook<float> plain;
    int bad = 0;
    for (int step = 0; step < warmup + 2; ++step) {
      std::vector<float> g = grads_of(step, c.rank(), total), ref = g;
      GradBucketView<float> v{.index = 1, .grad = g, .tensors = tensors}, vr{.index = 1, .grad = ref, .tensors = tensors};
      warm.reduce(v, c);
      if (step < warmup) plain.reduce(vr, c);
      else fresh.reduce(vr, c);  // compression from the warm-up's end equals a hook that starts then
      bad += g != ref;
      // No Q, no residual during the warm-up; the matrix compressed from its end on.
      bad += step < warmup ? !warm.matrices(1).empty() : warm.matrices(1).size() != 1;
    }
    bad += warm.bytes_sent() != plain.bytes_sent() + fresh.bytes_sent();
    return bad;
  });
  for (int bad : ok) CHECK(bad == 0);
  CHECK(make_comm_hook<float>("powersgd:4,warmup=40")->name() == "powersgd:4,warmup=40");
  CHECK(make_comm_hook<float>("powersgd:4,warmup=0")->name() == "powersgd:4");
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:4,warmup=-1"), doctest::Contains("warmup \"-1\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:4,rank=2"), doctest::Contains("option \"rank=2\" is unknown"), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("bf16,warmup=3"), doctest::Contains("only powersgd and topk take"), Error);
  // Duplicates, stray commas, signs and spaces are refused, not silently read (session 18).
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:4,warmup=2,warmup=3"), doctest::Contains("warmup is given twice"),
                       Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:4,"), doctest::Contains("an empty option"), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.5,,warmup=1"), doctest::Contains("an empty option"), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.5,warmup=1,"), doctest::Contains("an empty option"), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:+4"), doctest::Contains("rank \"+4\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd: 4"), doctest::Contains("rank \" 4\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk: 0.5"), doctest::Contains("fraction \" 0.5\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:4,warmup=+2"), doctest::Contains("warmup \"+2\""), Error);
  // The name shows the fraction as it is used (it was "topk:0" for 1e-30).
  CHECK(make_comm_hook<float>("topk:1e-30")->name() == "topk:1e-30");
  CHECK(make_comm_hook<float>("topk:0.01,warmup=5")->name() == "topk:0.01,warmup=5");
  CHECK(make_comm_hook<float>("topk:.5")->name() == "topk:0.5");
  CHECK_THROWS_WITH_AS(PowerSGDHook<float>({.rank = 1, .warmup_steps = -3}), doctest::Contains("warmup_steps -3"), Error);
}

TEST_CASE("TopKHook warm-up: the first N reductions are the plain all-reduce bitwise, then top-k starts with E = 0") {
  constexpr int world = 3, warmup = 2;
  const std::size_t n = 300;
  const std::vector<GradBucketTensor> tensors{{0, Shape{static_cast<std::int64_t>(n)}}};
  auto ok = run_ranks(world, [&](Comm& c) {
    TopKHook<float> warm(0.05, warmup), fresh(0.05);
    AllReduceHook<float> plain;
    int bad = 0;
    for (int step = 0; step < warmup + 3; ++step) {
      std::vector<float> g = grads_of(step, c.rank(), n), ref = g;
      GradBucketView<float> v{.index = 2, .grad = g, .tensors = tensors}, vr{.index = 2, .grad = ref, .tensors = tensors};
      warm.reduce(v, c);
      if (step < warmup) plain.reduce(vr, c);
      else fresh.reduce(vr, c);  // from the warm-up's end: a hook that starts then, residual included
      bad += g != ref;
      bad += step < warmup ? !warm.residual(2).empty() : !std::ranges::equal(warm.residual(2), fresh.residual(2));
      // The state holds the warm-up count, and a hook restored from it continues identically.
      const DpRankState<float> st = warm.state();
      bad += st.counters.at("bucket2.reductions") != std::min(step + 1, warmup);
      if (step == 0) {
        TopKHook<float> resumed(0.05, warmup);
        resumed.load_state(st);
        std::vector<float> g1 = grads_of(1, c.rank(), n), g2 = g1;
        GradBucketView<float> v1{.index = 2, .grad = g1, .tensors = tensors}, v2{.index = 2, .grad = g2, .tensors = tensors};
        resumed.reduce(v1, c);  // warm-up reduction 2 of 2: plain
        plain.reduce(v2, c);
        bad += g1 != g2;
      }
    }
    return bad;
  });
  for (int bad : ok) CHECK(bad == 0);
  CHECK(make_comm_hook<float>("topk:0.01,warmup=20")->name() == "topk:0.01,warmup=20");
  CHECK(make_comm_hook<float>("topk:0.01,warmup=20")->warmup_steps() == 20);
  CHECK(make_comm_hook<float>("powersgd:4,warmup=7")->warmup_steps() == 7);
  CHECK(make_comm_hook<float>("topk:0.01")->warmup_steps() == 0);
  CHECK(make_comm_hook<float>("bf16")->warmup_steps() == 0);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.01,warmup=x"), doctest::Contains("warmup \"x\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.01,rank=2"), doctest::Contains("option \"rank=2\" is unknown"), Error);
  CHECK_THROWS_WITH_AS(TopKHook<float>(0.1, -1), doctest::Contains("warmup_steps -1"), Error);
  DpRankState<float> bad_state;
  bad_state.counters["bucket1.reduction"] = 3;
  CHECK_THROWS_WITH_AS(TopKHook<float>(0.1, 2).load_state(bad_state), doctest::Contains("bucket1.reduction"), Error);
}

TEST_CASE("AdamW with a frozen second moment (1-bit Adam): Adam up to step F, then momentum SGD preconditioned by v_F") {
  // Two groups, the second without freezing, against a direct double computation over 7 steps
  // with F = 3: v and its bias correction stop at step 3 in group 0 only.
  constexpr int steps = 7;
  constexpr std::int64_t freeze = 3;
  const std::size_t n = 5;
  std::vector<float> w0 = grads_of(100, 0, n), w1 = grads_of(101, 0, n);
  Parameter<float> a("a", Tensor<float>::from(Shape{static_cast<std::int64_t>(n)}, std::span<const float>(w0)));
  Parameter<float> b("b", Tensor<float>::from(Shape{static_cast<std::int64_t>(n)}, std::span<const float>(w1)));
  ParameterList<float> ga, gb;
  ga.push_back(a);
  gb.push_back(b);
  const optim::AdamWOptions oa{.lr = 0.01, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1,
                               .freeze_variance_after = freeze};
  optim::AdamWOptions ob = oa;
  ob.freeze_variance_after = 0;
  optim::AdamW<float> opt(std::vector<optim::ParamGroup<float, optim::AdamWOptions>>{{ga, oa}, {gb, ob}});
  // Direct computation in double.
  std::vector<double> x[2] = {{w0.begin(), w0.end()}, {w1.begin(), w1.end()}}, m[2], v[2];
  for (int q = 0; q < 2; ++q) m[q].assign(n, 0.0), v[q].assign(n, 0.0);
  std::vector<float> v_at_freeze;
  for (int t = 1; t <= steps; ++t) {
    CHECK(opt.variance_frozen(0) == (t - 1 >= freeze));
    CHECK_FALSE(opt.variance_frozen(1));
    for (int q = 0; q < 2; ++q) {
      const std::vector<float> g = grads_of(t, q, n);
      (q == 0 ? a : b).grad.copy_from(Tensor<float>::from(Shape{static_cast<std::int64_t>(n)}, std::span<const float>(g)));
      const bool frozen = q == 0 && t > freeze;
      const double bc1 = 1 - std::pow(0.8, t), bc2 = 1 - std::pow(0.95, frozen ? freeze : t);
      for (std::size_t i = 0; i < n; ++i) {
        x[q][i] *= 1 - 0.01 * 0.1;
        m[q][i] = 0.8 * m[q][i] + 0.2 * g[i];
        if (!frozen) v[q][i] = 0.95 * v[q][i] + 0.05 * static_cast<double>(g[i]) * g[i];
        x[q][i] -= 0.01 / bc1 * m[q][i] / (std::sqrt(v[q][i]) / std::sqrt(bc2) + 1e-6);
      }
    }
    opt.step();
    if (t == freeze) v_at_freeze.assign(opt.exp_avg_sq(0).data(), opt.exp_avg_sq(0).data() + n);
    for (int q = 0; q < 2; ++q) {
      const Tensor<float>& val = (q == 0 ? a : b).value;
      for (std::size_t i = 0; i < n; ++i) {
        CAPTURE(t);
        CAPTURE(q);
        CAPTURE(i);
        CHECK(std::abs(val.data()[i] - x[q][i]) <= 1e-6 * (1 + std::abs(x[q][i])));
        CHECK(std::abs(opt.exp_avg_sq(q).data()[i] - v[q][i]) <= 1e-6 * v[q][i] + 1e-12);
      }
    }
  }
  // v of group 0 is bitwise step F's; group 1's kept moving.
  CHECK(std::ranges::equal(std::span<const float>(opt.exp_avg_sq(0).data(), n), v_at_freeze));
  CHECK_THROWS_WITH_AS(optim::AdamW<float>(ga, optim::AdamWOptions{.freeze_variance_after = -2}),
                       doctest::Contains("freeze_variance_after -2"), Error);
}

TEST_CASE("TopKHook: the k largest |G + E| of each rank, summed; the rest carried to the next step") {
  constexpr int world = 3;
  constexpr std::size_t n = 40;
  constexpr double frac = 0.1;  // k = 4
  struct RankOut {
    std::vector<std::vector<float>> out, residual;
    std::vector<std::vector<std::int32_t>> sent;
  };
  auto outs = run_ranks(world, [&](Comm& c) {
    TopKHook<float> hook(frac);
    RankOut o;
    for (int step = 0; step < 3; ++step) {
      std::vector<float> g = grads_of(step, c.rank(), n);
      GradBucketView<float> v{.index = 0, .grad = g, .tensors = {{0, Shape{8, 5}}}};
      hook.reduce(v, c);
      o.out.push_back(g);
      o.residual.emplace_back(hook.residual(0).begin(), hook.residual(0).end());
      o.sent.emplace_back(hook.last_indices(0).begin(), hook.last_indices(0).end());
    }
    return o;
  });
  // Direct: per rank, M = G + E; sort indices by |M| descending (ties: lower index); first k.
  std::vector<std::vector<double>> E(world, std::vector<double>(n, 0.0));
  for (int step = 0; step < 3; ++step) {
    std::vector<double> expect(n, 0.0);
    for (int w = 0; w < world; ++w) {
      std::vector<double> M(n);
      for (std::size_t i = 0; i < n; ++i) M[i] = E[w][i] + static_cast<double>(grad_value(step, w, i));
      std::vector<std::int32_t> idx(n);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](std::int32_t a, std::int32_t b) { return std::abs(M[a]) > std::abs(M[b]); });
      idx.resize(4);
      std::sort(idx.begin(), idx.end());
      CHECK(outs[w].sent[step] == idx);
      for (std::int32_t i : idx) {
        expect[i] += M[i];
        M[i] = 0;
      }
      E[w] = M;
      CHECK(max_abs_diff(outs[w].residual[step], E[w]) < 1e-6);
    }
    for (int w = 0; w < world; ++w) CHECK(max_abs_diff(outs[w].out[step], expect) < 1e-5);
  }
}

TEST_CASE("TopKHook with momentum (DGC's momentum correction): U = m U + G accumulated and sparsified, sent entries masked in U") {
  constexpr int world = 3, warmup = 2, steps = 6;
  constexpr std::size_t n = 40;
  constexpr double frac = 0.1, m = 0.9;  // k = 4
  struct RankOut {
    std::vector<std::vector<float>> out, residual, velocity;
    std::vector<float> resumed_out;  // step 5 from a hook restored from step 4's state
  };
  auto outs = run_ranks(world, [&](Comm& c) {
    TopKHook<float> hook(frac, warmup, m);
    RankOut o;
    for (int step = 0; step < steps; ++step) {
      DpRankState<float> before = hook.state();
      std::vector<float> g = grads_of(step, c.rank(), n);
      GradBucketView<float> v{.index = 1, .grad = g, .tensors = {{0, Shape{8, 5}}}};
      hook.reduce(v, c);
      o.out.push_back(g);
      o.residual.emplace_back(hook.residual(1).begin(), hook.residual(1).end());
      o.velocity.emplace_back(hook.velocity(1).begin(), hook.velocity(1).end());
      if (step == steps - 1) {  // a hook restored from the state before this step does the same
        TopKHook<float> resumed(frac, warmup, m);
        resumed.load_state(before);
        std::vector<float> g2 = grads_of(step, c.rank(), n);
        GradBucketView<float> v2{.index = 1, .grad = g2, .tensors = {{0, Shape{8, 5}}}};
        resumed.reduce(v2, c);
        o.resumed_out = g2;
      }
    }
    return o;
  });
  // Direct (double): DirectDgc, dense in the warm-up, then k = 4.
  DirectDgc direct(world, n, m);
  for (int step = 0; step < steps; ++step) {
    const std::vector<double> expect = direct.reduce(step, step < warmup ? 0 : 4);
    for (int w = 0; w < world; ++w) {
      CHECK(max_abs_diff(outs[w].out[step], expect) < 1e-5);
      CHECK(max_abs_diff(outs[w].velocity[step], direct.U[w]) < 1e-5);
      if (step < warmup) CHECK(outs[w].residual[step].empty());
      else CHECK(max_abs_diff(outs[w].residual[step], direct.E[w]) < 1e-5);
    }
  }
  for (int w = 0; w < world; ++w) CHECK(outs[w].resumed_out == outs[w].out[steps - 1]);
  CHECK(make_comm_hook<float>("topk:0.01,warmup=2,momentum=0.9")->name() == "topk:0.01,warmup=2,momentum=0.9");
  CHECK(make_comm_hook<float>("topk:0.01,momentum=0.9,warmup=2")->name() == "topk:0.01,warmup=2,momentum=0.9");
  CHECK(dynamic_cast<TopKHook<float>&>(*make_comm_hook<float>("topk:0.5,momentum=0.25")).momentum() == 0.25);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.01,momentum=1"), doctest::Contains("momentum \"1\" is not in [0, 1)"), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.01,momentum=-0.5"), doctest::Contains("momentum \"-0.5\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.01,momentum=0.9,momentum=0.8"), doctest::Contains("given twice"), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:4,momentum=0.9"), doctest::Contains("\"momentum=0.9\" is unknown"), Error);
  CHECK_THROWS_WITH_AS(TopKHook<float>(0.1, 0, 1.0), doctest::Contains("momentum 1 must be in [0, 1)"), Error);
  DpRankState<float> with_velocity;
  with_velocity.tensors["bucket0.velocity"] = std::vector<float>(3, 1.0f);
  CHECK_THROWS_WITH_AS(TopKHook<float>(0.1).load_state(with_velocity), doctest::Contains("needs a hook with momentum"), Error);
}

TEST_CASE("TopKHook sparsity warm-up (DGC): four stages of 1/4, 1/16, 1/64, 1/256 of the entries, then the fraction") {
  // n = 300, final fraction 0.001 (k = 1), S = 8 compressed reductions after 1 dense one, with
  // DGC's momentum 0.5: k = 75, 75, 19, 19, 5, 5, 2, 2, then 1 (ceil(300 / 4^(s+1))).
  constexpr int world = 3, warmup = 1, sparsity_warmup = 8, steps = 12;
  constexpr std::size_t n = 300;
  constexpr double frac = 0.001, m = 0.5;
  const std::vector<std::size_t> k_at = {75, 75, 19, 19, 5, 5, 2, 2, 1, 1, 1};  // compressed reduction c
  struct RankOut {
    std::vector<std::vector<float>> out, residual;
    std::vector<std::size_t> sent;
    std::vector<std::int64_t> counter;
    std::vector<float> resumed_out;  // step 4 (c = 3) from a hook restored from the state before it
    std::vector<std::size_t> nan_sent;  // a second hook: rank 1's gradient holds a NaN at c = 2
  };
  auto outs = run_ranks(world, [&](Comm& c) {
    TopKHook<float> hook(frac, warmup, m, sparsity_warmup);
    RankOut o;
    for (int step = 0; step < steps; ++step) {
      DpRankState<float> before = hook.state();
      std::vector<float> g = grads_of(step, c.rank(), n);
      GradBucketView<float> v{.index = 3, .grad = g, .tensors = {{0, Shape{300}}}};
      hook.reduce(v, c);
      o.out.push_back(g);
      o.residual.emplace_back(hook.residual(3).begin(), hook.residual(3).end());
      o.sent.push_back(hook.last_indices(3).size());
      const auto st = hook.state();
      o.counter.push_back(st.counters.contains("bucket3.compressed") ? st.counters.at("bucket3.compressed") : -1);
      if (step == 4) {
        TopKHook<float> resumed(frac, warmup, m, sparsity_warmup);
        resumed.load_state(before);
        std::vector<float> g2 = grads_of(step, c.rank(), n);
        GradBucketView<float> v2{.index = 3, .grad = g2, .tensors = {{0, Shape{300}}}};
        resumed.reduce(v2, c);
        o.resumed_out = g2;
      }
    }
    TopKHook<float> nan_hook(frac, 0, 0, sparsity_warmup);
    for (int step = 0; step < 6; ++step) {
      std::vector<float> g = grads_of(step, c.rank(), n);
      if (step == 2 && c.rank() == 1) g[7] = std::numeric_limits<float>::quiet_NaN();
      GradBucketView<float> v{.index = 0, .grad = g, .tensors = {{0, Shape{300}}}};
      nan_hook.reduce(v, c);
      o.nan_sent.push_back(nan_hook.last_indices(0).size());
    }
    return o;
  });
  // Direct (double): DirectDgc with k following k_at.
  DirectDgc direct(world, n, m);
  for (int step = 0; step < steps; ++step) {
    const int cidx = step - warmup;
    const std::vector<double> expect = direct.reduce(step, step < warmup ? 0 : k_at[static_cast<std::size_t>(cidx)]);
    for (int w = 0; w < world; ++w) {
      CHECK(max_abs_diff(outs[w].out[step], expect) < 1e-5);
      if (step >= warmup) {
        CHECK(outs[w].sent[step] == k_at[static_cast<std::size_t>(cidx)]);
        CHECK(outs[w].counter[step] == cidx + 1);
        CHECK(max_abs_diff(outs[w].residual[step], direct.E[w]) < 1e-5);
      } else {
        CHECK(outs[w].counter[step] == -1);
      }
    }
  }
  for (int w = 0; w < world; ++w) {
    CHECK(outs[w].resumed_out == outs[w].out[4]);
    // The NaN reduction counts on every rank, so k stays the same everywhere afterwards.
    CHECK(outs[w].nan_sent == std::vector<std::size_t>{75, 75, 19, 19, 5, 5});
  }
  TopKHook<float> h(0.01, 0, 0, 40);
  CHECK(h.fraction_at(0) == 0.25);
  CHECK(h.fraction_at(9) == 0.25);
  CHECK(h.fraction_at(10) == 0.0625);
  CHECK(h.fraction_at(20) == 0.015625);
  CHECK(h.fraction_at(30) == 0.01);  // 1/256 is below the fraction
  CHECK(h.fraction_at(40) == 0.01);
  CHECK(TopKHook<float>(0.01).fraction_at(0) == 0.01);
  CHECK(make_comm_hook<float>("topk:0.01,sparsity_warmup=40,momentum=0.9")->name() ==
        "topk:0.01,momentum=0.9,sparsity_warmup=40");
  CHECK(dynamic_cast<TopKHook<float>&>(*make_comm_hook<float>("topk:0.5,sparsity_warmup=3")).sparsity_warmup_steps() == 3);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.01,sparsity_warmup=-1"), doctest::Contains("sparsity_warmup \"-1\""), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("topk:0.01,sparsity_warmup=2,sparsity_warmup=2"), doctest::Contains("given twice"), Error);
  CHECK_THROWS_WITH_AS(make_comm_hook<float>("powersgd:4,sparsity_warmup=2"), doctest::Contains("\"sparsity_warmup=2\" is unknown"), Error);
  CHECK_THROWS_WITH_AS(TopKHook<float>(0.1, 0, 0, -2), doctest::Contains("sparsity_warmup_steps -2"), Error);
  DpRankState<float> bad;
  bad.counters["bucket1.compresed"] = 3;
  CHECK_THROWS_WITH_AS(TopKHook<float>(0.1, 0, 0, 4).load_state(bad), doctest::Contains("bucket1.compresed"), Error);
}

TEST_CASE("TopKHook: a NaN or Inf gradient leaves the state as it was and reaches every rank's result where it was") {
  constexpr int world = 2;
  constexpr std::size_t n = 40;
  for (const int warmup : {0, 5}) {
    auto ok = run_ranks(world, [&](Comm& c) {
      TopKHook<float> hook(0.1, warmup, 0.9);
      int bad = 0;
      for (int step = 0; step < 3; ++step) {
        const std::vector<float> e0(hook.residual(0).begin(), hook.residual(0).end());
        const std::vector<float> u0(hook.velocity(0).begin(), hook.velocity(0).end());
        std::vector<float> g = grads_of(step, c.rank(), n);
        if (step == 2 && c.rank() == 1) {
          g[7] = std::numeric_limits<float>::quiet_NaN();
          g[12] = std::numeric_limits<float>::infinity();
        }
        GradBucketView<float> v{.index = 0, .grad = g, .tensors = {{0, Shape{8, 5}}}};
        hook.reduce(v, c);
        if (step < 2) continue;
        // Every rank: non-finite at 7 and 12, finite elsewhere.
        for (std::size_t i = 0; i < n; ++i) bad += std::isfinite(g[i]) == (i == 7 || i == 12);
        // The rank with the bad gradient keeps its residual and velocity.
        if (c.rank() == 1) {
          bad += !std::ranges::equal(hook.residual(0), e0);
          bad += !std::ranges::equal(hook.velocity(0), u0);
        }
      }
      return bad;
    });
    for (int bad : ok) CHECK(bad == 0);
  }
}

TEST_CASE("TopKHook: ties in |M| go to the lower index, so every rank's choice is determined") {
  auto outs = run_ranks(2, [&](Comm& c) {
    TopKHook<float> hook(0.25);  // k = 3 of 12
    std::vector<float> g(12, 0.5f);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = (i % 2 ? -0.5f : 0.5f) * (i == 7 ? 2.0f : 1.0f);
    GradBucketView<float> v{.index = 0, .grad = g, .tensors = {{0, Shape{12}}}};
    hook.reduce(v, c);
    return std::vector<std::int32_t>(hook.last_indices(0).begin(), hook.last_indices(0).end());
  });
  for (const auto& sent : outs) CHECK(sent == std::vector<std::int32_t>{0, 1, 7});
}

TEST_CASE("Error feedback keeps the sum: applied + residuals == sum of the uncompressed gradients") {
  // Over 8 steps of one bucket (a (12, 10) matrix and a bias of 10) at 3 ranks:
  // sum_t applied_t + sum_w E_w == sum_t sum_w G_{w,t}, to fp32 round-off.
  constexpr int world = 3, steps = 8;
  constexpr std::size_t n = 130;
  for (const std::string spec : {"powersgd:1", "powersgd:2", "topk:0.05", "topk:0.3"}) {
    CAPTURE(spec);
    struct Out {
      std::vector<double> applied, residual;
    };
    auto outs = run_ranks(world, [&](Comm& c) {
      auto hook = make_comm_hook<float>(spec);
      Out o{std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
      for (int step = 0; step < steps; ++step) {
        std::vector<float> g = grads_of(step, c.rank(), n);
        GradBucketView<float> v{.index = 0, .grad = g, .tensors = {{0, Shape{12, 10}}, {120, Shape{10}}}};
        hook->reduce(v, c);
        for (std::size_t i = 0; i < n; ++i) o.applied[i] += g[i];
      }
      if (auto* p = dynamic_cast<PowerSGDHook<float>*>(hook.get()))
        for (const auto& s : p->matrices(0))
          for (std::size_t i = 0; i < s.error.size(); ++i) o.residual[static_cast<std::size_t>(s.offset) + i] = s.error[i];
      if (auto* t = dynamic_cast<TopKHook<float>*>(hook.get()))
        for (std::size_t i = 0; i < n; ++i) o.residual[i] = t->residual(0)[i];
      return o;
    });
    double worst = 0, scale = 0, residual_norm = 0;
    for (std::size_t i = 0; i < n; ++i) {
      double truth = 0, kept = outs[0].applied[i];
      for (int step = 0; step < steps; ++step)
        for (int w = 0; w < world; ++w) truth += grad_value(step, w, i);
      for (int w = 0; w < world; ++w) kept += outs[w].residual[i], residual_norm += std::abs(outs[w].residual[i]);
      worst = std::max(worst, std::abs(kept - truth));
      scale = std::max(scale, std::abs(truth));
    }
    CHECK(residual_norm > 1.0);  // compression did leave something behind (the check is not empty)
    CHECK(worst < 1e-5 * steps * world * std::max(scale, 1.0));
  }
}

namespace {

// A user compressor: records which buckets and tensors it sees, then all-reduces and doubles
// the sum (so its effect on training is visible).
class RecordingHook final : public CommHook<float> {
 public:
  void reduce(GradBucketView<float>& bucket, Comm& comm) override {
    seen.push_back(bucket.index);
    for (const GradBucketTensor& t : bucket.tensors) shapes.push_back(t.shape.numel());
    comm.all_reduce(bucket.grad);
    for (float& x : bucket.grad) x *= 2;
  }
  std::string name() const override { return "recording"; }
  std::vector<std::size_t> seen;
  std::vector<std::int64_t> shapes;
};

// The tiny GPT trained for 3 steps over `c` with DataParallel (bucket layout `bucket_size`),
// `accumulation` micro-batches, SGD with `so` (ZeroOptimizer when `zero`), with `hook`
// installed (nullptr: none); its final parameters.
std::vector<float> train_tiny(Comm& c, std::shared_ptr<CommHook<float>> hook, std::size_t bucket_size, int accumulation,
                              int zero, optim::SGDOptions so = dp_bodies::sgd_options()) {
  using namespace dp_bodies;
  DataParallel dp(GPT<float>(tiny_gpt(), model_seed), c,
                  DataParallelOptions{.bucket_size = bucket_size, .first_bucket_size = bucket_size / 4});
  if (hook) dp.buckets().set_comm_hook(hook);
  std::shared_ptr<ZeroOptimizer<optim::SGD<float>>> z;
  std::shared_ptr<optim::SGD<float>> plain;
  if (zero == 2)  // ZeRO-2: the hook runs at every backward (every micro-batch syncs)
    z = std::make_shared<ZeroOptimizer<optim::SGD<float>>>(ZeroStage::gradients,
                                                           std::vector<GradBuckets<float>*>{&dp.buckets()}, so);
  else if (zero == 1)
    z = std::make_shared<ZeroOptimizer<optim::SGD<float>>>(dp, so);
  else
    plain = std::make_shared<optim::SGD<float>>(dp.parameters(), so);
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});
  for (int step = 0; step < 3; ++step) {
    std::vector<TokenBatch> mine;
    std::int64_t valid = 0;
    for (int k = 0; k < accumulation; ++k) {
      mine.push_back(token_batch(step, k, c.rank(), 2));
      valid += mine.back().valid;
    }
    const double scale = dp.loss_scale(valid);
    for (int k = 0; k < accumulation; ++k) {
      auto guard = dp.no_sync(k + 1 < accumulation);
      auto [logits, ctx] = dp.forward(mine[static_cast<std::size_t>(k)].tokens);
      auto [loss, lctx] = ce.forward(logits, mine[static_cast<std::size_t>(k)].targets);
      dp.backward(ce.backward(static_cast<float>(scale), lctx), ctx);
    }
    if (zero) {
      z->step();
      z->zero_grad();
    } else {
      plain->step();
      dp.zero_grad();
    }
  }
  return flatten(dp.parameters());
}

}  // namespace

TEST_CASE("'none' through the hook is plain DataParallel, bitwise (buckets, accumulation, ZeRO-1)") {
  for (std::size_t bucket : {std::size_t{0}, std::size_t{1024}, std::size_t(-1) / 8}) {
    for (bool zero : {false, true}) {
      CAPTURE(bucket);
      CAPTURE(zero);
      auto out = run_ranks(3, [&](Comm& c) {
        return std::make_pair(train_tiny(c, nullptr, bucket, 2, zero),
                              train_tiny(c, std::make_shared<AllReduceHook<float>>(), bucket, 2, zero));
      });
      for (const auto& [plain, hooked] : out) CHECK(plain == hooked);
    }
  }
}

TEST_CASE("A user compressor plugs in: every bucket, in order, with its tensors; its result is what the optimizer sees") {
  // The recording hook doubles the reduced gradient; under plain SGD (no momentum, no decay)
  // that is bitwise the step of twice the learning rate (multiplying by 2 is exact).
  auto out = run_ranks(2, [&](Comm& c) {
    auto hook = std::make_shared<RecordingHook>();
    std::vector<float> doubled = train_tiny(c, hook, 1024, 1, false, {.lr = 0.25});
    std::vector<float> plain_lr2 = train_tiny(c, nullptr, 1024, 1, false, {.lr = 0.5});
    std::vector<float> plain_lr1 = train_tiny(c, nullptr, 1024, 1, false, {.lr = 0.25});
    using namespace dp_bodies;
    DataParallel dp(GPT<float>(tiny_gpt(), model_seed), c, DataParallelOptions{.bucket_size = 1024, .first_bucket_size = 256});
    std::size_t buckets = dp.buckets().buckets().size();
    std::int64_t elements = 0;
    for (const auto& s : dp.buckets().slots()) elements += s.numel;
    return std::make_tuple(hook->seen, hook->shapes, buckets, elements, doubled, plain_lr2, plain_lr1);
  });
  for (const auto& [seen, shapes, buckets, elements, doubled, plain_lr2, plain_lr1] : out) {
    CHECK(buckets > 1);
    REQUIRE(seen.size() == 3 * buckets);
    for (std::size_t i = 0; i < seen.size(); ++i) CHECK(seen[i] == i % buckets);
    CHECK(std::accumulate(shapes.begin(), shapes.end(), std::int64_t{0}) == 3 * elements);
    CHECK(doubled == plain_lr2);
    CHECK(doubled != plain_lr1);
  }
}

TEST_CASE("Compressed DataParallel composes with buckets, accumulation and ZeRO-1, and keeps replicas identical") {
  for (const std::string spec : {"bf16", "powersgd:2", "topk:0.3"}) {
    for (std::size_t bucket : {std::size_t{0}, std::size_t{1024}}) {
      CAPTURE(spec);
      CAPTURE(bucket);
      auto out = run_ranks(3, [&](Comm& c) {
        std::vector<float> plain = train_tiny(c, make_comm_hook<float>(spec), bucket, 2, false);
        std::vector<float> zero = train_tiny(c, make_comm_hook<float>(spec), bucket, 2, true);
        std::vector<float> exact = train_tiny(c, nullptr, bucket, 2, false);
        return std::make_tuple(plain, zero, exact);
      });
      for (const auto& [plain, zero, exact] : out) {
        CHECK(plain == std::get<0>(out[0]));  // replicas identical
        CHECK(zero == plain);                 // ZeRO-1's sharded SGD sees the same reduced gradients
        CHECK(plain != exact);                // the compressor did act
        double worst = 0;
        for (std::size_t i = 0; i < plain.size(); ++i) worst = std::max(worst, std::abs(double(plain[i]) - exact[i]));
        CHECK(worst < (spec == "bf16" ? 0.02 : 1.0));
      }
    }
  }
}

TEST_CASE("A hook under ZeRO-2: bitwise the plain step with the same hook at accumulation 1; at accumulation 2 it compresses each micro-batch") {
  for (const std::string spec : {"none", "bf16", "powersgd:2", "topk:0.3"}) {
    CAPTURE(spec);
    auto out = run_ranks(3, [&](Comm& c) {
      return std::make_tuple(train_tiny(c, make_comm_hook<float>(spec), 1024, 1, 0),
                             train_tiny(c, make_comm_hook<float>(spec), 1024, 1, 2),
                             train_tiny(c, make_comm_hook<float>(spec), 1024, 2, 0),
                             train_tiny(c, make_comm_hook<float>(spec), 1024, 2, 2));
    });
    for (const auto& [plain1, zero2_1, plain2, zero2_2] : out) {
      CHECK(zero2_1 == plain1);                    // one reduction per step: the same compressed gradient
      CHECK(zero2_2 == std::get<3>(out[0]));       // replicas identical
      double worst = 0;
      for (std::size_t i = 0; i < plain2.size(); ++i) worst = std::max(worst, std::abs(double(plain2[i]) - zero2_2[i]));
      if (spec == "none") CHECK(worst < 1e-5);     // two all-reduces summed vs one of the sum: round-off
      if (spec == "powersgd:2") CHECK(worst > 0);  // each micro-batch compressed on its own
    }
  }
}

TEST_CASE("bytes_sent: each hook's ring-model volume; the compressors send 10x less than fp32 at 4 ranks") {
  // A bucket of a (256, 128) matrix and a bias of 128 at 4 ranks: n = 32896 elements.
  constexpr std::int64_t rows = 256, cols = 128, n = rows * cols + cols;
  auto out = run_ranks(4, [&](Comm& c) {
    std::vector<std::int64_t> bytes;
    for (const std::string spec : {"none", "bf16", "powersgd:4", "topk:0.01"}) {
      auto hook = make_comm_hook<float>(spec);
      std::vector<float> g = grads_of(0, c.rank(), n);
      GradBucketView<float> v{.index = 0, .grad = g, .tensors = {{0, Shape{rows, cols}}, {rows * cols, Shape{cols}}}};
      hook->reduce(v, c);
      bytes.push_back(hook->bytes_sent());
    }
    LocalGradientHook<float> local;
    std::vector<float> g = grads_of(0, c.rank(), 8);
    GradBucketView<float> v{.index = 0, .grad = g, .tensors = {{0, Shape{8}}}};
    local.reduce(v, c);
    bytes.push_back(local.bytes_sent());
    bytes.push_back(g[3] == 4 * grad_value(0, c.rank(), 3));
    return bytes;
  });
  const std::vector<std::int64_t>& b = out[0];
  CHECK(b[0] == 2 * 3 * n * 4 / 4);                                      // fp32 ring all-reduce
  CHECK(b[1] == 2 * 3 * ((n + 3) / 4 + ((n + 3) / 4) % 2) * 2);          // 16-bit reduce-scatter + all-gather
  CHECK(b[2] == (2 * 3 * 4 * (4 * (rows + cols) + cols)) / 4);           // P, Q and the bias
  CHECK(b[3] == 3 * static_cast<std::int64_t>(std::ceil(0.01 * n)) * 8);  // (index, value) pairs
  CHECK(b[0] >= 10 * b[2]);
  CHECK(b[0] >= 10 * b[3]);
  CHECK(b[4] == 0);
  CHECK(b[5] == 1);
}
