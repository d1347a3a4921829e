#pragma once
/// @file
/// Hybrid: data, tensor and pipeline parallelism together over one Mesh (dp x pp x tp ranks):
/// a PipelineParallel over the pp axis whose stages are tensor-parallel over the tp axis, one
/// replica of it per dp coordinate, gradients reduced over the dp axis in buckets, optionally
/// (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
/// Megatron-LM", SC 2021: PTD-P). The optimizer, the learning rate and gradient clipping are
/// outside it: they take the parameters, buckets and gradients it exposes.
///
/// ```cpp
/// Mesh mesh(world, MeshShape{.dp = 2, .pp = 2, .tp = 2});
/// HybridGPT<float> model(mesh, config, seed, {.num_microbatches = 4});
/// DistributedOptimizer<optim::AdamW<float>> opt(model, optim::weight_decay_groups(model.parameters(),
///                                               optim::AdamWOptions{.lr = 1e-3}), /*zero1=*/true);
/// model.zero_grad();
/// double loss = model.forward_backward(tokens, targets);  // this dp rank's rows
/// optim::clip_grad_norm(model.gradients(), 1.0);
/// opt.set_lr(schedule(step));
/// opt.step();
/// ```

#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/comm/timed_comm.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/parallel/data/grad_buckets.hpp"
#include "tessera/parallel/hybrid/data_parallel_stage.hpp"
#include "tessera/parallel/pipeline/pipeline_loss.hpp"
#include "tessera/parallel/pipeline/pipeline_parallel.hpp"
#include "tessera/parallel/pipeline/pipeline_stage.hpp"

namespace tessera {

/// Options of Hybrid, set with designated initializers.
struct HybridOptions {
  /// The pipeline schedule (GPipe, 1F1B, interleaved 1F1B, ZB-H1; with pp = 1 any of them runs the
  /// micro-batches one after the other).
  PipelineScheduleKind schedule = PipelineScheduleKind::one_f_one_b;
  /// Model chunks per pp rank (> 1 needs the interleaved schedule).
  int virtual_stages = 1;
  /// Micro-batches per forward_backward (each dp rank's batch is cut into this many).
  int num_microbatches = 1;
  /// forward_backward calls per optimizer step (gradient accumulation): the dp reduction runs
  /// once, after the last (as DDP's no_sync), and the gradients are those of the mean loss
  /// over all their tokens (CASES C4, C5).
  int accumulation_steps = 1;
  /// Bytes per gradient bucket of the dp reduction (DDP's 25 MiB).
  std::size_t bucket_size = std::size_t{25} << 20;
  /// Record the pipeline timeline (PipelineParallel::timeline; one barrier per step).
  bool record_timeline = false;
  /// Activation recomputation of every stage (PipelineOptions::recompute): none, selective
  /// (attention's softmax recomputed) or full (only each stage's input kept).
  nn::Recompute recompute = nn::Recompute::none;
  /// Layers per unit of each stage's dp buckets, ZeRO-3's unit of gathering (PyTorch FSDP2's
  /// `fully_shard` on each block: 1; on groups of k blocks: k). 0: the whole stage is one unit.
  /// Under ZeRO-3 a unit is all-gathered just before its layers' forward and again before their
  /// backward, freed after each, the next unit's gather prefetched meanwhile
  /// (DataParallelStage); under ZeRO 0-2 only the bucket layout follows the units.
  int unit_layers = 0;
};

/// Where the last forward_backward's time went on this rank, in seconds.
struct HybridStepStats {
  double seconds = 0.0;          ///< wall time of forward_backward, the dp reduction included
  double compute_seconds = 0.0;  ///< forward and backward actions, less their tp collectives
  double tp_comm_seconds = 0.0;  ///< blocking tp collectives inside forward and backward
  double dp_comm_seconds = 0.0;  ///< the dp reduction of the gradients (at a window's end)
  double pp_wait_seconds = 0.0;  ///< batched pipeline sends and receives: transfers and bubble
  double loss = 0.0;             ///< the mean loss over this call's tokens on all dp ranks
  std::int64_t num_valid = 0;    ///< valid targets of this call on all dp ranks
  bool grads_final = false;      ///< whether this call closed an accumulation window
};

/// Data x pipeline x tensor parallelism over `mesh` (see the file comment).
///
/// - **Stages.** Each rank builds its pipeline stages with `make_stage(stage_index, tp)`,
///   tensor-parallel over the tp communicator it is given (mesh.tp(), timed); the last stage's
///   output goes into `make_loss(tp)`'s loss (it must sum over its targets). A stage must be
///   the same function on every dp coordinate.
/// - **Replicas.** Each stage is wrapped in a DataParallelStage over mesh.dp(): at construction
///   the dp ranks check that they hold the same parameter list (CASES C2) and take dp rank 0's
///   values (C3); its gradients live in its buckets.
/// - **Loss.** The mean over every valid target of the global batch (all dp ranks, all
///   micro-batches, all steps of an accumulation window), declared once: the pipeline sums,
///   and when a window closes it sums the tied copies over pp, each stage all-reduces (or
///   reduce-scatters, ZeRO-1) its gradients over dp, and Hybrid divides once by the global
///   count. So every layout gives the single-rank gradients.
/// - **Optimizer.** Outside: any optimizer over parameters(), or ZeRO-1 (ZeroOptimizer over
///   buckets(), which switches them to reduce-scatter; then the reduced gradients live in the
///   buckets' shards), or DistributedOptimizer, which picks one of the two. Clipping takes
///   gradients() (optim::clip_grad_norm).
///
/// Collective over the mesh's world: every rank constructs it with the same options and calls
/// the methods documented as collective in the same order. Throws tessera::Error naming the
/// values when an option is out of range, and what PipelineParallel and the stages throw.
template <std::floating_point T, class Input = Tensor<std::int32_t>, class Target = Tensor<std::int32_t>>
class Hybrid {
 public:
  using Stage = PipelineStage<T, Input>;  ///< the stage interface
  /// Makes stage `stage_index`, tensor-parallel over `tp` (called for this rank's stages).
  using StageFactory = std::function<std::unique_ptr<Stage>(int stage_index, Comm tp)>;
  /// Makes the loss of the last stage over `tp`.
  using LossFactory = std::function<PipelineLoss<T, Target>(Comm tp)>;
  using Scalar = T;  ///< parameter element type

