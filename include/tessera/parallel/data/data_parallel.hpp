#pragma once
/// @file
/// DataParallel<L>: replicas of any layer over a dp communicator, each on its own part of the
/// batch, with gradients reduced in buckets overlapped with backward, gradient accumulation
/// (no_sync) and a declared loss normalization. PyTorch DistributedDataParallel (Li et al.,
/// VLDB 2020) and Megatron-LM's DistributedDataParallel, in tessera's Layer form.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/dtype.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/parallel/data/dp_replicas.hpp"
#include "tessera/parallel/data/grad_buckets.hpp"

namespace tessera {

/// Options of DataParallel (set with designated initializers:
/// `DataParallelOptions{.bucket_size = 0, .overlap_grad_reduce = false}`).
struct DataParallelOptions {
  /// Bytes of gradients per bucket (DDP's 25 MiB). A bucket is closed once it holds at least
  /// this many bytes; 0 gives one bucket, and one all-reduce, per parameter.
  std::size_t bucket_size = std::size_t{25} << 20;
  /// Bytes of the first bucket, which holds the last layers' gradients (DDP's 1 MiB).
  std::size_t first_bucket_size = std::size_t{1} << 20;
  /// Start each bucket's all-reduce from the grad-ready hooks during backward (Megatron's
  /// `overlap_grad_reduce`); false: all buckets start when backward returns.
  bool overlap_grad_reduce = true;
};

/// A data-parallel replica of the layer `L` over the dp communicator: every rank holds the
/// whole model and runs it on its own part of the global batch; backward reduces the gradients
/// over the ranks, so that after it every replica holds the gradient of the whole global
/// batch. Itself a Layer (same Input, Output, Context as L), so it nests in other policies.
///
/// Construction (collective over `dp`): checks that every rank holds the same parameter list
/// (names, shapes, dtypes, layouts) and throws on every rank naming the first difference
/// (CASES C2); then broadcasts rank 0's parameter values (CASES C3); then lays out the
/// gradients in buckets (GradBuckets: flat buffers in reverse parameter order, each grad a view
/// into its bucket).
///
/// A step:
/// ```cpp
/// const double scale = dp.loss_scale(local_tokens);   // 1 / tokens of the global batch
/// for (int m = 0; m < k; ++m) {                       // k micro-batches
///   auto guard = dp.no_sync(m + 1 < k);               // communicate after the last only
///   auto [logits, ctx] = dp.forward(x[m]);
///   auto [loss, lctx] = ce.forward(logits, y[m]);     // Reduction::sum
///   dp.backward(ce.backward(static_cast<float>(scale), lctx), ctx);
/// }
/// opt.step();
/// dp.zero_grad();
/// ```
///
/// Loss normalization is declared, not guessed: the loss of a step is the mean over every
/// sample (or valid token) of the global batch, over all micro-batches and ranks. The user
/// computes per-sample losses with a sum reduction and passes `loss_scale(local_count)` =
/// 1 / global count as the loss gradient, so each rank's gradients come already divided by
/// the global count; backward then *sums* over ranks. The count is applied exactly once and
/// unequal per-rank counts are weighted by count, not by 1 / world: the result equals the
/// single-process gradient of the whole global batch (CASES C4).
///
/// Unused parameters (a branch a rank did not take) contribute the zero gradient they hold
/// (CASES C1). A rank whose data ran out calls `loss_scale(0)` and `reduce_grads()` instead of
/// forward/backward (zero contribution), or all ranks agree on the number of steps with
/// `agree_num_steps` / `any_rank_has_data`.
///
/// `L` must satisfy tessera::Layer; otherwise compilation stops with one sentence naming the
/// missing part (see check_layer).
template <class L>
class DataParallel {
  static_assert(check_layer<L>());
  using Traits = LayerTraits<L>;

 public:
  using Input = typename Traits::Input;          ///< L's input
  using Output = typename Traits::Output;        ///< L's output
  using Context = typename Traits::Context;      ///< L's context
  using InputGrad = typename Traits::InputGrad;  ///< what L's backward returns
  using Scalar = typename Traits::Scalar;        ///< parameter element type

  /// Switches gradient synchronization off for its lifetime (the micro-batches before the last
  /// of an accumulation: `no_sync()` in PyTorch DDP) and restores the previous setting.
  class [[nodiscard]] NoSyncGuard {
   public:
    /// Sets the replica's sync flag to `!active` (an inactive guard changes nothing).
    NoSyncGuard(DataParallel& dp, bool active) : dp_(&dp), previous_(dp.require_backward_grad_sync()) {
      if (active) dp.set_require_backward_grad_sync(false);
    }
    NoSyncGuard(const NoSyncGuard&) = delete;             ///< not copyable
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;  ///< not copyable
    /// Restores the previous setting.
    ~NoSyncGuard() { dp_->set_require_backward_grad_sync(previous_); }

