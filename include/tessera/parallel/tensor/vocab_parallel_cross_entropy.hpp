#pragma once
/// @file
/// VocabParallelCrossEntropy: softmax cross-entropy over logits split by vocabulary over the tp
/// ranks, without gathering them (Megatron-LM's vocab_parallel_cross_entropy), with label
/// smoothing over the global vocabulary.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/parallel/tensor/detail/layout_errors.hpp"
#include "tessera/parallel/tensor/layouts.hpp"

namespace tessera {

/// Options of VocabParallelCrossEntropy (PyTorch's cross_entropy semantics).
struct VocabParallelCrossEntropyOptions {
  std::int64_t ignore_index = -100;           ///< targets equal to it give no loss and no gradient
  nn::Reduction reduction = nn::Reduction::mean;  ///< sum or mean over valid targets
  /// epsilon of label smoothing: the target distribution is (1 - eps) onehot + eps / V over the
  /// global vocabulary of V entries (not the local shard: CASES C11).
  double label_smoothing = 0.0;
};

/// loss = reduce over rows r with a valid target t of
/// lse_r - (1 - eps) x[r, t] - eps mean_j x[r, j], with lse_r = log sum_j exp x[r, j] and j over
/// the global vocabulary, computed from vocab-split logits: rank q holds columns
/// [q V_pad / tp, (q + 1) V_pad / tp) of the padded vocabulary (VocabParallelEmbedding's split);
/// columns at or past vocab_size are padding and are masked out.
///
/// Forward all-reduces over `tp` the row maxima (max), the target logits (sum; only the owning
/// rank contributes) and the sums of exponentials (sum; with label smoothing, the sums of the
/// logits too, in the same call): 3 all-reduces of one value per row. Backward is local:
/// dlogits = dloss * scale * (softmax - (1 - eps) onehot - eps / V) on this rank's columns, 0 on
/// padding and ignored rows. The loss is the same on every rank. Shoeybi et al. 2019, sec. 3.
///
/// logits: (..., V_pad / tp), Shard<-1>; targets: the logits' shape without the last dim, int32,
/// the same on every rank -> a scalar. Collective over `tp` in forward: every rank calls it with
/// the same shapes. Passing gathered (Replicate) logits fails to compile with one sentence.
template <std::floating_point T>
class VocabParallelCrossEntropy {
 public:
  /// What backward needs.
  struct Context {
    Tensor<T> probs;               ///< (..., V_pad / tp): global softmax on this rank's columns, 0 on padding
    Tensor<std::int32_t> targets;  ///< contiguous
    std::int64_t num_valid = 0;    ///< targets not equal to ignore_index
    T scale = 0;                   ///< 1 for sum, 1 / num_valid for mean (0 if none)
  };

  /// A loss over the global vocabulary of `vocab_size` entries, split over the ranks of `tp`.
  /// Throws tessera::Error when vocab_size is not positive or label_smoothing is outside [0, 1].
  VocabParallelCrossEntropy(Comm tp, std::int64_t vocab_size, const VocabParallelCrossEntropyOptions& options = {})
      : tp_(std::move(tp)), vocab_size_(vocab_size), options_(options) {
    TESSERA_EXPECTS(vocab_size > 0, "VocabParallelCrossEntropy: vocab_size ", vocab_size, " must be positive");
    TESSERA_EXPECTS(options.label_smoothing >= 0 && options.label_smoothing <= 1,
                    "VocabParallelCrossEntropy: label_smoothing ", options.label_smoothing, " is outside [0, 1]");
  }

  /// The loss (the same on every rank) and the context. Collective over tp. Throws
  /// tessera::Error naming the shapes when the targets do not match the logits or the local
  /// width is not ceil(vocab_size / tp), and naming the target when a valid one is outside
  /// [0, vocab_size).
  template <Layout L>
  ForwardResult<T, Context> forward(const Activation<Tensor<T>, L>& logits, const Tensor<std::int32_t>& targets) {
    constexpr detail::tp::LayoutError error =
        std::same_as<L, Shard<-1>> ? detail::tp::LayoutError::none : detail::tp::LayoutError::gathered_logits;
    if constexpr (error != detail::tp::LayoutError::none) {
      static_assert(detail::tp::check_layout_error<error>());
      (void)logits;
      (void)targets;
      return {};
    } else {
      return forward_local(logits.value, targets);
    }
  }

  /// dlogits on this rank's columns (no communication).
  Activation<Tensor<T>, Shard<-1>> backward(T dloss, const Context& ctx) const {
    const std::int64_t n = ctx.probs.shape().rows(), vl = ctx.probs.size(-1), nv = valid_columns(vl);
    const std::int64_t start = vocab_start(vl);
    const double eps = options_.label_smoothing;
    const T s = dloss * ctx.scale;
    const T smooth = static_cast<T>(eps / static_cast<double>(vocab_size_));
    const T hit = static_cast<T>(1.0 - eps);
    Tensor<T> dx = Tensor<T>::empty(ctx.probs.shape());
    for (std::int64_t r = 0; r < n; ++r) {
      T* dr = dx.data() + r * vl;
      const std::int64_t t = ctx.targets.data()[r];
      if (t == options_.ignore_index) {
        std::fill(dr, dr + vl, T{0});
        continue;
      }
      const T* pr = ctx.probs.data() + r * vl;
      for (std::int64_t j = 0; j < nv; ++j) dr[j] = s * (pr[j] - smooth);
      std::fill(dr + nv, dr + vl, T{0});
      if (t >= start && t < start + nv) dr[t - start] -= s * hit;
    }
    return {std::move(dx)};
  }

