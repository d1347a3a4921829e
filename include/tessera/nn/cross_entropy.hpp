#pragma once
/// @file
/// CrossEntropy: softmax cross-entropy over the last dim, with an ignore index and sum or mean
/// reduction (PyTorch's `cross_entropy` semantics).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::nn {

/// How per-token losses are combined.
enum class Reduction {
  sum,   ///< the sum over valid (not ignored) targets
  mean,  ///< the sum divided by the number of valid targets (0 when there are none)
};

/// Options of CrossEntropy.
struct CrossEntropyOptions {
  std::int64_t ignore_index = -100;      ///< targets equal to it contribute no loss and no gradient
  Reduction reduction = Reduction::mean;  ///< sum or mean over valid targets
};

/// loss = reduce over rows r with a valid target of (logsumexp(logits[r]) - logits[r, target[r]]).
///
/// Data-parallel and micro-batched training that must normalize by the global token count
/// uses Reduction::sum and divides by the global sum of `count_valid` (or by the sum of
/// `Context::num_valid`), so the normalization is applied exactly once.
///
/// logits: (..., V); targets: logits' shape without the last dim, int32 -> a scalar loss.
/// Not a Layer: it takes two inputs and ends the graph; backward starts from dloss.
template <std::floating_point T>
class CrossEntropy {
 public:
  /// What backward needs.
  struct Context {
    Tensor<T> probs;                ///< (..., V) softmax of the logits
    Tensor<std::int32_t> targets;   ///< the targets, contiguous
    std::int64_t num_valid = 0;     ///< targets not equal to ignore_index
    T scale = 0;                    ///< 1 for sum, 1 / num_valid for mean (0 if none)
  };

  /// A loss with the given options.
  explicit CrossEntropy(const CrossEntropyOptions& options = {}) : options_(options) {}

  /// The loss and its context. Throws tessera::Error naming both shapes when targets do not
  /// match the logits, and naming the target and V when a valid target is outside [0, V).
  ForwardResult<T, Context> forward(const Tensor<T>& logits, const Tensor<std::int32_t>& targets) const {
    TESSERA_EXPECTS(logits.rank() >= 1 && targets.rank() == logits.rank() - 1 &&
                        targets.numel() == logits.shape().rows(),
                    "CrossEntropy: targets of shape ", targets.shape(), " do not match logits of shape ",
                    logits.shape());
    for (int d = 0; d < targets.rank(); ++d)
      TESSERA_EXPECTS(targets.size(d) == logits.size(d), "CrossEntropy: targets of shape ", targets.shape(),
                      " do not match logits of shape ", logits.shape());
    const Tensor<T> x = logits.contiguous();
    const Tensor<std::int32_t> tg = targets.contiguous();
    const std::int64_t n = x.shape().rows(), v = x.size(-1);
    Tensor<T> probs = Tensor<T>::empty(x.shape());
    double total = 0;  // summed in double: the order and precision do not depend on T
    std::int64_t valid = 0;
    for (std::int64_t r = 0; r < n; ++r) {
      const T* xr = x.data() + r * v;
      T* pr = probs.data() + r * v;
      const T mx = *std::max_element(xr, xr + v);
      double sum = 0;
      for (std::int64_t j = 0; j < v; ++j) sum += (pr[j] = std::exp(xr[j] - mx));
      const T inv = static_cast<T>(1.0 / sum);
      for (std::int64_t j = 0; j < v; ++j) pr[j] *= inv;
      const std::int64_t t = tg.data()[r];
      if (t == options_.ignore_index) continue;
      TESSERA_EXPECTS(t >= 0 && t < v, "CrossEntropy: target ", t, " at row ", r,
                      " is outside the vocabulary of size ", v, " (and is not ignore_index ",
                      options_.ignore_index, ")");
      total += std::log(sum) + static_cast<double>(mx) - static_cast<double>(xr[t]);
      ++valid;
    }
    const T scale = options_.reduction == Reduction::sum ? T{1} : (valid > 0 ? T{1} / static_cast<T>(valid) : T{0});
    const T loss = options_.reduction == Reduction::sum ? static_cast<T>(total)
                                                        : (valid > 0 ? static_cast<T>(total / static_cast<double>(valid)) : T{0});
    return {loss, Context{std::move(probs), tg, valid, scale}};
  }

  /// dlogits = dloss * scale * (softmax - onehot(target)) on valid rows, 0 on ignored rows.
  Tensor<T> backward(T dloss, const Context& ctx) const {
    const std::int64_t n = ctx.probs.shape().rows(), v = ctx.probs.size(-1);
    Tensor<T> dx = Tensor<T>::empty(ctx.probs.shape());
    const T s = dloss * ctx.scale;
    for (std::int64_t r = 0; r < n; ++r) {
      const std::int64_t t = ctx.targets.data()[r];
      T* dr = dx.data() + r * v;
      if (t == options_.ignore_index) {
        std::fill(dr, dr + v, T{0});
        continue;
      }
      const T* pr = ctx.probs.data() + r * v;
      for (std::int64_t j = 0; j < v; ++j) dr[j] = s * pr[j];
      dr[t] -= s;
    }
    return dx;
  }

  /// Number of targets not equal to ignore_index.
  std::int64_t count_valid(const Tensor<std::int32_t>& targets) const {
    std::int64_t c = 0;
    const Tensor<std::int32_t> tg = targets.contiguous();
    for (std::int64_t i = 0; i < tg.numel(); ++i) c += tg.data()[i] != options_.ignore_index;
    return c;
  }
  /// The options.
  const CrossEntropyOptions& options() const noexcept { return options_; }

 private:
  CrossEntropyOptions options_;
};

}  // namespace tessera::nn