   private:
    DataParallel* dp_;
    bool previous_;
  };

  /// Wraps `model` as this rank's replica over `dp` (see the class comment). Collective over
  /// `dp`. Throws tessera::Error on every rank when the parameter lists differ (naming the first
  /// differing parameter and both versions), and what the communicator throws.
  DataParallel(L model, Comm dp, const DataParallelOptions& options = {})
      : model_(std::move(model)), comm_(std::move(dp)), options_(options) {
    TESSERA_EXPECTS(comm_.valid(), "DataParallel: the dp communicator handle is empty");
    ParameterList<Scalar> params = parameters();
    expect_same_parameters(comm_, params, "DataParallel");
    broadcast_parameters(comm_, params, 0);
    buckets_ = std::make_unique<GradBuckets<Scalar>>(
        params, comm_,
        GradBucketsOptions{.bucket_size = options.bucket_size,
                           .first_bucket_size = options.first_bucket_size,
                           .overlap_grad_reduce = options.overlap_grad_reduce});
    register_tied_copies();
  }
  /// Takes over `other`'s replica (the hooks move along with the buckets). Not during a
  /// backward.
  DataParallel(DataParallel&& other)
      : model_(std::move(other.model_)),
        comm_(std::move(other.comm_)),
        options_(other.options_),
        require_sync_(other.require_sync_),
        buckets_(std::move(other.buckets_)) {
    if (buckets_) {
      buckets_->rebind(parameters());
      register_tied_copies();
    }
  }
  DataParallel(const DataParallel&) = delete;             ///< not copyable
  DataParallel& operator=(const DataParallel&) = delete;  ///< not copyable
  DataParallel& operator=(DataParallel&&) = delete;       ///< not assignable (build in place)
  ~DataParallel() = default;                              ///< removes the hooks

  /// L's forward on this rank's part of the batch. Local; under ZeRO-3 (a ZeroOptimizer at
  /// ZeroStage::parameters) the model is one unit: its parameters are all-gathered first
  /// (GradBuckets::gather_values, with prefetch unless buckets().set_prefetch(false)) and
  /// freed after, so the forward is collective over dp. With prefetch, the gather of the unit
  /// after this one (a ZeroOptimizer over several DataParallels' buckets links them in the
  /// order given) is started before this forward computes (GradBuckets::prefetch_neighbour).
  ForwardResult<Output, Context> forward(const Input& x) {
    if (!buckets_->shard_params()) return model_.forward(x);
    buckets_->gather_values(buckets_->prefetch(), false);
    buckets_->prefetch_neighbour(false);  // the next unit's gather travels while this one computes
    try {
      ForwardResult<Output, Context> out = model_.forward(x);
      buckets_->release_values();
      return out;
    } catch (...) {
      buckets_->release_values();
      throw;
    }
  }

  /// L's backward; when gradient sync is on (not inside no_sync), reduces the gradients over
  /// the dp ranks, bucket by bucket as they become final, and returns once all are reduced, so
  /// the optimizer can step. Collective over dp when syncing (one all-reduce per bucket, in
  /// bucket order). Throws what L and the communicator throw; tessera::Error when a parameter
  /// is marked ready after its bucket's all-reduce started (see GradBuckets).
  ///
  /// Under ZeRO-3 the parameters are all-gathered again before L's backward (bucket order) and
  /// freed after it; the gradients are reduce-scattered into the shards as under ZeRO-2.
  InputGrad backward(const Output& dy, Context& ctx) {
    buckets_->gather_values(buckets_->prefetch(), true);  // ZeRO-3 (nothing otherwise)
    buckets_->prefetch_neighbour(true);
    buckets_->begin_backward(require_sync_);
    try {
      InputGrad dx = model_.backward(dy, ctx);
      buckets_->end_backward();
      buckets_->release_buffers();  // ZeRO-2: only the shards stay (nothing otherwise)
      buckets_->release_values();   // ZeRO-3: only the value shards stay
      return dx;
    } catch (...) {
      buckets_->abort_backward();
      buckets_->release_values();
      throw;
    }
  }

  /// L's parameters (their grads are views into the buckets).
  ParameterList<Scalar> parameters() {
    if constexpr (Layer<L>)
      return model_.parameters();
    else
      return {};  // not a Layer: check_layer's sentence is the only error
  }

  /// Sets every gradient to zero. Local.
  void zero_grad() { buckets_->zero_grad(); }