  /// Builds this rank's part (see the class comment). Collective over the mesh's world.
  Hybrid(Mesh& mesh, const StageFactory& make_stage, const LossFactory& make_loss, const HybridOptions& options = {})
      : mesh_(&mesh),
        options_(checked(options)),
        tp_timer_(std::make_shared<CommTimer>()),
        tp_(timed(mesh.tp(), tp_timer_)),
        loss_(make_loss(tp_)),
        pipe_(
            mesh.pp(),
            [&](int s) -> std::unique_ptr<Stage> {
              return std::make_unique<DataParallelStage<T, Input>>(make_stage(s, tp_), mesh.dp(), options.bucket_size,
                                                                   options.unit_layers);
            },
            loss_,
              PipelineOptions{.schedule = options.schedule,
                              .virtual_stages = options.virtual_stages,
                              .loss_normalization = LossNormalization::sum,
                              .accumulation_steps = options.accumulation_steps,
                              .record_timeline = options.record_timeline,
                              .recompute = options.recompute}) {
    pipe_.set_replica(mesh.coord().dp);
    for (int st : pipe_.stage_indices()) {
      auto& replicated = static_cast<DataParallelStage<T, Input>&>(pipe_.stage(st));
      stages_.push_back(&replicated);
      for (GradBuckets<T>* u : replicated.units()) bucket_sets_.push_back(u);
    }
    const ParameterList<T>& params = pipe_.parameters();
    // A later stage's copy of a tied weight (the last stage's wte); the global gradient norm
    // counts it not at all, and tp-replicated parameters on tp rank 0 only.
    for (int s : pipe_.stage_indices())
      if (s > 0)
        for (Parameter<T>& p : pipe_.stage(s).tied_parameters()) tied_copies_.insert(&p);
    for (const Parameter<T>& p : params)
      if (!tied_copies_.count(&p) && (p.layout.is_shard() || mesh.coord().tp == 0)) counted_.insert(&p);
  }
  Hybrid(const Hybrid&) = delete;             ///< not copyable
  Hybrid& operator=(const Hybrid&) = delete;  ///< not copyable

