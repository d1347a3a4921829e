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
#include <cstdint>
#include <memory>
#include <optional>
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
#include "tessera/parallel/pipeline/layer_hooks.hpp"
#include "tessera/parallel/pipeline/pipeline_stage.hpp"

namespace tessera {

/// A PipelineStage replicated over the dp communicator `dp` (see the file comment). Forward,
/// backward, shapes and tied parameters are the wrapped stage's; `finish_grad_sync()` (which
/// PipelineParallel calls when a window closes, after summing the tied copies) reduces the
/// stage's gradients over dp: summed by all-reduce, or, once a ZeroOptimizer is built on
/// units(), reduce-scattered into this dp rank's blocks. Construction is collective over dp;
/// the wrapped stage must be the same function on every dp rank.
///
/// **Units (ZeRO-3).** The stage's gradients and, under ZeRO-3, its parameter values live in
/// one GradBuckets per *unit*: the whole stage (unit_layers = 0, the default), or each run of
/// `unit_layers` consecutive layers (PipelineStage::layer_parameters; PyTorch FSDP2's
/// `fully_shard` applied to each block, or to groups of blocks). Under ZeRO-3 a per-layer unit
/// is all-gathered just before its first layer's forward and freed after its last layer's,
/// gathered again before its last layer's backward (and before a recomputed forward) and freed
/// after its first layer's backward; once a unit is gathered, the gather of the unit that runs
/// next (forward: the next unit, then this rank's next stage; backward: the previous) is
/// started so it travels while this one computes (GradBuckets::prefetch_neighbour, linked by
/// the ZeroOptimizer over units() in order). Under ZB-H1 the weight-gradient work a unit's
/// backward_input defers is queued per unit, and the W pass gathers each unit again for its
/// own work only. Under ZeRO-2 and 3 a per-layer unit's gradient buffers are allocated before
/// its backward, and where its gradients are then final (no tied parameter in it, no ZB-H1 W
/// pass, no sequence parallelism) reduce-scattered into the shards as its backward ends (each
/// micro-batch, as DeepSpeed's ZeRO-2 reduces every micro-batch) and freed; the other units'
/// (and a whole-stage unit's) are reduced when the window closes. Under sequence parallelism
/// every unit's gradient buffers are allocated before the stage's backward (its sum over tp
/// sets the replicated parameters' gradients aside before the first layer's backward).
template <std::floating_point T, class Input = Tensor<T>>
class DataParallelStage final : public PipelineStage<T, Input>, private LayerHooks {
 public:
  /// Wraps `stage` over `dp` with buckets of `bucket_size` bytes, in units of `unit_layers`
  /// layers (0: the whole stage, one unit; a count at least the stage's layers, or a stage
  /// without layer_parameters(), gives that too). Collective over dp: checks that every dp rank
  /// holds the same parameters (names, shapes, layouts; throws tessera::Error on every rank
  /// naming the first difference) and takes dp rank 0's values. Throws tessera::Error for a
  /// null stage, a negative unit_layers, and a stage whose layer_parameters() are not its
  /// parameters() (naming both counts).
  DataParallelStage(std::unique_ptr<PipelineStage<T, Input>> stage, Comm dp, std::size_t bucket_size,
                    int unit_layers = 0)
      : stage_(std::move(stage)), dp_(std::move(dp)) {
    TESSERA_EXPECTS(stage_ != nullptr, "DataParallelStage: the stage is null");
    TESSERA_EXPECTS(unit_layers >= 0, "DataParallelStage: unit_layers ", unit_layers,
                    " must be >= 0 (0: the whole stage is one unit)");
    const ParameterList<T> params = stage_->parameters();
    expect_same_parameters(dp_, params, "Hybrid stage '" + stage_->name() + "'");
    broadcast_parameters(dp_, params, 0);
    const GradBucketsOptions bo{.bucket_size = bucket_size, .first_bucket_size = bucket_size, .overlap_grad_reduce = false};
    const std::vector<ParameterList<T>> layers = unit_layers > 0 ? stage_->layer_parameters() : std::vector<ParameterList<T>>{};
    const int n = static_cast<int>(layers.size());
    if (n > unit_layers && unit_layers > 0) {
      std::size_t listed = 0;
      for (const ParameterList<T>& l : layers) listed += l.size();
      TESSERA_EXPECTS(listed == params.size(), "DataParallelStage: stage '", stage_->name(), "' lists ", listed,
                      " parameters in its layers but ", params.size(), " in parameters()");
      for (int a = 0; a < n; a += unit_layers) {
        const int e = std::min(n, a + unit_layers);
        ParameterList<T> ps;
        for (int l = a; l < e; ++l) ps.append(layers[static_cast<std::size_t>(l)]);
        for (int l = a; l < e; ++l) unit_of_layer_.push_back(static_cast<int>(units_.size()));
        unit_first_.push_back(a);
        unit_last_.push_back(e - 1);
        units_.push_back(std::make_unique<GradBuckets<T>>(ps, dp_, bo));
      }
      TESSERA_EXPECTS(stage_->set_layer_hooks(this), "DataParallelStage: stage '", stage_->name(),
                      "' lists its layers' parameters but does not call layer hooks");
    } else {
      units_.push_back(std::make_unique<GradBuckets<T>>(params, dp_, bo));
    }
    for (const auto& u : units_) unit_ptrs_.push_back(u.get());
    // A stage holding both ends of a tie (pp 1: the embedding and the LM head's copy of it):
    // the first unit shards the tie with the copy pointed at its views; with per-layer units it
    // is gathered again around the last layer's forward, backward and W work.
    if (const ParameterList<T> copies = stage_->tied_copies(); copies.size() > 0) {
      units_.front()->set_tied_copies(copies);
      if (per_layer()) tie_user_layer_ = n - 1;
    }
    // The units holding a copy of a tied weight that the pipeline sums over pp at the window's end.
    const ParameterList<T> tied = stage_->tied_parameters();
    for (const auto& u : units_) {
      bool holds = false;
      for (const auto& slot : u->slots())
        for (const Parameter<T>& t : tied) holds = holds || slot.param == &t;
      holds_tied_.push_back(holds);
    }
  }
  DataParallelStage(const DataParallelStage&) = delete;             ///< not copyable: the hooks point here
  DataParallelStage& operator=(const DataParallelStage&) = delete;  ///< not copyable
  /// Removes the layer hooks from the wrapped stage.
  ~DataParallelStage() override {
    if (per_layer()) stage_->set_layer_hooks(nullptr);
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
    ensure_buffers_before_backward();
    return with_values(true, [&] { return stage_->backward(dy, ctx); });
  }
  /// The wrapped stage's input-gradient pass (ZB-H1's I), its own split where it has one
  /// (gathered under ZeRO-3 as backward).
  Tensor<T> backward_input(const Tensor<T>& dy, StageContext& ctx, nn::WeightGradQueue& weights) override {
    ensure_buffers_before_backward();
    last_w_unit_ = -1;
    last_w_flag_.reset();
    return with_values(true, [&] { return stage_->backward_input(dy, ctx, weights); });
  }
  /// The wrapped stage's weight-gradient pass (ZB-H1's W; gathered under ZeRO-3 as backward;
  /// with per-layer units each unit is gathered for its own deferred work only).
  void backward_weight(nn::WeightGradQueue& weights) override {
    with_values(true, [&] {
      stage_->backward_weight(weights);
      return 0;
    });
  }
  /// The wrapped stage's output shape (under ZeRO-3 computed with the parameters gathered
  /// once per input shape, then cached: collective over dp the first time).
  Shape output_shape(const Shape& input) override {
    if (!sharded_params()) return stage_->output_shape(input);
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
    for (std::size_t k = units_.size(); k-- > 0;) {  // backward order: the last unit's gradients were final first
      if (reduced_in_backward_.size() > k && reduced_in_backward_[k]) continue;  // reduce-scattered as its backward ended
      units_[k]->ensure_buffers();
      units_[k]->reduce();
      units_[k]->release_buffers();
    }
    reduced_in_backward_.assign(units_.size(), false);
    for (GradBuckets<T>* u : unit_ptrs_) u->release_values();  // ZeRO-3: a prefetch that no operation used
    sync_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  /// The parameters of each of the wrapped stage's layers.
  std::vector<ParameterList<T>> layer_parameters() override { return stage_->layer_parameters(); }
  /// Seconds of the last finish_grad_sync (the dp reduction).
  double last_sync_seconds() const noexcept { return sync_seconds_; }

  /// The gradient buckets of the first unit (the whole stage's with one unit).
  GradBuckets<T>& buckets() noexcept { return *units_.front(); }
  /// The gradient buckets of every unit, in forward (layer) order: one set for the whole stage,
  /// or one per run of unit_layers layers (ZeroOptimizer shards them; Hybrid::buckets lists them).
  const std::vector<GradBuckets<T>*>& units() const noexcept { return unit_ptrs_; }
  /// Whether the stage is cut into per-layer units (more than one).
  bool per_layer() const noexcept { return units_.size() > 1; }
  /// The wrapped stage.
  PipelineStage<T, Input>& module() noexcept { return *stage_; }

 private:
  std::unique_ptr<PipelineStage<T, Input>> stage_;
  Comm dp_;
  std::vector<std::unique_ptr<GradBuckets<T>>> units_;  // on the heap: the grad hooks point at them
  std::vector<GradBuckets<T>*> unit_ptrs_;
  std::vector<int> unit_of_layer_, unit_first_, unit_last_;  // per-layer units: the layers' unit, units' layers
  double sync_seconds_ = 0;
  std::vector<std::pair<Shape, Shape>> shapes_;  // ZeRO-3: output_shape's answers
  // ZB-H1 with per-layer units: the queue the stage's backward_input defers into, and the
  // current unit's own queue (its scope open between its before_ and after_backward).
  nn::WeightGradQueue* outer_queue_ = nullptr;
  std::shared_ptr<nn::WeightGradQueue> unit_queue_;
  std::optional<nn::DeferWeightGrads> unit_scope_;
  std::vector<bool> holds_tied_;           // per unit: holds one of the stage's tied_parameters()
  std::vector<bool> reduced_in_backward_;  // per unit: reduce-scattered at its backward's end in this window
  int last_w_unit_ = -1;                 // the unit that queued W work last in this backward_input
  int tie_user_layer_ = -1;              // per-layer units: the layer using the first unit's tie (the LM head)
  std::shared_ptr<bool> last_w_flag_;    // whether its W work is to prefetch the unit before it

  bool sharded_params() const noexcept { return units_.front()->shard_params(); }

  // ZeRO-2 and 3 release the gradient buffers between windows; a backward needs them before it
  // writes a gradient. A whole-stage unit: allocated here. Per-layer units: each unit's own
  // before its backward (before_backward), except where the stage touches gradients outside
  // its layers' backward (!layer_grads_final()): sequence parallelism sets the replicated
  // parameters' gradients aside and zeroes them before the first layer's backward, and adds
  // their sum over tp after the last (tp::ReplicatedGradSum), so every unit's buffers are
  // allocated first (those gradients are reduced at the window's end anyway). Without this the
  // set-aside copies of the released (empty) gradients failed to add back to the buffers'
  // views (Tensor::copy_from: shapes (T, d) and (0)).
  void ensure_buffers_before_backward() {
    if (per_layer() && stage_->layer_grads_final()) return;
    for (const auto& u : units_) u->ensure_buffers();
  }

  // f() with the stage's parameters gathered under ZeRO-3 (in backward bucket order when
  // `backward`), freed after, also when f throws; f() alone otherwise. With per-layer units the
  // layer hooks gather; f() runs bare and every unit is freed if it throws.
  template <class F>
  auto with_values(bool backward, F&& f) {
    if (!sharded_params()) return f();
    if (per_layer()) {
      try {
        return f();
      } catch (...) {
        unit_scope_.reset();
        unit_queue_.reset();
        for (GradBuckets<T>* u : unit_ptrs_) u->release_values();
        throw;
      }
    }
    GradBuckets<T>& b = *units_.front();
    b.gather_values(b.prefetch(), backward);
    b.prefetch_neighbour(backward);  // this rank's next stage (previous in backward)
    try {
      auto out = f();
      b.release_values();
      return out;
    } catch (...) {
      b.release_values();
      throw;
    }
  }

  // ---- LayerHooks: per-layer units under ZeRO-3 ----
  void before_forward(int layer) override {
    const int u = unit_of_layer_.at(static_cast<std::size_t>(layer));
    if (!sharded_params()) return;
    if (layer == unit_first_[static_cast<std::size_t>(u)]) {
      GradBuckets<T>& b = *units_[static_cast<std::size_t>(u)];
      b.gather_values(b.prefetch(), false);
      // The next unit's gather travels while this one computes; not across stages, whose order
      // is the schedule's (an interleaved schedule may run this chunk again first).
      if (static_cast<std::size_t>(u) + 1 < units_.size()) b.prefetch_neighbour(false);
    }
    if (layer == tie_user_layer_) units_.front()->gather_values(units_.front()->prefetch(), false);  // the tie's use
  }
  void after_forward(int layer) override {
    if (sharded_params() && layer == tie_user_layer_) units_.front()->release_values();
    const int u = unit_of_layer_.at(static_cast<std::size_t>(layer));
    if (sharded_params() && layer == unit_last_[static_cast<std::size_t>(u)]) units_[static_cast<std::size_t>(u)]->release_values();
  }
  // Whether unit u's gradients are reduce-scattered into the shards as its backward ends (each
  // micro-batch; ZeRO-2 and 3): not under ZB-H1 (its W pass adds them later), not for a unit
  // holding a tied parameter (the other end's backward, or the pipeline's sum of the copies
  // over pp at the window's end, adds to it later), not where the stage changes gradients
  // after its layers' backward (sequence parallelism's sum over tp).
  bool reduce_in_backward(std::size_t u) const {
    const GradBuckets<T>& b = *units_[u];
    if (!b.shard_grads() || nn::WeightGradQueue::active() != nullptr || !stage_->layer_grads_final()) return false;
    if (holds_tied_[u]) return false;
    for (const auto& slot : b.slots())
      if (slot.copy || slot.param->tie_count() > 1) return false;
    return true;
  }
  void before_backward(int layer) override {
    const int u = unit_of_layer_.at(static_cast<std::size_t>(layer));
    if (layer != unit_last_[static_cast<std::size_t>(u)]) return;
    GradBuckets<T>& b = *units_[static_cast<std::size_t>(u)];
    b.ensure_buffers();  // ZeRO-2 and 3: this unit's gradient buffers, released after its last reduction
    if (!sharded_params()) return;
    b.gather_values(b.prefetch(), true);
    if (u > 0) b.prefetch_neighbour(true);  // the previous unit's gather travels while this one computes
    if (layer == tie_user_layer_) units_.front()->gather_values(units_.front()->prefetch(), true);  // the tie's use
    if ((outer_queue_ = nn::WeightGradQueue::active()) != nullptr) {  // ZB-H1's B: this unit's W work apart
      unit_queue_ = std::make_shared<nn::WeightGradQueue>();
      unit_scope_.emplace(*unit_queue_);
    }
  }
  void after_backward(int layer) override {
    if (sharded_params() && layer == tie_user_layer_) units_.front()->release_values();
    const int u = unit_of_layer_.at(static_cast<std::size_t>(layer));
    if (layer != unit_first_[static_cast<std::size_t>(u)]) return;
    GradBuckets<T>* b = units_[static_cast<std::size_t>(u)].get();
    // The unit of the layer using the tie has W work on it (the LM head's weight gradient).
    GradBuckets<T>* tie =
        tie_user_layer_ >= 0 && u == unit_of_layer_.at(static_cast<std::size_t>(tie_user_layer_)) ? units_.front().get() : nullptr;
    if (reduce_in_backward(static_cast<std::size_t>(u))) {  // its gradients are final: to the shards, buffers freed
      b->reduce();
      b->release_buffers();
      reduced_in_backward_.resize(units_.size(), false);
      reduced_in_backward_[static_cast<std::size_t>(u)] = true;
    }
    if (!sharded_params()) return;
    if (unit_scope_) {
      unit_scope_.reset();  // back to the stage's queue
      std::shared_ptr<nn::WeightGradQueue> q = std::move(unit_queue_);
      if (!q->empty()) {  // the W pass gathers this unit again for its own work
        const std::int64_t bytes = q->held_bytes();
        // The W work of the unit before this one runs next: this work's gather prefetches
        // that unit's, once it is known to have W work (its backward comes after).
        auto next_has_work = std::make_shared<bool>(false);
        if (last_w_unit_ == u + 1 && last_w_flag_) *last_w_flag_ = true;
        last_w_unit_ = u;
        last_w_flag_ = next_has_work;
        outer_queue_->push(
            [b, q, next_has_work, tie] {
              b->gather_values(b->prefetch(), true);
              if (*next_has_work) b->prefetch_neighbour(true);
              if (tie != nullptr) tie->gather_values(tie->prefetch(), true);
              try {
                q->run();
              } catch (...) {
                if (tie != nullptr) tie->release_values();
                b->release_values();
                throw;
              }
              if (tie != nullptr) tie->release_values();
              b->release_values();
            },
            bytes);
      }
    }
    b->release_values();
  }
};

}  // namespace tessera
