// Forward + backward of one GPT-2 block (fp32, d_model 256, 4 heads, seq 128, batch 8) on one
// core, reported as achieved GFLOP/s beside the raw sgemm GFLOP/s measured in the same run,
// interleaved round by round so that machine noise hits both alike. Target: the block reaches
// at least 50% of the sgemm rate.
//
// Run: OPENBLAS_NUM_THREADS=1 build/bench/nn/gpt_block_bench   (or: meson test -C build --benchmark)
//
// FLOPs counted are those of the GEMMs the block executes (2 m n k each): forward
// 2 (B T) 12 d^2 for the four projections plus 4 B T^2 d for q k^T and probs v over the full
// T x T square, and twice that in backward. Element-wise work (LayerNorm, GELU, softmax,
// residual adds) is not counted but is timed.
//
// The last timed step's result is checked against the same block in double precision (the fp32
// weights copied in): the output, the input gradient and every parameter gradient within fp32
// round-off, so that a block that skipped work cannot pass as a fast one.
//
// Exit status: 0 when the check passes and the target is met, 1 when the target is missed,
// 2 when the check fails.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "tessera/core/gemm.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/testing/compare.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// max |a - b| / max |b| over all elements (+inf on a non-finite value or a shape mismatch).
template <class A, class B>
double error(const tessera::Tensor<A>& a, const tessera::Tensor<B>& b) {
  if (a.shape() != b.shape()) return tessera::testing::infinite_error;
  const tessera::Tensor<A> ac = a.contiguous();
  const tessera::Tensor<B> bc = b.contiguous();
  return tessera::testing::max_rel_error(std::span<const A>(ac.data(), static_cast<std::size_t>(ac.numel())),
                                         std::span<const B>(bc.data(), static_cast<std::size_t>(bc.numel())));
}