  /// Forward and backward of this dp rank's batch (inputs on the ranks of pp stage 0, targets
  /// on those of the last stage; other ranks may pass empty tensors), cut into
  /// options.num_microbatches micro-batches run in the schedule's order. When the call closes
  /// an accumulation window, the gradients are reduced over dp and normalized: ready for
  /// clipping and the optimizer step. Returns the mean loss over this call's valid targets
  /// on all dp ranks, the same on every rank. `at` places the rows in the global batch for
  /// dropout (BatchPosition: the optimizer step and the global row of the first row); without
  /// it the pipeline's default (see PipelineParallel::set_batch_position: dp rank r's rows
  /// follow ranks 0..r-1's, each accumulation call's the previous call's). Collective over the
  /// world. Throws what PipelineParallel::step throws (a batch smaller than the micro-batch
  /// count, naming both).
  double forward_backward(const Input& inputs, const Target& targets, std::optional<BatchPosition> at = std::nullopt) {
    const auto t0 = std::chrono::steady_clock::now();
    const double tp0 = tp_timer_->seconds;
    stats_ = HybridStepStats{};
    if (at) pipe_.set_batch_position(*at);
    const double local_sum = static_cast<double>(pipe_.step(inputs, targets, options_.num_microbatches));
    return finish_step(t0, tp0, local_sum);
  }

  /// Takes part in a step without data: a dp replica whose data ran out calls it (on every rank
  /// of its pp x tp group) where the other replicas call forward_backward, and contributes no
  /// loss and zero gradients (what its gradients hold: zero after zero_grad) to the dp
  /// reduction; the accumulation window advances as with forward_backward. Returns the mean
  /// loss over the other replicas' valid targets, the same on every rank. Collective over the
  /// world (with the other replicas' forward_backward). Use any_rank_has_data or
  /// agree_num_steps to decide when (DataParallel's uneven-data helpers; CASES C1).
  ///
  /// Throws tessera::Error under ZeRO-3, and under ZeRO-2 with per-layer units
  /// (HybridOptions::unit_layers > 0): there the other replicas' forward and backward gather
  /// the parameters or reduce-scatter each unit's gradients as its backward ends; every replica
  /// must then run the same number of steps (agree_num_steps).
  double skip_forward_backward() {
    for (DataParallelStage<T, Input>* st : stages_)
      TESSERA_EXPECTS(!st->buckets().shard_params() && !(st->per_layer() && st->buckets().shard_grads()),
                      "Hybrid::skip_forward_backward on dp rank ", mesh_->coord().dp, ": under ",
                      st->buckets().shard_params() ? std::string("ZeRO-3")
                                                   : detail::str("ZeRO-2 with per-layer units (unit_layers ",
                                                                 options_.unit_layers, ")"),
                      " a replica cannot join without data (the others gather parameters or reduce-scatter "
                      "gradients inside their backward); agree on the number of steps with agree_num_steps");
    const auto t0 = std::chrono::steady_clock::now();
    const double tp0 = tp_timer_->seconds;
    stats_ = HybridStepStats{};
    pipe_.skip_step();
    return finish_step(t0, tp0, 0.0);
  }

  /// Whether any rank still has data: the loop `while (model.any_rank_has_data(more))` runs the
  /// same number of steps on every rank, a replica without data calling skip_forward_backward.
  /// Collective over the world (one all-reduce of an int), so every rank takes the same branch
  /// (CASES C10).
  bool any_rank_has_data(bool has_data) {
    return mesh_->world().all_reduce_value(has_data ? 1 : 0, ReduceOp::max) > 0;
  }
  /// The smallest of the ranks' `local_steps`: the number of steps every rank runs when the
  /// replicas with more data drop the rest (DistributedSampler's drop_last). Collective over the
  /// world.
  std::int64_t agree_num_steps(std::int64_t local_steps) {
    return mesh_->world().all_reduce_value(local_steps, ReduceOp::min);
  }

