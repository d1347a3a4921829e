#pragma once
/// @file
/// WeightGradQueue: the weight-gradient half of a backward, deferred -- what zero-bubble
/// pipeline schedules run as their W pass (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR
/// 2024) after the input-gradient half (I) has been sent to the previous stage.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::nn {

/// The weight-gradient computations that one backward deferred, in the order the layers met
/// them, each with the bytes it keeps alive (the layer input and output gradient it needs).
///
/// While a DeferWeightGrads scope naming a queue is open on the calling thread, the layers that
/// split their backward (nn::Linear, nn::LMHead, and everything built from them: MLP,
/// SelfAttention, Block, GPTHead) compute only the input gradient in backward() and push their
/// weight gradient here; run() then adds every deferred contribution into the parameters'
/// grads (and marks them ready), in push order. A layer that does not split its backward
/// (LayerNorm, Embedding, a user's layer) computes everything in backward(): the queue simply
/// holds less. The arithmetic of each contribution is the same as in the fused backward, so the
/// gradients are bitwise the same whenever each parameter receives its contributions in the
/// same order (one layer, micro-batches in order).
///
/// Not thread-safe; one queue per (stage, micro-batch) in flight.
class WeightGradQueue {
 public:
  /// Appends a deferred weight-gradient computation that keeps `bytes` alive until it runs.
  void push(std::function<void()> task, std::int64_t bytes) {
    tasks_.push_back(std::move(task));
    bytes_ += bytes;
  }
  /// Runs every deferred computation in push order, then empties the queue (releasing what they
  /// kept alive). Rethrows what a computation throws (the queue is emptied anyway).
  void run() {
    std::vector<std::function<void()>> tasks = std::move(tasks_);
    tasks_.clear();
    bytes_ = 0;
    for (auto& t : tasks) t();
  }
  /// Whether nothing is deferred.
  bool empty() const noexcept { return tasks_.empty(); }
  /// Number of deferred computations.
  std::size_t size() const noexcept { return tasks_.size(); }
  /// Bytes the deferred computations keep alive (inputs and output gradients), counted once
  /// per push (a tensor shared by two pushes counts twice).
  std::int64_t held_bytes() const noexcept { return bytes_; }

  /// The queue of the innermost open DeferWeightGrads scope on this thread, or null (backward
  /// is then fused).
  static WeightGradQueue* active() noexcept { return current(); }

 private:
  friend class DeferWeightGrads;
  static WeightGradQueue*& current() noexcept {
    thread_local WeightGradQueue* q = nullptr;
    return q;
  }
  std::vector<std::function<void()>> tasks_;
  std::int64_t bytes_ = 0;
};

/// While alive, the layers that split their backward push their weight gradients into `queue`
/// instead of computing them (see WeightGradQueue). Scopes nest; the innermost wins; the
/// previous one is restored on destruction. Per thread (each rank of the threads backend has
/// its own).
class DeferWeightGrads {
 public:
  /// Opens the scope on `queue`.
  explicit DeferWeightGrads(WeightGradQueue& queue) noexcept : previous_(WeightGradQueue::current()) {
    WeightGradQueue::current() = &queue;
  }
  /// Restores the previous scope's queue (or none).
  ~DeferWeightGrads() { WeightGradQueue::current() = previous_; }
  DeferWeightGrads(const DeferWeightGrads&) = delete;             ///< not copyable
  DeferWeightGrads& operator=(const DeferWeightGrads&) = delete;  ///< not copyable

 private:
  WeightGradQueue* previous_;
};

/// A layer's backward that honours a DeferWeightGrads scope: dx now (layer.backward_input); the
/// weight gradients now (layer.backward_weight) or, inside the scope, pushed to the active queue
/// with the layer's input and a contiguous dy kept for them (their bytes counted). For layers
/// whose Context holds their input as `x` (nn::Linear, nn::LMHead). The layer must outlive the
/// queued work.
template <class Layer, class T, class Context>
Tensor<T> deferrable_backward(Layer& layer, const Tensor<T>& dy, const Context& ctx) {
  Tensor<T> dx = layer.backward_input(dy, ctx);
  if (WeightGradQueue* q = WeightGradQueue::active()) {
    Context kept{ctx.x};
    Tensor<T> g = dy.contiguous();
    const std::int64_t bytes = static_cast<std::int64_t>(sizeof(T)) * (kept.x.numel() + g.numel());
    q->push([&layer, kept = std::move(kept), g = std::move(g)] { layer.backward_weight(g, kept); }, bytes);
  } else {
    layer.backward_weight(dy, ctx);
  }
  return dx;
}

}  // namespace tessera::nn
