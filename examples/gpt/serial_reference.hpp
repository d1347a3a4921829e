#pragma once
// --verify: the same training on one rank without any policy (GPT, mean cross-entropy,
// clipping, AdamW or SGD (--optimizer), the same data and schedule), to compare the parallel
// run's losses with.
#include <type_traits>
#include <vector>

#include "gpt/args.hpp"
#include "tessera/core/batch_position.hpp"
#include "tessera/data/text_dataset.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/optim/sgd.hpp"

namespace train_gpt {

// The same training on one rank without any policy: GPT, mean cross-entropy, clipping,
// AdamW (or SGD) with the same groups, schedule, data and dropout masks. Returns the per-step
// losses of `steps` steps.
template <class Inner>
std::vector<double> serial_losses_with(const Args& a, int steps) {
  const data::TextDataset ds(a.data, a.context);
  GPT<float> gpt(a.config(), a.seed);
  ParameterList<float> ps = gpt.parameters();
  Inner opt = [&] {
    if constexpr (std::is_same_v<Inner, optim::SGD<float>>) return Inner(a.sgd_groups(ps));
    else return Inner(a.adamw_groups(ps));
  }();
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  const optim::WarmupCosine lr = a.lr_schedule();
  std::vector<double> losses;
  for (int step = 0; step < steps; ++step) {
    const data::Batch b = ds.batch(data::Split::train, a.seed, step, a.batch, 0, a.batch);
    ps.zero_grad();
    const BatchPositionScope at(BatchPosition{.step = static_cast<std::uint64_t>(step), .first_row = 0});  // dropout masks
    auto [logits, ctx] = gpt.forward(b.inputs);
    auto [loss, lctx] = ce.forward(logits, b.targets);
    gpt.backward(ce.backward(1.0f, lctx), ctx);
    if (a.clip > 0) optim::clip_grad_norm(ps, a.clip);
    opt.set_lr(lr(step));
    opt.step();
    losses.push_back(static_cast<double>(loss));
  }
  return losses;
}

// serial_losses_with the optimizer --optimizer names.
inline std::vector<double> serial_losses(const Args& a, int steps) {
  return a.optimizer == "sgd" ? serial_losses_with<optim::SGD<float>>(a, steps)
                              : serial_losses_with<optim::AdamW<float>>(a, steps);
}

}  // namespace train_gpt
