#pragma once
/// @file
/// PipelineLoss: the loss function a pipeline applies on its last stage, with its type erased.
/// It reduces by sum; the pipeline divides once by the count over the whole batch.

#include <concepts>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/parallel/pipeline/pipeline_stage.hpp"

namespace tessera {

namespace detail {
/// The context type of loss L's forward on (Tensor<T>, Target). An alias rather than a
/// parameter type spelled inside the concept: nvcc 13's front end crashes on the latter.
template <class L, class T, class Target>
using LossContext = typename std::remove_cvref_t<decltype(std::declval<const L&>().forward(
    std::declval<const Tensor<T>&>(), std::declval<const Target&>()))>::Context;
}  // namespace detail

/// What a pipeline's loss must offer, for output Tensor<T> and targets `Target`:
/// - `forward(output, target)` returns ForwardResult<T, Context> holding the loss **summed**
///   over the micro-batch (not averaged);
/// - `backward(dloss, ctx)` returns the gradient of the output (dloss times d(sum)/d(output));
/// - `count_valid(target)` returns how many units the sum runs over (valid tokens for
///   cross-entropy), so that the pipeline can divide by the count over the whole batch once.
/// nn::CrossEntropy with `.reduction = nn::Reduction::sum` models it.
template <class L, class T, class Target>
concept PipelineLossFunction = requires(const L& l, const Tensor<T>& y, const Target& t) {
  typename std::remove_cvref_t<decltype(l.forward(y, t))>::Context;
  { l.forward(y, t).output } -> std::convertible_to<T>;
  { l.count_valid(t) } -> std::convertible_to<std::int64_t>;
} && requires(const L& l, T dloss, detail::LossContext<L, T, Target>& c) {
  { l.backward(dloss, c) } -> std::same_as<Tensor<T>>;
};

/// A loss function for the last pipeline stage (see PipelineLossFunction), type-erased and
/// cheap to copy (copies share the function object). Its forward gives the summed loss of one
/// micro-batch and a context; PipelineParallel calls backward with dloss = 1 and scales the
/// gradients once by 1 / count over the whole batch (LossNormalization::mean).
template <std::floating_point T, class Target = Tensor<std::int32_t>>
class PipelineLoss {
 public:
  /// Wraps `loss` (copied). For an nn::CrossEntropy, throws Error unless its reduction is
  /// Reduction::sum: a mean per micro-batch would divide by the micro-batch's count, and the
  /// pipeline already divides by the whole batch's.
  template <PipelineLossFunction<T, Target> L>
  PipelineLoss(L loss)  // implicit: a loss object converts where a PipelineLoss is expected
      : impl_(std::make_shared<Impl<L>>(std::move(loss))) {
    if constexpr (requires { loss.options().reduction; }) {
      TESSERA_EXPECTS(static_cast<const Impl<L>&>(*impl_).fn.options().reduction == nn::Reduction::sum,
                      "PipelineLoss: the loss must reduce by sum (nn::Reduction::sum); the pipeline divides by the "
                      "number of valid targets of the whole batch once (PipelineOptions::loss_normalization)");
    }
  }

  /// The summed loss of one micro-batch (in double) and the context for backward.
  std::pair<double, StageContext> forward(const Tensor<T>& output, const Target& target) const {
    return impl_->forward(output, target);
  }
  /// The gradient of the output for `dloss` times the summed loss.
  Tensor<T> backward(T dloss, StageContext& ctx) const { return impl_->backward(dloss, ctx); }
  /// The number of units the loss sums over (valid tokens).
  std::int64_t count_valid(const Target& target) const { return impl_->count_valid(target); }

 private:
  struct Base {
    virtual ~Base() = default;
    virtual std::pair<double, StageContext> forward(const Tensor<T>& y, const Target& t) const = 0;
    virtual Tensor<T> backward(T dloss, StageContext& ctx) const = 0;
    virtual std::int64_t count_valid(const Target& t) const = 0;
  };
  template <class L>
  struct Impl final : Base {
    using Ctx = typename std::remove_cvref_t<decltype(std::declval<const L&>().forward(
        std::declval<const Tensor<T>&>(), std::declval<const Target&>()))>::Context;
    explicit Impl(L l) : fn(std::move(l)) {}
    std::pair<double, StageContext> forward(const Tensor<T>& y, const Target& t) const override {
      auto [loss, ctx] = fn.forward(y, t);
      return {static_cast<double>(loss), StageContext::hold(std::move(ctx))};
    }
    Tensor<T> backward(T dloss, StageContext& ctx) const override { return fn.backward(dloss, ctx.get<Ctx>()); }
    std::int64_t count_valid(const Target& t) const override { return static_cast<std::int64_t>(fn.count_valid(t)); }
    L fn;
  };
  std::shared_ptr<const Base> impl_;
};

}  // namespace tessera