  /// Number of targets not equal to ignore_index.
  std::int64_t count_valid(const Tensor<std::int32_t>& targets) const {
    const Tensor<std::int32_t> tg = targets.contiguous();
    std::int64_t c = 0;
    for (std::int64_t i = 0; i < tg.numel(); ++i) c += tg.data()[i] != options_.ignore_index;
    return c;
  }
  /// The global vocabulary size (without padding).
  std::int64_t vocab_size() const noexcept { return vocab_size_; }
  /// The options.
  const VocabParallelCrossEntropyOptions& options() const noexcept { return options_; }
  /// The tp communicator.
  Comm& comm() noexcept { return tp_; }

 private:
  std::int64_t vocab_start(std::int64_t local_width) const { return tp_.rank() * local_width; }
  std::int64_t valid_columns(std::int64_t local_width) const {
    return std::clamp<std::int64_t>(vocab_size_ - vocab_start(local_width), 0, local_width);
  }

  ForwardResult<T, Context> forward_local(const Tensor<T>& logits, const Tensor<std::int32_t>& targets) {
    TESSERA_EXPECTS(logits.rank() >= 1 && targets.rank() == logits.rank() - 1 &&
                        targets.numel() == logits.shape().rows(),
                    "VocabParallelCrossEntropy: targets of shape ", targets.shape(),
                    " do not match logits of shape ", logits.shape());
    for (int d = 0; d < targets.rank(); ++d)
      TESSERA_EXPECTS(targets.size(d) == logits.size(d), "VocabParallelCrossEntropy: targets of shape ",
                      targets.shape(), " do not match logits of shape ", logits.shape());
    const int size = tp_.size();
    const std::int64_t vl = logits.size(-1);
    TESSERA_EXPECTS(vl == (vocab_size_ + size - 1) / size, "VocabParallelCrossEntropy: local logits of width ", vl,
                    " are not a 1/", size, " shard of the vocabulary of ", vocab_size_, " padded to ",
                    (vocab_size_ + size - 1) / size * size);
    const Tensor<T> x = logits.contiguous();
    const Tensor<std::int32_t> tg = targets.contiguous();
    const std::int64_t n = x.shape().rows(), nv = valid_columns(vl), start = vocab_start(vl);
    const bool smoothing = options_.label_smoothing > 0;

    // 1. Row maxima over the global vocabulary.
    Tensor<T> mx = Tensor<T>::empty(Shape{n});
    for (std::int64_t r = 0; r < n; ++r) {
      const T* xr = x.data() + r * vl;
      mx.data()[r] = nv > 0 ? *std::max_element(xr, xr + nv) : std::numeric_limits<T>::lowest();
    }
    tp_.all_reduce(mx.span(), ReduceOp::max);

    // 2. Target logits: only the rank owning the target contributes.
    Tensor<T> pred(Shape{n});
    std::int64_t valid = 0;
    for (std::int64_t r = 0; r < n; ++r) {
      const std::int64_t t = tg.data()[r];
      if (t == options_.ignore_index) continue;
      TESSERA_EXPECTS(t >= 0 && t < vocab_size_, "VocabParallelCrossEntropy: target ", t, " at row ", r,
                      " is outside the vocabulary of size ", vocab_size_, " (and is not ignore_index ",
                      options_.ignore_index, ")");
      ++valid;
      if (t >= start && t < start + nv) pred.data()[r] = x.data()[r * vl + (t - start)];
    }
    tp_.all_reduce(pred.span(), ReduceOp::sum);

    // 3. Sums of exponentials (and of logits, for label smoothing), in double.
    Tensor<T> probs = Tensor<T>::empty(x.shape());
    std::vector<double> sums(static_cast<std::size_t>(smoothing ? 2 * n : n), 0.0);
    for (std::int64_t r = 0; r < n; ++r) {
      const T* xr = x.data() + r * vl;
      T* pr = probs.data() + r * vl;
      const T m = mx.data()[r];
      double se = 0, sx = 0;
      for (std::int64_t j = 0; j < nv; ++j) {
        se += (pr[j] = std::exp(xr[j] - m));
        sx += static_cast<double>(xr[j]);
      }
      std::fill(pr + nv, pr + vl, T{0});
      sums[static_cast<std::size_t>(r)] = se;
      if (smoothing) sums[static_cast<std::size_t>(n + r)] = sx;
    }
    tp_.all_reduce(sums, ReduceOp::sum);

    const double eps = options_.label_smoothing;
    double total = 0;
    for (std::int64_t r = 0; r < n; ++r) {
      const double se = sums[static_cast<std::size_t>(r)];
      const T inv = static_cast<T>(1.0 / se);
      T* pr = probs.data() + r * vl;
      for (std::int64_t j = 0; j < nv; ++j) pr[j] *= inv;
      if (tg.data()[r] == options_.ignore_index) continue;
      const double lse = std::log(se) + static_cast<double>(mx.data()[r]);
      const double nll = lse - static_cast<double>(pred.data()[r]);
      if (smoothing) {
        const double mean_x = sums[static_cast<std::size_t>(n + r)] / static_cast<double>(vocab_size_);
        total += (1 - eps) * nll + eps * (lse - mean_x);
      } else {
        total += nll;
      }
    }
    const bool mean = options_.reduction == nn::Reduction::mean;
    const T scale = !mean ? T{1} : (valid > 0 ? T{1} / static_cast<T>(valid) : T{0});
    const T loss = !mean ? static_cast<T>(total) : (valid > 0 ? static_cast<T>(total / static_cast<double>(valid)) : T{0});
    return {loss, Context{std::move(probs), tg, valid, scale}};
  }

  Comm tp_;
  std::int64_t vocab_size_;
  VocabParallelCrossEntropyOptions options_;
};

}  // namespace tessera
