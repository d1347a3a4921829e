#pragma once
// What the device training tests share (test_device_tensor_parallel.cu, test_device_pipeline.cu):
// the model and optimizer settings, a step's token batches, the clipping they train with, a
// parameter list flattened, and the norm-wise difference their checks use. Host code.
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/testing/compare.hpp"

namespace device_test {

// The small GPT both tests train: 2 blocks (4 pipeline layers: pp 4 puts the embedding alone on
// stage 0 and the head alone on stage 3), 4 heads of 8 (tp 2 and 4 divide them), and T 13, not a
// multiple of any tile; the same with embedding dropout (a rank's mask must be its rows' part of
// the whole batch's). kSteps batches of kRows x kT tokens; AdamW with weight decay.
inline const tessera::GPTConfig small_cfg{.vocab_size = 67, .n_positions = 16, .n_layer = 2, .n_head = 4, .d_model = 32};
inline const tessera::GPTConfig drop_cfg{.vocab_size = 67, .n_positions = 16, .n_layer = 2, .n_head = 4, .d_model = 32,
                                         .embd_pdrop = 0.2};
inline constexpr std::int64_t kRows = 8, kT = 13;
inline constexpr int kSteps = 6;
inline const tessera::optim::AdamWOptions adamw_opts{3e-3, 0.9, 0.95, 1e-8, 0.1};

// Every step's tokens and targets, (rows, T) int32 each.
struct Data {
  std::vector<tessera::Tensor<std::int32_t>> x, y;
};

// `steps` batches of random tokens of `vocab` drawn from `seed`, each target (token x mul + add)
// mod vocab (a rule the model can learn, so the loss falls).
inline Data make_data(std::int64_t vocab, unsigned seed, int steps, std::int64_t rows, std::int64_t T, int mul,
                      int add) {
  std::mt19937 rng(seed);
  Data d;
  for (int s = 0; s < steps; ++s) {
    tessera::Tensor<std::int32_t> x(tessera::Shape{rows, T}), y(tessera::Shape{rows, T});
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t t = 0; t < T; ++t) {
        const auto cur = static_cast<std::int32_t>(rng() % vocab);
        x(i, t) = cur;
        y(i, t) = static_cast<std::int32_t>((cur * mul + add) % vocab);
      }
    d.x.push_back(x);
    d.y.push_back(y);
  }
  return d;
}

// Clipping at 0.1: below these models' gradient norms (the tests check it), so every step clips.
inline constexpr double kClip = 0.1;
inline float clip_scale(double norm) { return norm > kClip ? static_cast<float>(kClip / (norm + 1e-6)) : 1.f; }

// Every parameter's values end to end, in the list's order.
inline std::vector<float> flatten(const tessera::ParameterList<float>& ps) {
  std::vector<float> out;
  for (tessera::Parameter<float>& p : ps) {
    const tessera::Tensor<float> v = p.value.contiguous();
    out.insert(out.end(), v.data(), v.data() + v.numel());
  }
  return out;
}

// Norm-wise relative difference (testing::norm_rel_error: +infinity on a NaN, which fails every
// comparison).
inline double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  return tessera::testing::norm_rel_error(std::span<const float>(a), std::span<const float>(b));
}

}  // namespace device_test
