// Optimizers, gradient clipping and the learning-rate schedule. Expected values come from
// PyTorch 1.13 (torch.optim.SGD, torch.optim.AdamW, torch.nn.utils.clip_grad_norm_) run in
// fp64 on the same inputs; the script is in the comment of each case.

#include <doctest/doctest.h>

#include <cmath>
#include <numbers>
#include <vector>

#include "nn_test_util.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/optim/warmup_cosine.hpp"

using tessera::Parameter;
using tessera::ParameterList;
using tessera::Shape;
using tessera::Tensor;

namespace {
// Three steps on p0 = [0.5, -1.25, 2, 0] with the gradient at step s (0-based)
// g = p^3 - 0.1 (s + 1) + sin([0, 1, 2, 3]), i.e. in PyTorch:
//   for s in range(3): p.grad = p.detach()**3 - (s+1)*0.1 + torch.sin(torch.arange(4.)); opt.step()
template <class Opt, class Options>
std::vector<double> three_steps(const Options& options) {
  Parameter<double> p("p", Tensor<double>::from(Shape{4}, {0.5, -1.25, 2.0, 0.0}));
  Opt opt(ParameterList<double>{&p}, options);
  for (int s = 0; s < 3; ++s) {
    for (int i = 0; i < 4; ++i) {
      const double v = p.value(i);
      p.grad(i) = v * v * v - 0.1 * (s + 1) + std::sin(static_cast<double>(i));
    }
    opt.step();
  }
  return {p.value(0), p.value(1), p.value(2), p.value(3)};
}
}  // namespace

TEST_CASE("SGD: three momentum steps with weight decay equal torch.optim.SGD") {
  // torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
  const std::vector<double> want{0.522484264568718, -0.736522684761573, -0.855653027988699, 0.0159414228821895};
  const std::vector<double> got =
      three_steps<tessera::optim::SGD<double>>(tessera::optim::SGDOptions{.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01});
  for (int i = 0; i < 4; ++i) CHECK(got[static_cast<std::size_t>(i)] == doctest::Approx(want[static_cast<std::size_t>(i)]).epsilon(1e-13));
}

TEST_CASE("SGD: without momentum one step is p -= lr * g") {
  Parameter<float> p("p", Tensor<float>::from(Shape{2}, {1.0f, -2.0f}));
  p.grad.copy_from(Tensor<float>::from(Shape{2}, {0.5f, 4.0f}));
  tessera::optim::SGD<float> opt({&p}, {.lr = 0.25});
  opt.step();
  CHECK(p.value(0) == 1.0f - 0.25f * 0.5f);
  CHECK(p.value(1) == -2.0f - 0.25f * 4.0f);
  opt.zero_grad();
  CHECK(p.grad(1) == 0.0f);
}

TEST_CASE("AdamW: three steps with bias correction and decoupled weight decay equal torch.optim.AdamW") {
  // torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
  const std::vector<double> want{0.526951507062614, -0.925393095118828, 1.64667833235459, -0.00941494071502326};
  const std::vector<double> got = three_steps<tessera::optim::AdamW<double>>(
      tessera::optim::AdamWOptions{.lr = 0.1, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.1});
  for (int i = 0; i < 4; ++i) CHECK(got[static_cast<std::size_t>(i)] == doctest::Approx(want[static_cast<std::size_t>(i)]).epsilon(1e-13));
}

TEST_CASE("AdamW: an optimizer per shard (strided slices) updates exactly as one over the whole tensor") {
  // ZeRO-1 runs the same optimizer on slices: the result must be bitwise the unsharded one.
  const Tensor<float> init = Tensor<float>::from(Shape{2, 4}, {0.1f, -0.2f, 0.3f, 0.4f, -0.5f, 0.6f, 0.7f, -0.8f});
  Parameter<float> whole("w", init.clone());
  Parameter<float> sharded("w", init.clone());
  // Column shards: strided views of the value and grad.
  Parameter<float> left("w", sharded.value.slice(1, 0, 3), sharded.grad.slice(1, 0, 3), tessera::ParamLayout::shard(1));
  Parameter<float> right("w", sharded.value.slice(1, 3, 4), sharded.grad.slice(1, 3, 4), tessera::ParamLayout::shard(1));
  tessera::optim::AdamW<float> a({&whole}, {.lr = 0.05});
  tessera::optim::AdamW<float> b0({&left}, {.lr = 0.05}), b1({&right}, {.lr = 0.05});
  for (int s = 0; s < 4; ++s) {
    for (std::int64_t i = 0; i < 8; ++i) {
      const float g = std::sin(static_cast<float>(i * (s + 1)));
      whole.grad.data()[i] = g;
      sharded.grad.data()[i] = g;
    }
    a.step();
    b0.step();
    b1.step();
  }
  for (std::int64_t i = 0; i < 8; ++i) CHECK(whole.value.data()[i] == sharded.value.data()[i]);
  CHECK(whole.value.data()[0] != init.data()[0]);
}

TEST_CASE("clip_grad_norm: returns the global norm and scales grads as torch.nn.utils.clip_grad_norm_") {
  // grads [3, 4] and [[12]]: norm 13; clip_grad_norm_(ps, 6.5) -> grads * 6.5 / (13 + 1e-6)
  Parameter<double> a("a", Tensor<double>(Shape{2})), b("b", Tensor<double>(Shape{1, 1}));
  a.grad.copy_from(Tensor<double>::from(Shape{2}, {3, 4}));
  b.grad.fill(12);
  const ParameterList<double> ps{&a, &b};
  CHECK(tessera::optim::grad_norm_squared(ps) == 169.0);
  CHECK(tessera::optim::clip_grad_norm(ps, 6.5) == 13.0);
  CHECK(a.grad(0) == doctest::Approx(1.49999988461539).epsilon(1e-13));
  CHECK(a.grad(1) == doctest::Approx(1.99999984615386).epsilon(1e-13));
  CHECK(b.grad(0, 0) == doctest::Approx(5.99999953846157).epsilon(1e-13));
  // Below the limit nothing changes.
  CHECK(tessera::optim::clip_grad_norm(ps, 100.0) == doctest::Approx(6.5).epsilon(1e-6));
  CHECK(a.grad(0) == doctest::Approx(1.49999988461539).epsilon(1e-13));
}

TEST_CASE("WarmupCosine: linear warmup to max_lr, cosine to min_lr at total_steps, min_lr after") {
  const tessera::optim::WarmupCosine lr{.max_lr = 1.0, .min_lr = 0.1, .warmup_steps = 4, .total_steps = 14};
  CHECK(lr(0) == 0.25);
  CHECK(lr(3) == 1.0);
  CHECK(lr(4) == 1.0);                                   // start of the decay: cos(0)
  CHECK(lr(9) == doctest::Approx(0.55).epsilon(1e-15));  // half way: (1 + cos(pi/2)) / 2
  CHECK(lr(14) == 0.1);
  CHECK(lr(100) == 0.1);
  CHECK(lr(6) == doctest::Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(std::numbers::pi * 0.2))).epsilon(1e-15));
  CHECK(nn_test::contains(nn_test::error_of([] {
                            (void)tessera::optim::WarmupCosine{.warmup_steps = 5, .total_steps = 3}(0);
                          }),
                          "warmup_steps=5"));
}