 private:
  // The dp part of a step: the loss and count summed over dp; when the window closes, the dp
  // reduction of the gradients and the one division by the window's count.
  double finish_step(std::chrono::steady_clock::time_point t0, double tp0, double local_sum) {
    const PipelineStepStats& ps = pipe_.last_step();
    std::vector<double> lc{local_sum, static_cast<double>(ps.num_valid)};
    mesh_->dp().all_reduce(lc, ReduceOp::sum);
    stats_.num_valid = static_cast<std::int64_t>(lc[1]);
    stats_.loss = lc[1] > 0 ? lc[0] / lc[1] : 0.0;
    window_sum_ += lc[0];
    window_count_ += stats_.num_valid;
    const double tp_in_step = tp_timer_->seconds - tp0;
    if (ps.grads_final) {
      // The stages reduced their gradients over dp as the pipeline closed the window.
      stats_.dp_comm_seconds = 0;
      for (DataParallelStage<T, Input>* st : stages_) stats_.dp_comm_seconds += st->last_sync_seconds();
      const T scale = window_count_ > 0 ? static_cast<T>(1.0 / static_cast<double>(window_count_)) : T{0};
      if (sharded()) {
        for (GradBuckets<T>* set : bucket_sets_)
          for (std::size_t b = 0; b < set->buckets().size(); ++b) set->grad_shard(b).scale_(scale);
      } else {
        for (Parameter<T>& p : pipe_.parameters()) p.grad.scale_(scale);
      }
      accumulated_loss_ = window_count_ > 0 ? window_sum_ / static_cast<double>(window_count_) : 0.0;
      window_sum_ = 0;
      window_count_ = 0;
      stats_.grads_final = true;
    }
    stats_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats_.tp_comm_seconds = tp_in_step;
    stats_.compute_seconds = std::max(0.0, ps.compute_seconds - tp_in_step);
    stats_.pp_wait_seconds = ps.transfer_seconds;
    return stats_.loss;
  }

 public:

  /// The reduced gradients as clipping sees them (optim::clip_grad_norm(model.gradients(),
  /// max_norm)): summed over the world, a tp-replicated parameter counted on tp rank 0 only, a
  /// later stage's copy of a tied weight not at all, and every dp replica's equal copy once
  /// (dp rank 0's; under ZeRO-1 each dp rank's own block of every bucket). Valid after a window
  /// closed. Local (the clipping that takes them is collective over the world).
  optim::Gradients<T> gradients() const {
    optim::Gradients<T> g{{}, mesh_->world()};
    if (sharded()) {
      // This dp rank's block of every bucket holds the reduced gradients of its elements.
      const std::int64_t r = mesh_->dp().rank();
      for (GradBuckets<T>* set : bucket_sets_)
        for (std::size_t b = 0; b < set->buckets().size(); ++b) {
          const auto& bucket = set->buckets()[b];
          const std::int64_t n = set->shard_size(b), lo = r * n, hi = lo + n;
          for (std::size_t i : bucket.slots) {
            const auto& s = set->slots()[i];
            const std::int64_t a = std::max(lo, s.offset), e = std::min(hi, s.offset + s.numel);
            if (a < e)
              g.pieces.push_back({set->grad_shard(b).slice(0, a - lo, e - lo), counted_.count(s.param) > 0,
                                  s.param->name, a - s.offset});
          }
        }
    } else {
      const bool replica0 = mesh_->dp().rank() == 0;
      for (const Parameter<T>& p : pipe_.parameters()) g.pieces.push_back({p.grad, replica0 && counted_.count(&p) > 0});
    }
    return g;
  }