  /// 1 / (sum over dp ranks of `local_count`): the loss gradient that makes the step's loss
  /// the mean over every sample (or valid token) of the global batch (see the class comment).
  /// `local_count` counts this rank's samples over all micro-batches of the step (0 for a rank
  /// without data). Collective over dp (one all-reduce of one int64). Throws tessera::Error on
  /// every rank when the global count is 0, and on this rank for a negative count.
  double loss_scale(std::int64_t local_count) {
    TESSERA_EXPECTS(local_count >= 0, "DataParallel::loss_scale: local count ", local_count, " is negative");
    const std::int64_t global = reduce_value(local_count, ReduceOp::sum);
    TESSERA_EXPECTS(global > 0, "DataParallel::loss_scale: the global count over ", comm_.name(),
                    " is 0: no rank has a sample in this step");
    return 1.0 / static_cast<double>(global);
  }

  /// (sum over ranks of `local_sum`) / (sum over ranks of `local_count`), the same value on every
  /// rank (an all-reduce, not a reduce to root), e.g. a validation loss from per-rank sums, so
  /// that a decision taken from it is the same on every rank (CASES C10). Collective over dp.
  /// Throws tessera::Error on every rank when the global count is 0.
  double global_mean(double local_sum, std::int64_t local_count) {
    double v[2] = {local_sum, static_cast<double>(local_count)};
    comm_.iall_reduce(std::span<double>(v, 2), ReduceOp::sum).wait();
    TESSERA_EXPECTS(v[1] > 0, "DataParallel::global_mean: the global count over ", comm_.name(), " is 0");
    return v[0] / v[1];
  }

  /// Whether any dp rank still has data: the data loop `while (dp.any_rank_has_data(more))` runs
  /// the same number of steps on every rank, and a rank without data takes part with zero
  /// contribution (`loss_scale(0)`, `reduce_grads()`). Collective over dp.
  bool any_rank_has_data(bool has_data) {
    return reduce_value(std::int64_t{has_data ? 1 : 0}, ReduceOp::max) > 0;
  }
  /// The smallest of the ranks' `local_steps`: the number of steps every rank runs when the
  /// ranks that have more data drop the rest (DistributedSampler's drop_last). Collective over dp.
  std::int64_t agree_num_steps(std::int64_t local_steps) {
    return reduce_value(local_steps, ReduceOp::min);
  }

  /// Reduces the gradients as they are now, without a backward: a rank whose data ran out calls
  /// it where the others run their syncing backward, and contributes what its gradients hold
  /// (zero after zero_grad). Collective over dp (the same reductions as a syncing backward).
  /// Throws tessera::Error under ZeRO-3, where the other ranks' forward and backward also
  /// all-gather the parameters: there every rank must run the same number of micro-batches
  /// (agree_num_steps).
  void reduce_grads() {
    TESSERA_EXPECTS(!buckets_->shard_params(), "DataParallel::reduce_grads on ", comm_.name(), ": under ZeRO-3 a "
                    "rank cannot join without data (the others' forward and backward all-gather the parameters); "
                    "agree on the number of steps with agree_num_steps");
    buckets_->reduce();
    buckets_->release_buffers();  // ZeRO-2: only the shards stay (nothing otherwise)
  }

  /// Whether backward reduces the gradients (true unless inside no_sync).
  bool require_backward_grad_sync() const noexcept { return require_sync_; }
  /// Sets whether backward reduces the gradients; false accumulates them locally
  /// (PyTorch DDP's `require_backward_grad_sync`). Under ZeRO-2 every backward reduces
  /// (GradBuckets::begin_backward). Local; every rank must set the same.
  void set_require_backward_grad_sync(bool sync) noexcept { require_sync_ = sync; }
  /// A guard that turns gradient sync off while it lives, when `active`: wrap every
  /// micro-batch but the last of an accumulation (`auto g = dp.no_sync(m + 1 < k);`).
  NoSyncGuard no_sync(bool active = true) { return NoSyncGuard(*this, active); }

  /// The wrapped model (this rank's replica).
  L& module() noexcept { return model_; }
  /// The dp communicator.
  Comm& comm() noexcept { return comm_; }
  /// The options.
  const DataParallelOptions& options() const noexcept { return options_; }
  /// The gradient buckets (ZeroOptimizer works on them).
  GradBuckets<Scalar>& buckets() noexcept { return *buckets_; }

 private:
  // A model that holds both ends of a tie and leaves one copy out of parameters()
  // (SequentialModel: the GPT's LM head) names the copies, so ZeRO-3 shards the tie too.
  void register_tied_copies() {
    if constexpr (requires(L& m) { m.tied_copies(); }) buckets_->set_tied_copies(model_.tied_copies());
  }
  // One value all-reduced over dp. Non-blocking + wait: it completes in issue order behind
  // reductions still queued on the communicator, on every backend.
  template <CommScalar S>
  S reduce_value(S value, ReduceOp op) {
    comm_.iall_reduce(std::span<S>(&value, 1), op).wait();
    return value;
  }

  L model_;
  Comm comm_;
  DataParallelOptions options_;
  bool require_sync_ = true;
  std::unique_ptr<GradBuckets<Scalar>> buckets_;  // on the heap: the hooks point at it
};

}  // namespace tessera
