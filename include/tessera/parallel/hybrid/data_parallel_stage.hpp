#pragma once
/// @file
/// DataParallelStage: data parallelism wrapping one pipeline stage, as torchtitan applies DDP
/// (or FSDP) to each of a pipeline's stage modules: the stage's replicas over the dp ranks,
/// checked equal and broadcast from dp rank 0 at construction, their gradients laid out in
/// DataParallel's buckets (GradBuckets) and reduced over dp when the pipeline closes an
/// accumulation window. Hybrid is the pipeline schedule over such stages, each tensor-parallel
/// inside.

#include <chrono>
#include <concepts>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/weight_grad_queue.hpp"
#include "tessera/parallel/data/dp_replicas.hpp"
#include "tessera/parallel/data/grad_buckets.hpp"
#include "tessera/parallel/pipeline/pipeline_stage.hpp"

namespace tessera {

/// A PipelineStage replicated over the dp communicator `dp` (see the file comment). Forward,
/// backward, shapes and tied parameters are the wrapped stage's; `finish_grad_sync()` (which
/// PipelineParallel calls when a window closes, after summing the tied copies) reduces the
/// stage's gradients over dp: summed by all-reduce, or, once a ZeroOptimizer is built on
/// buckets(), reduce-scattered into this dp rank's blocks. Construction is collective over dp;
/// the wrapped stage must be the same function on every dp rank.
template <std::floating_point T, class Input = Tensor<T>>
class DataParallelStage final : public PipelineStage<T, Input> {
 public:
  /// Wraps `stage` over `dp` with buckets of `bucket_size` bytes. Collective over dp: checks
  /// that every dp rank holds the same parameters (names, shapes, layouts; throws
  /// tessera::Error on every rank naming the first difference) and takes dp rank 0's values.
  /// Throws tessera::Error for a null stage.
  DataParallelStage(std::unique_ptr<PipelineStage<T, Input>> stage, Comm dp, std::size_t bucket_size)
      : stage_(std::move(stage)), dp_(std::move(dp)) {
    TESSERA_EXPECTS(stage_ != nullptr, "DataParallelStage: the stage is null");
    const ParameterList<T> params = stage_->parameters();
    expect_same_parameters(dp_, params, "Hybrid stage '" + stage_->name() + "'");
    broadcast_parameters(dp_, params, 0);
    buckets_ = std::make_unique<GradBuckets<T>>(
        params, dp_,
        GradBucketsOptions{.bucket_size = bucket_size, .first_bucket_size = bucket_size, .overlap_grad_reduce = false});
  }

  /// The wrapped stage's forward on the model input. Under ZeRO-3 the stage is one unit of
  /// gathering: its parameters are all-gathered over dp first and freed after (collective over
  /// dp; every dp rank runs the same schedule); with prefetch, the gather of this rank's next
  /// stage (virtual stages; the previous one in backward) is started before this one computes.
  StageOutput<T> forward_first(const Input& x) override {
    return with_values(false, [&] { return stage_->forward_first(x); });
  }
  /// The wrapped stage's forward on an activation (under ZeRO-3 gathered as forward_first).
  StageOutput<T> forward(const Tensor<T>& x) override {
    return with_values(false, [&] { return stage_->forward(x); });
  }
  /// The wrapped stage's backward (no communication: the reduction waits for the window's end).
  /// Under ZeRO-2, first allocates the gradient buffers released at the last window's end;
  /// under ZeRO-3 gathers the parameters again for it (collective over dp) and frees them after.
  Tensor<T> backward(const Tensor<T>& dy, StageContext& ctx) override {
    buckets_->ensure_buffers();
    return with_values(true, [&] { return stage_->backward(dy, ctx); });
  }
  /// The wrapped stage's input-gradient pass (ZB-H1's I), its own split where it has one
  /// (gathered under ZeRO-3 as backward).
  Tensor<T> backward_input(const Tensor<T>& dy, StageContext& ctx, nn::WeightGradQueue& weights) override {
    buckets_->ensure_buffers();
    return with_values(true, [&] { return stage_->backward_input(dy, ctx, weights); });
  }
  /// The wrapped stage's weight-gradient pass (ZB-H1's W; gathered under ZeRO-3 as backward).
  void backward_weight(nn::WeightGradQueue& weights) override {
    with_values(true, [&] {
      stage_->backward_weight(weights);
      return 0;
    });
  }
  /// The wrapped stage's output shape (under ZeRO-3 computed with the parameters gathered
  /// once per input shape, then cached: collective over dp the first time).
  Shape output_shape(const Shape& input) override {
    if (!buckets_->shard_params()) return stage_->output_shape(input);
    for (const auto& [in, out] : shapes_)
      if (in == input) return out;
    const Shape out = with_values(false, [&] { return stage_->output_shape(input); });
    shapes_.emplace_back(input, out);
    return out;
  }
  /// The wrapped stage's parameters (their gradients are views into the buckets).
  ParameterList<T> parameters() override { return stage_->parameters(); }
  /// The wrapped stage's tied parameters.
  ParameterList<T> tied_parameters() override { return stage_->tied_parameters(); }
  /// The wrapped stage's name.
  std::string name() const override { return stage_->name(); }
  /// Whether the wrapped stage holds the model's last layer.
  bool holds_last_layer() const override { return stage_->holds_last_layer(); }
  /// Reduces the gradients over dp (all-reduce, or reduce-scatter under ZeRO-1 and 2; under
  /// ZeRO-2 into the shards, after which the full buffers are released until the next
  /// window's first backward). Collective over dp (one reduction per bucket).
  void finish_grad_sync() override {
    const auto t0 = std::chrono::steady_clock::now();
    buckets_->reduce();
    buckets_->release_buffers();
    buckets_->release_values();  // ZeRO-3: a prefetch of this stage that no operation used
    sync_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  /// Seconds of the last finish_grad_sync (the dp reduction).
  double last_sync_seconds() const noexcept { return sync_seconds_; }

  /// The gradient buckets (ZeroOptimizer shards them).
  GradBuckets<T>& buckets() noexcept { return *buckets_; }
  /// The wrapped stage.
  PipelineStage<T, Input>& module() noexcept { return *stage_; }

 private:
  std::unique_ptr<PipelineStage<T, Input>> stage_;
  Comm dp_;
  std::unique_ptr<GradBuckets<T>> buckets_;  // on the heap: the hooks point at it
  double sync_seconds_ = 0;
  std::vector<std::pair<Shape, Shape>> shapes_;  // ZeRO-3: output_shape's answers

  // f() with the stage's parameters gathered under ZeRO-3 (in backward bucket order when
  // `backward`), freed after, also when f throws; f() alone otherwise.
  template <class F>
  auto with_values(bool backward, F&& f) {
    if (!buckets_->shard_params()) return f();
    buckets_->gather_values(buckets_->prefetch(), backward);
    buckets_->prefetch_neighbour(backward);  // this rank's next stage (previous in backward)
    try {
      auto out = f();
      buckets_->release_values();
      return out;
    } catch (...) {
      buckets_->release_values();
      throw;
    }
  }
};

}  // namespace tessera