  /// Sets every gradient to zero and starts a new accumulation window. Local.
  void zero_grad() {
    pipe_.zero_grad();
    for (GradBuckets<T>* set : bucket_sets_) set->zero_grad();
    window_sum_ = 0;
    window_count_ = 0;
  }
  /// The mean loss over the valid targets of all dp ranks' batches, forward only (no
  /// gradients, no micro-batches): for validation. Each dp rank passes its own rows: inputs
  /// (read on the ranks of pp stage 0) and targets (read on every rank). Returns the same value
  /// on every rank. Collective over the world.
  double evaluate(const Input& inputs, const Target& targets) {
    const Tensor<T> out = pipe_.forward_only(inputs);
    auto [sum, ctx] = loss_.forward(out, targets);
    std::vector<double> lc{sum, static_cast<double>(loss_.count_valid(targets))};
    mesh_->dp().all_reduce(lc, ReduceOp::sum);
    return lc[1] > 0 ? lc[0] / lc[1] : 0.0;
  }
  /// The last stage's output on `inputs` (read on stage 0's ranks), forward only, the same on
  /// every rank of this rank's pp group (for a tensor-parallel GPT: this tp rank's vocabulary
  /// columns of the logits). Collective over pp and tp.
  Tensor<T> forward_only(const Input& inputs) { return pipe_.forward_only(inputs); }

  /// This rank's parameters (all its stages'; a last stage's copy of a tied weight included).
  const ParameterList<T>& parameters() const noexcept { return pipe_.parameters(); }
  /// Where the last forward_backward's time went on this rank.
  const HybridStepStats& last_step() const noexcept { return stats_; }
  /// The mean loss of the last closed accumulation window over all dp ranks.
  double accumulated_loss() const noexcept { return accumulated_loss_; }
  /// The pipeline (this dp replica's pp group).
  PipelineParallel<T, Input, Target>& pipeline() noexcept { return pipe_; }
  /// The dp gradient buckets of this rank's stages, one set per unit (per stage, or per
  /// HybridOptions::unit_layers layers) in stage and layer order
  /// (ZeroOptimizer and DistributedOptimizer work on them).
  const std::vector<GradBuckets<T>*>& buckets() const noexcept { return bucket_sets_; }
  /// This rank's copies of tied weights held for a later pipeline stage (the last stage's own
  /// wte shard, equal to the first stage's): counted once in the gradient norm, and saved once,
  /// from the first stage, by checkpoints.
  const std::set<const Parameter<T>*>& tied_copies() const noexcept { return tied_copies_; }
  /// Whether a ZeroOptimizer shards the optimizer over dp (the buckets reduce-scatter, and the
  /// reduced gradients live in their shards).
  bool sharded() const noexcept { return bucket_sets_.front()->mode() == GradReduce::reduce_scatter; }
  /// The options.
  const HybridOptions& options() const noexcept { return options_; }
  /// The mesh.
  Mesh& mesh() noexcept { return *mesh_; }
  /// The (timed) tp communicator the stages use.
  Comm& tp() noexcept { return tp_; }

 private:
  static HybridOptions checked(const HybridOptions& o) {
    TESSERA_EXPECTS(o.num_microbatches >= 1, "Hybrid: num_microbatches ", o.num_microbatches, " must be >= 1");
    TESSERA_EXPECTS(o.accumulation_steps >= 1, "Hybrid: accumulation_steps ", o.accumulation_steps, " must be >= 1");
    TESSERA_EXPECTS(o.virtual_stages >= 1, "Hybrid: virtual_stages ", o.virtual_stages, " must be >= 1");
    TESSERA_EXPECTS(o.unit_layers >= 0, "Hybrid: unit_layers ", o.unit_layers, " must be >= 0 (0: one unit per stage)");
    return o;
  }

  Mesh* mesh_;
  HybridOptions options_;
  std::shared_ptr<CommTimer> tp_timer_;
  Comm tp_;
  PipelineLoss<T, Target> loss_;
  PipelineParallel<T, Input, Target> pipe_;
  std::vector<DataParallelStage<T, Input>*> stages_;  // this rank's stages (owned by pipe_)
  std::vector<GradBuckets<T>*> bucket_sets_;         // their buckets
  std::set<const Parameter<T>*> tied_copies_;
  std::set<const Parameter<T>*> counted_;
  HybridStepStats stats_{};
  double window_sum_ = 0;
  std::int64_t window_count_ = 0;
  double accumulated_loss_ = 0;
};

}  // namespace tessera
