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

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "tessera/core/gemm.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/block.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  constexpr std::int64_t B = 8, T = 128, d = 256, H = 4;
  constexpr std::int64_t S = 1024;  // reference sgemm: S x S x S
  constexpr int warmup = 2, rounds = 15;

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
  std::printf("block / sgemm = %.2f (target >= 0.50: %s)\n", ratio, ratio >= 0.5 ? "met" : "NOT met");
  return 0;
}