// A copy of t in double.
tessera::Tensor<double> to_double(const tessera::Tensor<float>& t) {
  const tessera::Tensor<float> c = t.contiguous();
  tessera::Tensor<double> d = tessera::Tensor<double>::empty(t.shape());
  for (std::int64_t i = 0; i < c.numel(); ++i) d.data()[i] = c.data()[i];
  return d;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  constexpr std::int64_t B = 8, T = 128, d = 256, H = 4;
  constexpr std::int64_t S = 1024;  // reference sgemm: S x S x S
  constexpr int warmup = 2, rounds = 15;
  constexpr double target = 0.5;
  // fp32 against double on the same weights: about 1e-6 of the largest value; skipped work is O(1).
  constexpr double tolerance = 1e-5;

  const char* threads = std::getenv("OPENBLAS_NUM_THREADS");
  if (threads == nullptr || std::strcmp(threads, "1") != 0)
    std::printf("warning: OPENBLAS_NUM_THREADS is %s, not 1: the figures are not single-core\n",
                threads ? threads : "unset");

  tessera::nn::Block<float> block(d, H, tessera::nn::LayerInit{.prefix = "h.0", .seed = 1, .n_layer = 1});
  const tessera::Tensor<float> x = tessera::Tensor<float>::empty(tessera::Shape{B, T, d});
  const tessera::Tensor<float> dy = tessera::Tensor<float>::empty(tessera::Shape{B, T, d});
  tessera::fill_normal(x, 2, "x", 1.0);
  tessera::fill_normal(dy, 3, "dy", 1.0);

  const tessera::Tensor<float> a = tessera::Tensor<float>::empty(tessera::Shape{S, S});
  const tessera::Tensor<float> b = tessera::Tensor<float>::empty(tessera::Shape{S, S});
  const tessera::Tensor<float> c = tessera::Tensor<float>::empty(tessera::Shape{S, S});
  tessera::fill_normal(a, 4, "a", 1.0);
  tessera::fill_normal(b, 5, "b", 1.0);

  const double m = static_cast<double>(B * T);
  const double block_flop = 3.0 * (2.0 * m * 12.0 * d * d + 4.0 * B * T * T * d);
  const double sgemm_flop = 2.0 * S * S * S;

  std::vector<double> t_sgemm, t_fwd, t_bwd, t_step;
  tessera::Tensor<float> last_y, last_dx;  // the last step's, for the check
  for (int r = 0; r < warmup + rounds; ++r) {
    auto t0 = Clock::now();
    tessera::gemm<float>(tessera::Transpose::no, tessera::Transpose::no, S, S, S, 1.0f, a.data(), S, b.data(), S,
                         0.0f, c.data(), S);
    const double ts = seconds_since(t0);

    block.parameters().zero_grad();
    t0 = Clock::now();
    auto [y, ctx] = block.forward(x);
    const double tf = seconds_since(t0);
    const tessera::Tensor<float> dx = block.backward(dy, ctx);
    const double tb = seconds_since(t0) - tf;
    last_y = y;
    last_dx = dx;
    if (r < warmup) continue;
    t_sgemm.push_back(ts);
    t_fwd.push_back(tf);
    t_bwd.push_back(tb);
    t_step.push_back(tf + tb);
  }

  const double sgemm_rate = sgemm_flop / median(t_sgemm) / 1e9;
  const double block_rate = block_flop / median(t_step) / 1e9;
  const double ratio = block_rate / sgemm_rate;
  std::printf("gpt_block_bench: one GPT-2 block, fp32, d_model %ld, %ld heads, seq %ld, batch %ld; "
              "median of %d interleaved rounds\n",
              static_cast<long>(d), static_cast<long>(H), static_cast<long>(T), static_cast<long>(B), rounds);
  std::printf("%-34s %10s %10s %10s\n", "what", "ms", "GFLOP", "GFLOP/s");
  std::printf("%-34s %10.2f %10.3f %10.1f\n", "sgemm 1024 x 1024 x 1024", 1e3 * median(t_sgemm), sgemm_flop / 1e9,
              sgemm_rate);
  std::printf("%-34s %10.2f %10.3f %10.1f\n", "block forward", 1e3 * median(t_fwd), block_flop / 3 / 1e9,
              block_flop / 3 / median(t_fwd) / 1e9);
  std::printf("%-34s %10.2f %10.3f %10.1f\n", "block backward", 1e3 * median(t_bwd), block_flop * 2 / 3 / 1e9,
              block_flop * 2 / 3 / median(t_bwd) / 1e9);
  std::printf("%-34s %10.2f %10.3f %10.1f\n", "block forward + backward", 1e3 * median(t_step), block_flop / 1e9,
              block_rate);

  // The check: the last step (output, input gradient, parameter gradients) against the double block.
  tessera::nn::Block<double> reference(d, H, tessera::nn::LayerInit{.prefix = "h.0", .seed = 1, .n_layer = 1});
  const tessera::ParameterList<float> params = block.parameters();
  const tessera::ParameterList<double> ref_params = reference.parameters();
  tessera::testing::WorstError worst;
  std::string worst_what = "parameter count";
  if (params.size() != ref_params.size()) worst.add(tessera::testing::infinite_error);
  for (std::size_t i = 0; i < params.size() && i < ref_params.size(); ++i)
    ref_params[i].value = to_double(params[i].value);
  auto [yd, ctxd] = reference.forward(to_double(x));
  const tessera::Tensor<double> dxd = reference.backward(to_double(dy), ctxd);
  auto record = [&](const std::string& what, double e) {
    if (!(e <= worst.value())) worst_what = what;
    worst.add(e);
  };
  record("output", error(last_y, yd));
  record("input gradient", error(last_dx, dxd));
  for (std::size_t i = 0; i < params.size() && i < ref_params.size(); ++i)
    record(params[i].name + " grad", error(params[i].grad, ref_params[i].grad));
  const bool check_ok = worst.value() <= tolerance;
  std::printf("check: the last step against the block in double, worst relative error %.2e (in %s; tolerance %.0e): %s\n",
              worst.value(), worst_what.c_str(), tolerance, check_ok ? "ok" : "FAILED");
  const bool met = ratio >= target;
  std::printf("block / sgemm = %.2f (target >= %.2f: %s)\n", ratio, target, met ? "met" : "NOT met");
  if (!check_ok) return 2;
  return met ? 0 : 1;
}
