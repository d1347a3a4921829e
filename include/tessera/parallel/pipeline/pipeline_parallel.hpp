#pragma once
/// @file
/// PipelineParallel: runs a model cut into stages over the ranks of a pipeline communicator,
/// micro-batch by micro-batch, in the order of a checked schedule (GPipe, 1F1B, interleaved
/// 1F1B, or a hand-written one), each tick's transfers issued as one batched group, and
/// records a timeline of every action.
///
/// ```cpp
/// const GPTConfig cfg{...};
/// const StagePartition cut = StagePartition::even(gpt_pipeline_num_layers(cfg), pp.size());
/// PipelineParallel<float, Tensor<std::int32_t>> pipe(
///     pp, [&](int s) { return make_gpt_pipeline_stage<float>(cfg, seed, cut, s); },
///     nn::CrossEntropy<float>({.reduction = nn::Reduction::sum}),
///     {.schedule = PipelineScheduleKind::one_f_one_b});
/// optim::AdamW<float> opt(pipe.parameters());
/// pipe.zero_grad();
/// float loss = pipe.step(tokens, targets, /*num_microbatches=*/8);  // forward + backward
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
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/allocation_counter.hpp"
#include "tessera/core/batch_position.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/memory_tracker.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/recompute.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/parallel/pipeline/pipeline_loss.hpp"
#include "tessera/parallel/pipeline/pipeline_stage.hpp"
#include "tessera/schedule/action.hpp"
#include "tessera/schedule/checker.hpp"
#include "tessera/schedule/gpipe.hpp"
#include "tessera/schedule/interleaved_one_f_one_b.hpp"
#include "tessera/schedule/one_f_one_b.hpp"
#include "tessera/schedule/recorder.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/timeline.hpp"
#include "tessera/schedule/zero_bubble_h1.hpp"

namespace tessera {

/// Which provided schedule `PipelineParallel::step(inputs, targets, num_microbatches)` runs.
enum class PipelineScheduleKind {
  gpipe,                    ///< schedule::GPipe (Huang et al. 2019): all forwards, then all backwards
  one_f_one_b,              ///< schedule::OneFOneB (PipeDream-Flush, Narayanan et al. 2021; Megatron-LM)
  interleaved_one_f_one_b,  ///< schedule::InterleavedOneFOneB (Narayanan et al., SC 2021): v chunks per rank
  /// schedule::ZeroBubbleH1 (Qi et al., ICLR 2024): each backward split into I (input
  /// gradient) and W (weight gradient), the W passes deferred into 1F1B's bubble; 1F1B's peak
  /// activation memory. Stages split their backward through PipelineStage::backward_input /
  /// backward_weight (a stage that cannot runs its whole backward in I).
  zero_bubble_h1,
};

/// How the losses of a step (or of an accumulation window) are combined; declared once in
/// PipelineOptions and applied exactly once.
enum class LossNormalization {
  /// The mean over every valid target (token) of the whole batch -- all micro-batches and all
  /// steps of the accumulation window: gradients are summed unscaled and divided once by the
  /// total count when the window closes. m micro-batches thus give the whole-batch gradient.
  mean,
  /// The plain sum: no division.
  sum,
};

/// Options of PipelineParallel, set with designated initializers:
/// `PipelineOptions{.schedule = PipelineScheduleKind::interleaved_one_f_one_b, .virtual_stages = 2}`.
struct PipelineOptions {
  /// The schedule of step(inputs, targets, num_microbatches).
  PipelineScheduleKind schedule = PipelineScheduleKind::one_f_one_b;
  /// v: stages (model chunks) per rank; the pipeline has pp_size * v stages. > 1 needs the
  /// interleaved schedule (or hand-written schedules with as many chunks).
  int virtual_stages = 1;
  /// Interleaved 1F1B's micro-batch group size (Megatron's microbatch_group_size_per_vp_stage);
  /// 0 = pp_size.
  int microbatch_group_size = 0;
  /// Stage -> rank placement (pp_size * virtual_stages entries); empty = loop placement, stage s
  /// on rank s % pp_size (Megatron-LM, torch.distributed.pipelining).
  std::vector<int> stage_ranks{};
  /// Mean over all valid targets of the batch (default), or sum.
  LossNormalization loss_normalization = LossNormalization::mean;
  /// Number of step() calls whose gradients are accumulated before they are final (normalized,
  /// tied copies summed). With mean normalization they equal the gradient of the mean loss over
  /// all of those steps' targets (CASES.md C5).
  int accumulation_steps = 1;
  /// Record every action's start and end (one barrier per step to align the ranks' clocks).
  bool record_timeline = true;
  /// Activation recomputation of every stage, honoured by every schedule: none; selective
  /// (Korthikanti et al. 2022: the stage's forward runs in a nn::SelectiveRecompute scope, so
  /// attention keeps q, k, v and the GEMM outputs but not its softmax probabilities, which
  /// backward recomputes); full (Chen et al. 2016: only the stage's input is kept from F to
  /// B / I, and the stage's forward reruns, at the same BatchPosition, just before its
  /// backward). Gradients are bitwise those without recomputation; the extra forward time is
  /// last_step().recompute_seconds.
  nn::Recompute recompute = nn::Recompute::none;
  /// Per-stage recomputation (one entry per stage, pp_size * virtual_stages); empty: every
  /// stage uses `recompute`.
  std::vector<nn::Recompute> stage_recompute{};
};

/// What the last step() did on this rank.
struct PipelineStepStats {
  std::string schedule{};                    ///< its description, e.g. "1F1B (p=4, m=8)"
  int num_microbatches = 0;                  ///< m
  std::vector<std::int64_t> microbatch_sizes{};  ///< samples per micro-batch (the first B % m hold one more)
  /// The largest number of (stage, micro-batch) contexts this rank held at once (forward done,
  /// backward -- or, for a split backward, its W -- not yet), counted by the executor.
  int peak_in_flight = 0;
  /// The checker's number for this rank (schedule::CheckReport::peak_in_flight): min(p - rank, m)
  /// for 1F1B, m for GPipe. Equal to peak_in_flight.
  int expected_peak_in_flight = 0;
  int num_ticks = 0;                         ///< ticks this rank ran
  double loss = 0.0;                         ///< the step's loss, normalized as declared
  std::int64_t num_valid = 0;                ///< valid targets of the step
  bool grads_final = false;                  ///< whether this step closed an accumulation window
  bool shapes_exchanged = false;             ///< whether the activation shapes were recomputed
  /// Seconds this rank spent in its forward and backward actions (the loss included; the
  /// collectives a tensor-parallel stage runs inside them too).
  double compute_seconds = 0.0;
  /// Seconds this rank spent in its ticks' batched sends and receives: the transfers and the
  /// waits for a neighbour stage (the pipeline bubble shows up here).
  double transfer_seconds = 0.0;
  /// Forwards rerun for full recomputation on this rank (one per (stage, micro-batch) of a
  /// full-recompute stage), and the seconds they took (part of compute_seconds): the extra
  /// compute recomputation costs. Selective recomputation's extra softmax runs inside the
  /// backward and is not separated.
  int recomputed_forwards = 0;
  double recompute_seconds = 0.0;  ///< see recomputed_forwards
  /// The largest number of activation bytes this rank held at once during the step: the tensor
  /// storage its forwards (stage and loss) allocated that the micro-batches' contexts still
  /// held, plus a full-recompute stage's kept input, and during the backward of a
  /// full-recompute stage its rerun forward's contexts. Outputs waiting to be sent are not
  /// included. The same figures feed MemoryTracker's `activations` category (this rank's).
  std::int64_t peak_activation_bytes = 0;
};

/// Pipeline parallelism: the stages of a model over the ranks of the pipeline communicator
/// `pp` (p ranks, v stages each), run per micro-batch in the order of a schedule that
/// schedule::check has accepted (GPipe: Huang et al. 2019; 1F1B / PipeDream-Flush: Narayanan
/// et al. 2021; interleaved 1F1B: Narayanan et al. 2021; the executor follows Megatron-LM's
/// schedules.py and torch.distributed.pipelining).
///
/// - **Stages.** Each rank builds only its own stages, with `make_stage(stage_index)` (see
///   StagePartition, StaticStagePartition, make_gpt_pipeline_stage). Stage 0 takes the model
///   input (`Input`, e.g. tokens); the last stage's output goes into the loss with the targets.
///   Activations between stages are Tensor<T> whose shapes each rank knows before a step:
///   the first stage's rank announces the input shape, and each stage's rank computes its
///   output shape (PipelineStage::output_shape); they are exchanged only when the input shape
///   or the number of micro-batches changes.
/// - **Ticks.** Each tick's compute runs first, then all of its sends and receives are issued
///   as one batched group (Comm::batch_send_recv; CASES.md C6), so no order of sends and
///   receives can deadlock. Activations are kept only as long as the schedule needs them
///   (a context from F to B; a received activation until its F; a gradient until its B or its
///   send): 1F1B holds at most min(p - rank, m) micro-batches in flight
///   (last_step().peak_in_flight, checked against the checker's number).
/// - **Batches.** step() cuts the batch (dim 0 of inputs and targets) into m micro-batches as
///   torch.tensor_split does: a batch of B samples gives B % m micro-batches of B / m + 1 and
///   the rest of B / m. B < m is rejected with an Error naming both.
/// - **Loss.** Declared once (PipelineOptions::loss_normalization, accumulation_steps): the
///   loss function sums, gradients accumulate unscaled, and when an accumulation window closes
///   they are divided once by the window's count of valid targets, so gradients with m
///   micro-batches, and with several accumulated steps, equal the whole-batch gradients.
/// - **Tied weights.** A first stage's and a last stage's tied_parameters() (the token
///   embedding and the LM head) start equal (the first stage's values are broadcast at
///   construction) and their gradients are summed when the window closes (a 2-rank group split
///   from pp, Megatron-LM's embedding group), so both copies stay bitwise identical.
/// - **Timeline.** Every action's start and end is recorded; timeline() gathers all ranks'
///   (schedule::Timeline: Chrome trace, SVG, bubble_stats).
///
/// Every method documented as collective must be called by every rank of `pp` in the same
/// order with the same arguments' sizes. Runs on the threads and MPI backends (tensors live in
/// host memory).
template <std::floating_point T, class Input = Tensor<T>, class Target = Tensor<std::int32_t>>
class PipelineParallel {
  static_assert(requires(const Input& x, const Target& y) {
    x.slice(0, 0, 1);
    y.slice(0, 0, 1);
    { x.shape() } -> std::convertible_to<Shape>;
    { y.shape() } -> std::convertible_to<Shape>;
  }, "tessera: PipelineParallel's Input and Target must be tessera::Tensor types (split along dim 0 into micro-batches).");

 public:
  using Stage = PipelineStage<T, Input>;  ///< the stage interface
  /// Makes stage `stage_index` (called for this rank's stages only).
  using StageFactory = std::function<std::unique_ptr<Stage>(int stage_index)>;

  /// A pipeline over `pp` whose stages are made by `make_stage`, with `loss` on the last stage.
  /// Collective over `pp`: every rank constructs it with the same options (it splits `pp` into
  /// the embedding group and broadcasts the tied parameters). Throws Error naming the values
  /// when the options are invalid (virtual_stages < 1, accumulation_steps < 1, v > 1 without the
  /// interleaved schedule, a stage_ranks list that does not give every rank v stages), when
  /// make_stage returns null, when the last stage does not hold the model's last layer
  /// (PipelineStage::holds_last_layer; on every rank), when a middle stage has tied parameters, or when the first and
  /// last stages' tied parameters differ in number or size.
  PipelineParallel(Comm pp, const StageFactory& make_stage, PipelineLoss<T, Target> loss, PipelineOptions options = {})
      : pp_(std::move(pp)), loss_(std::move(loss)), options_(std::move(options)) {
    p_ = pp_.size();
    rank_ = pp_.rank();
    const int v = options_.virtual_stages;
    TESSERA_EXPECTS(v >= 1, "PipelineParallel: virtual_stages must be >= 1, got ", v);
    TESSERA_EXPECTS(options_.accumulation_steps >= 1, "PipelineParallel: accumulation_steps must be >= 1, got ",
                    options_.accumulation_steps);
    TESSERA_EXPECTS(v == 1 || options_.schedule == PipelineScheduleKind::interleaved_one_f_one_b,
                    "PipelineParallel: virtual_stages = ", v,
                    " needs the interleaved 1F1B schedule; GPipe and 1F1B run one stage per rank");
    placement_ = schedule::Schedule{.name = "placement", .pp_size = p_, .num_microbatches = 1, .virtual_stages = v,
                                    .ticks = {}, .stage_ranks = options_.stage_ranks};
    if (!options_.stage_ranks.empty()) {
      TESSERA_EXPECTS(static_cast<int>(options_.stage_ranks.size()) == p_ * v, "PipelineParallel: stage_ranks has ",
                      options_.stage_ranks.size(), " entries, expected pp_size * virtual_stages = ", p_, " * ", v,
                      " = ", p_ * v);
      std::vector<int> per_rank(static_cast<std::size_t>(p_), 0);
      for (std::size_t s = 0; s < options_.stage_ranks.size(); ++s) {
        const int r = options_.stage_ranks[s];
        TESSERA_EXPECTS(r >= 0 && r < p_, "PipelineParallel: stage_ranks[", s, "] = ", r, " is not a rank of the ",
                        p_, "-rank pipeline");
        ++per_rank[static_cast<std::size_t>(r)];
      }
      for (int r = 0; r < p_; ++r)
        TESSERA_EXPECTS(per_rank[static_cast<std::size_t>(r)] == v, "PipelineParallel: stage_ranks gives rank ", r,
                        " ", per_rank[static_cast<std::size_t>(r)], " stages, expected virtual_stages = ", v);
    }
    num_stages_ = p_ * v;
    TESSERA_EXPECTS(options_.stage_recompute.empty() || static_cast<int>(options_.stage_recompute.size()) == num_stages_,
                    "PipelineParallel: stage_recompute has ", options_.stage_recompute.size(),
                    " entries, expected one per stage: pp_size * virtual_stages = ", num_stages_);
    local_index_.assign(static_cast<std::size_t>(num_stages_), -1);
    for (int s : placement_.stages_of(rank_)) {
      std::unique_ptr<Stage> st = make_stage(s);
      TESSERA_EXPECTS(st != nullptr, "PipelineParallel: make_stage(", s, ") returned no stage");
      local_index_[static_cast<std::size_t>(s)] = static_cast<int>(stages_.size());
      stage_ids_.push_back(s);
      stages_.push_back(std::move(st));
    }
    // The last stage must end the model: a partition into more stages than the pipeline runs
    // would otherwise train a model without its last layers. Collective, so every rank says so.
    int ends = 1;
    if (holds_stage(num_stages_ - 1) && !local_stage(num_stages_ - 1).holds_last_layer()) ends = 0;
    TESSERA_EXPECTS(pp_.all_reduce_value(ends, ReduceOp::min) == 1, "PipelineParallel: the last of its ", num_stages_,
                    " stages (pp_size ", p_, " x virtual_stages ", v, ") does not hold the model's last layer: the model "
                    "is cut into more stages than that (check the partition's stage count)");
    std::set<const void*> seen;
    for (auto& st : stages_)
      for (Parameter<T>& prm : st->parameters())
        if (seen.insert(prm.grad.data()).second) params_.push_back(prm);
    setup_tied();
  }

  PipelineParallel(const PipelineParallel&) = delete;             ///< not copyable (owns stages)
  PipelineParallel& operator=(const PipelineParallel&) = delete;  ///< not copyable
  PipelineParallel(PipelineParallel&&) = delete;                  ///< not movable (parameter lists point into it)
  PipelineParallel& operator=(PipelineParallel&&) = delete;       ///< not movable
  ~PipelineParallel() = default;                                  ///< destroys the stages

  /// One training step over the batch: forward and backward of `num_microbatches`
  /// micro-batches in the order of PipelineOptions::schedule, accumulating into the parameters'
  /// gradients. Returns the step's loss (mean over its valid targets, or the sum), the same on
  /// every rank. `inputs` (B, ...) is read only on the rank of stage 0 and `targets` (B, ...)
  /// only on the rank of the last stage; other ranks may pass empty tensors. When the step
  /// closes an accumulation window the gradients are final (normalized, tied copies summed).
  /// Collective over pp: every rank calls it with the same num_microbatches. Throws Error when
  /// B < num_microbatches (naming both), when targets hold another batch size than inputs,
  /// when the ranks disagree on num_microbatches, or what the schedule's options throw.
  T step(const Input& inputs, const Target& targets, int num_microbatches) {
    if (!kind_cache_ || kind_cache_m_ != num_microbatches) {
      kind_cache_ = std::make_unique<schedule::Schedule>(build_kind(num_microbatches));
      kind_cache_m_ = num_microbatches;
    }
    return run_step(*kind_cache_, inputs, targets);
  }

  /// One training step in the order of `builder`'s schedule (GPipe{...}, OneFOneB{...},
  /// InterleavedOneFOneB{...}, or a hand-written schedule::Schedule), built for pp.size() ranks
  /// and checked with schedule::check: a schedule that can deadlock or is incomplete is
  /// rejected with the checker's message before anything runs. Its placement must match this
  /// pipeline's (v stages per rank at the same ranks). Otherwise as step(inputs, targets, m).
  /// Collective over pp.
  template <schedule::ScheduleBuilder B>
  T step(const Input& inputs, const Target& targets, const B& builder) {
    return run_step(schedule::Schedule(builder.build(p_)), inputs, targets);
  }

  /// The BatchPosition of the next step's rows (read by Dropout through the thread's
  /// BatchPosition; micro-batch k's first row is at.first_row plus the rows before it). Without
  /// it a step takes {step: the number of accumulation windows closed so far, first_row:
  /// replica x B x accumulation_steps + the rows of the window's earlier steps} (B this step's
  /// batch): replicas' rows follow each other in the global batch, as DistributedSampler splits
  /// it. Local; every rank of the pipeline sets the same.
  /// Throws tessera::Error naming it when at.first_row is negative.
  void set_batch_position(const BatchPosition& at) {
    TESSERA_EXPECTS(at.first_row >= 0, "PipelineParallel::set_batch_position: first_row ", at.first_row,
                    " is negative (the global batch row of the step's first row)");
    next_position_ = at;
  }
  /// The index of this pipeline among the dp replicas (Hybrid sets it): the default
  /// BatchPosition's replica. Local.
  void set_replica(int index) { replica_ = index; }
  /// The BatchPosition of the last step's first row.
  const BatchPosition& batch_position() const noexcept { return position_; }

  /// A step without data, for a pipeline whose data ran out while other dp replicas still have
  /// some (Hybrid::skip_forward_backward): no forward or backward and no transfers; the
  /// gradients keep what they hold (zero after zero_grad), the accumulation window advances,
  /// and when it closes the tied copies' gradients are summed and normalized as by step().
  /// Returns 0. Collective over pp (every rank of it skips together).
  T skip_step() {
    stats_ = PipelineStepStats{};
    stats_.schedule = "skipped (no data)";
    close_step(0.0, 0);
    return T{0};
  }

  /// Forward only, without micro-batches, contexts or gradients (evaluation and generation):
  /// stage after stage, each stage's rank runs it on the whole batch and sends its output to
  /// the next stage's rank. Returns the last stage's output (e.g. logits (B, T, V)), the same on
  /// every rank of pp (broadcast from the last stage's rank). `inputs` is read only on the rank
  /// of stage 0. Collective over pp (a shape broadcast per stage, a send per stage boundary
  /// between ranks, one broadcast of the output). A stage that throws makes every rank throw:
  /// its own rank the stage's error, the others tessera::Error naming the stage and rank.
  Tensor<T> forward_only(const Input& inputs) {
    const BatchPositionScope evaluation(BatchPosition{.training = false});  // no dropout
    Tensor<T> x;
    for (int s = 0; s < num_stages_; ++s) {
      const int owner = placement_.rank_of(s);
      std::vector<std::int64_t> shape(shape_fields, 0);
      std::exception_ptr error;
      if (owner == rank_) {
        try {
          StageOutput<T> out = s == 0 ? local_stage(s).forward_first(inputs) : local_stage(s).forward(x);
          x = out.output.contiguous();
          encode(x.shape(), shape.data());
        } catch (...) {
          error = std::current_exception();
          shape[0] = -1;
        }
      }
      pp_.broadcast(shape, owner);
      if (error) std::rethrow_exception(error);
      TESSERA_EXPECTS(shape[0] >= 0, "PipelineParallel::forward_only: stage ", s, " (on rank ", owner,
                      ") failed; rank ", owner, " reports why");
      const Shape out_shape = decode(shape.data());
      if (s + 1 < num_stages_) {
        const int next = placement_.rank_of(s + 1);
        if (next == owner) continue;
        if (rank_ == owner) pp_.send(std::span<const T>(x.span()), next, /*tag=*/s);
        if (rank_ == next) {
          x = Tensor<T>::empty(out_shape);
          pp_.recv(x.span(), owner, /*tag=*/s);
        }
      } else {
        if (rank_ != owner) x = Tensor<T>::empty(out_shape);
        pp_.broadcast(x.span(), owner);
      }
    }
    return x;
  }

  /// Sets every gradient of this rank's parameters to zero and starts a new accumulation
  /// window. Local.
  void zero_grad() {
    params_.zero_grad();
    window_sum_ = 0;
    window_count_ = 0;
    window_steps_ = 0;
  }

  /// This rank's parameters (of all its stages), each once; a last stage's copy of a tied
  /// weight is included (it is updated like the original). The list stays valid while the
  /// pipeline lives.
  const ParameterList<T>& parameters() const noexcept { return params_; }

  /// This rank's gradients as clipping sees them (optim::clip_grad_norm): every parameter's,
  /// a last stage's copy of a tied weight not counted (the first stage counts it), summed over
  /// pp. Local (the clipping that takes them is collective over pp).
  optim::Gradients<T> gradients() const {
    std::set<const void*> skip;
    if (last_tied_is_copy())
      for (Parameter<T>& prm : local_stage(num_stages_ - 1).tied_parameters()) skip.insert(prm.grad.data());
    optim::Gradients<T> g{{}, pp_};
    for (Parameter<T>& prm : params_) g.pieces.push_back({prm.grad, !skip.count(prm.grad.data())});
    return g;
  }

  /// The global L2 norm of the gradients of all pipeline ranks, counting a tied weight once.
  /// Collective over pp (one all_reduce of a double).
  double grad_norm() { return optim::grad_norm(gradients()); }

  /// Scales all gradients by min(1, max_norm / (grad_norm() + 1e-6)) (torch's
  /// clip_grad_norm_, through optim::clip_grad_norm) and returns the norm before clipping.
  /// Collective over pp. Throws Error for a negative max_norm.
  double clip_grad_norm(double max_norm) { return optim::clip_grad_norm(gradients(), max_norm); }

  /// The timeline of the last step, all ranks' events (gathered with two all_gathers).
  /// Collective over pp. Throws Error if no step was recorded (record_timeline off, or before
  /// the first step).
  schedule::Timeline timeline() {
    TESSERA_EXPECTS(recorder_.has_value(), "PipelineParallel::timeline: no step has been recorded",
                    options_.record_timeline ? "" : " (PipelineOptions::record_timeline is off)");
    return recorder_->gather(pp_, last_description_);
  }

  /// What the last step did on this rank.
  const PipelineStepStats& last_step() const noexcept { return stats_; }
  /// The loss of the last closed accumulation window: its summed loss over its count of valid
  /// targets (mean normalization) or the sum, the same on every rank.
  double accumulated_loss() const noexcept { return accumulated_loss_; }
  /// The number of valid targets of the last closed accumulation window.
  std::int64_t accumulated_num_valid() const noexcept { return accumulated_count_; }

  /// Number of stages, pp.size() * virtual_stages.
  int num_stages() const noexcept { return num_stages_; }
  /// The pipeline communicator's size (p).
  int pp_size() const noexcept { return p_; }
  /// The global indices of this rank's stages, ascending (one per model chunk).
  const std::vector<int>& stage_indices() const noexcept { return stage_ids_; }
  /// Whether this rank holds stage `stage_index`.
  bool holds_stage(int stage_index) const noexcept {
    return stage_index >= 0 && stage_index < num_stages_ && local_index_[static_cast<std::size_t>(stage_index)] >= 0;
  }
  /// This rank's stage `stage_index`. Throws Error if another rank holds it.
  Stage& stage(int stage_index) { return local_stage(stage_index); }
  /// The rank holding `stage_index` (schedule::Schedule's placement).
  int rank_of(int stage_index) const { return placement_.rank_of(stage_index); }
  /// The options.
  const PipelineOptions& options() const noexcept { return options_; }
  /// The pipeline communicator.
  const Comm& comm() const noexcept { return pp_; }

 private:
  // ---- construction helpers -------------------------------------------------------------------
  Stage& local_stage(int s) const {
    TESSERA_EXPECTS(s >= 0 && s < num_stages_ && local_index_[static_cast<std::size_t>(s)] >= 0, "PipelineParallel: stage ",
                    s, " is not held by rank ", rank_, " (it lives on rank ", s >= 0 && s < num_stages_ ? placement_.rank_of(s) : -1,
                    ")");
    return *stages_[static_cast<std::size_t>(local_index_[static_cast<std::size_t>(s)])];
  }

  // The last stage's tied parameters are a separate copy (not the same tensors as stage 0's).
  bool last_tied_is_copy() const { return num_stages_ > 1 && holds_stage(num_stages_ - 1); }

  // Megatron-LM's embedding group: the ranks of the first and the last stage.
  void setup_tied() {
    const int first = placement_.rank_of(0), last = placement_.rank_of(num_stages_ - 1);
    for (int s = 1; s + 1 < num_stages_; ++s)
      if (holds_stage(s))
        TESSERA_EXPECTS(local_stage(s).tied_parameters().empty(), "PipelineParallel: stage ", s, " ('",
                        local_stage(s).name(), "') has tied parameters; only the first and the last stage may");
    if (num_stages_ == 1) {
      TESSERA_EXPECTS(local_stage(0).tied_parameters().empty(), "PipelineParallel: a single stage ('", local_stage(0).name(),
                      "') must share a tied weight, not hold two copies");
      return;
    }
    if (first == last) {
      if (!holds_stage(0)) return;
      ParameterList<T> a = local_stage(0).tied_parameters(), b = local_stage(num_stages_ - 1).tied_parameters();
      check_tied_sizes(sizes_of(a), sizes_of(b));
      for (std::size_t i = 0; i < a.size(); ++i) b[i].value.copy_from(a[i].value);
      return;
    }
    const bool member = rank_ == first || rank_ == last;
    embedding_group_ = pp_.split(member ? 0 : 1, rank_);
    if (!member) return;
    ParameterList<T> mine = local_stage(rank_ == first ? 0 : num_stages_ - 1).tied_parameters();
    // Both ends must list the same number of tensors of the same sizes.
    const std::vector<std::int64_t> own = sizes_of(mine);
    std::vector<std::int64_t> counts(2);
    embedding_group_.all_gather(std::vector<std::int64_t>{static_cast<std::int64_t>(own.size())}, counts);
    const std::size_t most = static_cast<std::size_t>(std::max(counts[0], counts[1]));
    std::vector<std::int64_t> padded(most, -1), both(2 * most);
    std::copy(own.begin(), own.end(), padded.begin());
    if (most > 0) embedding_group_.all_gather(padded, both);
    const int first_g = first < last ? 0 : 1;
    auto list = [&](int g) {
      std::vector<std::int64_t> out;
      for (std::size_t i = 0; i < static_cast<std::size_t>(counts[static_cast<std::size_t>(g)]); ++i)
        out.push_back(both[static_cast<std::size_t>(g) * most + i]);
      return out;
    };
    check_tied_sizes(list(first_g), list(1 - first_g));
    for (Parameter<T>& prm : mine) embedding_group_.broadcast(prm.value.span(), first_g);
    tied_ = std::move(mine);
  }
  static std::vector<std::int64_t> sizes_of(const ParameterList<T>& ps) {
    std::vector<std::int64_t> out;
    for (const Parameter<T>& prm : ps) {
      TESSERA_EXPECTS(prm.value.is_contiguous() && prm.grad.is_contiguous(), "PipelineParallel: tied parameter ",
                      prm.name, " must be contiguous");
      out.push_back(prm.value.numel());
    }
    return out;
  }
  void check_tied_sizes(const std::vector<std::int64_t>& first, const std::vector<std::int64_t>& last) const {
    TESSERA_EXPECTS(first.size() == last.size(), "PipelineParallel: the first stage has ", first.size(),
                    " tied parameters but the last stage ", last.size());
    for (std::size_t i = 0; i < first.size(); ++i)
      TESSERA_EXPECTS(first[i] == last[i], "PipelineParallel: tied parameter ", i, " has ", first[i],
                      " elements on the first stage but ", last[i], " on the last stage");
  }

  // Sums the tied copies' gradients (first + last), leaving both bitwise equal.
  void sync_tied_grads() {
    if (num_stages_ == 1) return;
    const int first = placement_.rank_of(0), last = placement_.rank_of(num_stages_ - 1);
    if (first == last) {
      if (!holds_stage(0)) return;
      ParameterList<T> a = local_stage(0).tied_parameters(), b = local_stage(num_stages_ - 1).tied_parameters();
      for (std::size_t i = 0; i < a.size(); ++i) {
        a[i].grad.add_(b[i].grad);
        b[i].grad.copy_from(a[i].grad);
      }
      return;
    }
    for (Parameter<T>& prm : tied_) embedding_group_.all_reduce(prm.grad.span(), ReduceOp::sum);
  }

  // ---- schedules ------------------------------------------------------------------------------
  schedule::Schedule build_kind(int m) const {
    switch (options_.schedule) {
      case PipelineScheduleKind::gpipe: return schedule::GPipe{.num_microbatches = m}.build(p_);
      case PipelineScheduleKind::one_f_one_b: return schedule::OneFOneB{.num_microbatches = m}.build(p_);
      case PipelineScheduleKind::zero_bubble_h1: return schedule::ZeroBubbleH1{.num_microbatches = m}.build(p_);
      case PipelineScheduleKind::interleaved_one_f_one_b: break;
    }
    schedule::Schedule s = schedule::InterleavedOneFOneB{.num_microbatches = m,
                                                         .virtual_stages = options_.virtual_stages,
                                                         .microbatch_group_size = options_.microbatch_group_size}
                               .build(p_);
    s.stage_ranks = options_.stage_ranks;
    return s;
  }

  static bool same_schedule(const schedule::Schedule& a, const schedule::Schedule& b) {
    return a.name == b.name && a.pp_size == b.pp_size && a.num_microbatches == b.num_microbatches &&
           a.virtual_stages == b.virtual_stages && a.stage_ranks == b.stage_ranks && a.ticks == b.ticks;
  }

  // Validates `s` against this pipeline and checks it (cached for the last schedule).
  const schedule::CheckReport& checked(const schedule::Schedule& s) {
    if (checked_schedule_ && same_schedule(*checked_schedule_, s)) return report_;
    TESSERA_EXPECTS(s.pp_size == p_, "PipelineParallel: schedule '", s.description(), "' is for ", s.pp_size,
                    " ranks, but the pipeline has ", p_);
    TESSERA_EXPECTS(s.virtual_stages == options_.virtual_stages, "PipelineParallel: schedule '", s.description(),
                    "' runs ", s.virtual_stages, " model chunks per rank, but this pipeline holds ",
                    options_.virtual_stages, " stages per rank (PipelineOptions::virtual_stages)");
    for (int st = 0; st < num_stages_; ++st)
      TESSERA_EXPECTS(s.rank_of(st) == placement_.rank_of(st), "PipelineParallel: schedule '", s.description(),
                      "' places stage ", st, " on rank ", s.rank_of(st), ", but this pipeline holds it on rank ",
                      placement_.rank_of(st));
    report_ = schedule::check(s);
    checked_schedule_ = std::make_unique<schedule::Schedule>(s);
    return report_;
  }

  // ---- one step -------------------------------------------------------------------------------
  static constexpr std::size_t shape_fields = 5;  // rank, 4 extents
  static void encode(const Shape& s, std::int64_t* out) {
    out[0] = s.rank();
    for (int d = 0; d < 4; ++d) out[d + 1] = d < s.rank() ? s[d] : 0;
  }
  static Shape decode(const std::int64_t* in) {
    Index dims{};
    for (int d = 0; d < 4; ++d) dims[static_cast<std::size_t>(d)] = in[d + 1];
    return Shape::from(dims, static_cast<int>(in[0]));
  }

  // Every rank learns the batch size, the input shape and that the arguments agree (one
  // all_reduce of 12 int64, max); every rank throws the same Error otherwise.
  void agree_on_batch(const Input& inputs, const Target& targets, int m) {
    enum : std::size_t { batch, target_batch, m_max, m_min_neg, shape0, inputs_scalar = shape0 + shape_fields,
                         targets_scalar, count };
    std::vector<std::int64_t> info(count, -1);
    info[m_max] = m;
    info[m_min_neg] = -m;
    info[inputs_scalar] = info[targets_scalar] = 0;
    if (holds_stage(0)) {
      if (inputs.rank() >= 1) {
        info[batch] = inputs.size(0);
        encode(inputs.shape(), info.data() + shape0);
      } else {
        info[inputs_scalar] = 1;
      }
    }
    if (holds_stage(num_stages_ - 1)) {
      if (targets.rank() >= 1)
        info[target_batch] = targets.size(0);
      else
        info[targets_scalar] = 1;
    }
    pp_.all_reduce(info, ReduceOp::max);
    TESSERA_EXPECTS(info[m_max] == -info[m_min_neg], "PipelineParallel::step: the ranks of the pipeline were given "
                    "different numbers of micro-batches, from ", -info[m_min_neg], " to ", info[m_max]);
    TESSERA_EXPECTS(info[inputs_scalar] == 0, "PipelineParallel::step: the inputs have no batch dim (a scalar)");
    TESSERA_EXPECTS(info[targets_scalar] == 0, "PipelineParallel::step: the targets have no batch dim (a scalar)");
    const std::int64_t B = info[batch];
    TESSERA_EXPECTS(B >= m, "PipelineParallel::step: a batch of ", B, " samples cannot be split into ", m,
                    " micro-batches; every micro-batch needs at least one sample");
    TESSERA_EXPECTS(info[target_batch] == B, "PipelineParallel::step: the targets hold ", info[target_batch],
                    " samples but the inputs ", B);
    input_shape_ = decode(info.data() + shape0);
    sizes_.assign(static_cast<std::size_t>(m), 0);
    offsets_.assign(static_cast<std::size_t>(m), 0);
    std::int64_t off = 0;
    for (int i = 0; i < m; ++i) {
      sizes_[static_cast<std::size_t>(i)] = B / m + (i < B % m ? 1 : 0);
      offsets_[static_cast<std::size_t>(i)] = off;
      off += sizes_[static_cast<std::size_t>(i)];
    }
  }

  // The output shape of every stage but the last for every micro-batch: stage by stage, its
  // rank computes and broadcasts them (S - 1 broadcasts), unless m and the input shape are
  // those of the last plan. Every rank throws if a stage cannot compute its shape.
  bool plan_shapes(int m) {
    if (plan_m_ == m && plan_input_ == input_shape_) return false;
    plan_m_ = -1;
    const std::size_t um = static_cast<std::size_t>(m);
    plan_.assign(static_cast<std::size_t>(num_stages_ - 1) * um, Shape{});
    for (int s = 0; s + 1 < num_stages_; ++s) {
      const int root = placement_.rank_of(s);
      std::vector<std::int64_t> buf(um * shape_fields, 0);
      std::exception_ptr error;
      if (root == rank_) {
        try {
          for (std::size_t mb = 0; mb < um; ++mb) {
            const Shape in = s == 0 ? input_shape_.with(0, sizes_[mb]) : plan_[static_cast<std::size_t>(s - 1) * um + mb];
            encode(local_stage(s).output_shape(in), buf.data() + mb * shape_fields);
          }
        } catch (...) {
          error = std::current_exception();
          buf[0] = -1;
        }
      }
      pp_.broadcast(buf, root);
      if (error) std::rethrow_exception(error);
      TESSERA_EXPECTS(buf[0] >= 0, "PipelineParallel::step: stage ", s, " (on rank ", root,
                      ") could not compute its output shape; rank ", root, " reports why");
      for (std::size_t mb = 0; mb < um; ++mb)
        plan_[static_cast<std::size_t>(s) * um + mb] = decode(buf.data() + mb * shape_fields);
    }
    plan_m_ = m;
    plan_input_ = input_shape_;
    return true;
  }

  T run_step(const schedule::Schedule& s, const Input& inputs, const Target& targets) {
    const schedule::CheckReport& report = checked(s);
    const int m = s.num_microbatches;
    agree_on_batch(inputs, targets, m);
    std::int64_t rows = 0;
    for (std::int64_t n : sizes_) rows += n;
    position_ = next_position_ ? *next_position_
                               : BatchPosition{.step = windows_closed_,
                                               .first_row = static_cast<std::int64_t>(replica_) * rows *
                                                                options_.accumulation_steps +
                                                            static_cast<std::int64_t>(window_steps_) * rows};
    position_.training = true;
    next_position_.reset();
    stats_ = PipelineStepStats{};
    stats_.shapes_exchanged = plan_shapes(m);
    stats_.schedule = s.description();
    stats_.num_microbatches = m;
    stats_.microbatch_sizes = sizes_;
    stats_.expected_peak_in_flight = report.peak_in_flight[static_cast<std::size_t>(rank_)];
    last_description_ = s.description();

    const std::size_t slots = static_cast<std::size_t>(num_stages_) * static_cast<std::size_t>(m);
    act_.assign(slots, std::nullopt);
    acts_.assign(slots, SlotActivations{});
    activations_.reset();  // the tracker of the thread running the step (this rank's)
    activations_.emplace(MemoryCategory::activations);
    grad_.assign(slots, std::nullopt);
    ctx_.clear();
    ctx_.resize(slots);
    weights_.clear();
    weights_.resize(slots);
    loss_ctx_.clear();
    loss_ctx_.resize(static_cast<std::size_t>(m));
    live_ = 0;
    loss_sum_ = 0;
    m_ = m;
    if (options_.record_timeline)
      recorder_.emplace(schedule::Recorder::synchronized(pp_, s));
    else
      recorder_.reset();

    const auto& ticks = s.ticks[static_cast<std::size_t>(rank_)];
    for (const schedule::Tick& tick : ticks) run_tick(tick, inputs, targets);
    stats_.num_ticks = static_cast<int>(ticks.size());

    // The last stage's rank knows the loss and the count; every rank returns the same values.
    std::vector<double> lc{0.0, 0.0};
    const int last = placement_.rank_of(num_stages_ - 1);
    if (rank_ == last) lc = {loss_sum_, static_cast<double>(loss_.count_valid(targets))};
    pp_.broadcast(lc, last);
    const std::int64_t count = static_cast<std::int64_t>(lc[1]);
    stats_.num_valid = count;
    stats_.loss = normalized(lc[0], count);
    close_step(lc[0], count);
    return static_cast<T>(stats_.loss);
  }

  // Adds a step's summed loss and count to the accumulation window; when the window closes,
  // sums the tied copies' gradients and normalizes. Collective over pp when it closes.
  void close_step(double sum, std::int64_t count) {
    window_sum_ += sum;
    window_count_ += count;
    if (++window_steps_ == options_.accumulation_steps) {
      sync_tied_grads();
      for (int st : stage_ids_) local_stage(st).finish_grad_sync();  // e.g. the dp reduction
      if (options_.loss_normalization == LossNormalization::mean && window_count_ > 0) {
        const T scale = static_cast<T>(1.0 / static_cast<double>(window_count_));
        for (Parameter<T>& prm : params_) prm.grad.scale_(scale);
      }
      accumulated_loss_ = normalized(window_sum_, window_count_);
      accumulated_count_ = window_count_;
      window_sum_ = 0;
      window_count_ = 0;
      window_steps_ = 0;
      ++windows_closed_;
      stats_.grads_final = true;
    }
  }

  double normalized(double sum, std::int64_t count) const {
    if (options_.loss_normalization == LossNormalization::sum) return sum;
    return count > 0 ? sum / static_cast<double>(count) : 0.0;
  }

  std::size_t slot(int stage, int mb) const {
    return static_cast<std::size_t>(stage) * static_cast<std::size_t>(m_) + static_cast<std::size_t>(mb);
  }

  void run_tick(const schedule::Tick& tick, const Input& inputs, const Target& targets) {
    for (const schedule::Action& a : tick) {
      if (a.kind == schedule::ActionKind::forward) timed(a, [&] { forward(a.stage_index, a.microbatch, inputs, targets); });
      if (a.kind == schedule::ActionKind::backward) timed(a, [&] { backward(a.stage_index, a.microbatch, false); });
      if (a.kind == schedule::ActionKind::backward_input)
        timed(a, [&] { backward(a.stage_index, a.microbatch, true); });
      if (a.kind == schedule::ActionKind::backward_weight) timed(a, [&] { backward_weight(a.stage_index, a.microbatch); });
      if (a.is_compute()) track_activations();
    }
    // All transfers of the tick as one batched group, in the listed order.
    std::vector<P2POp> ops;
    std::vector<std::optional<Tensor<T>>*> sent;
    std::vector<std::size_t> sent_outputs;  // slots whose forward output is sent
    for (const schedule::Action& a : tick) {
      if (a.is_compute()) continue;
      const int st = a.stage_index, mb = a.microbatch, tag = a.transfer_tag(m_);
      switch (a.kind) {
        case schedule::ActionKind::send_forward: {
          std::optional<Tensor<T>>& t = act_[slot(st, mb)];
          TESSERA_EXPECTS(t.has_value(), "PipelineParallel: ", schedule::to_string(a), " has no activation to send");
          ops.push_back(P2POp::send(std::span<const T>(t->span()), a.peer, tag));
          sent.push_back(&t);
          sent_outputs.push_back(slot(st, mb));
          break;
        }
        case schedule::ActionKind::send_backward: {
          std::optional<Tensor<T>>& t = grad_[slot(st - 1, mb)];
          TESSERA_EXPECTS(t.has_value(), "PipelineParallel: ", schedule::to_string(a), " has no gradient to send");
          ops.push_back(P2POp::send(std::span<const T>(t->span()), a.peer, tag));
          sent.push_back(&t);
          break;
        }
        case schedule::ActionKind::recv_forward: {
          std::optional<Tensor<T>>& t = act_[slot(st - 1, mb)];
          t = Tensor<T>::empty(plan_[slot(st - 1, mb)]);
          ops.push_back(P2POp::recv(t->span(), a.peer, tag));
          break;
        }
        default: {  // recv_backward
          std::optional<Tensor<T>>& t = grad_[slot(st, mb)];
          t = Tensor<T>::empty(plan_[slot(st, mb)]);
          ops.push_back(P2POp::recv(t->span(), a.peer, tag));
        }
      }
    }
    if (ops.empty()) return;
    const double t0 = recorder_ ? recorder_->now() : 0.0;
    const auto c0 = std::chrono::steady_clock::now();
    pp_.batch_send_recv(ops);
    stats_.transfer_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
    if (recorder_) {
      const double t1 = recorder_->now();
      for (const schedule::Action& a : tick)
        if (a.is_transfer()) recorder_->record(a, t0, t1);
    }
    for (std::optional<Tensor<T>>* t : sent) t->reset();
    for (std::size_t i : sent_outputs) acts_[i].unsent = 0;
    track_activations();
  }

  template <class F>
  void timed(const schedule::Action& a, F&& fn) {
    const auto c0 = std::chrono::steady_clock::now();
    if (recorder_)
      recorder_->time(a, std::forward<F>(fn));
    else
      fn();
    stats_.compute_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
  }

  // What a full-recompute stage keeps from F to B: its input.
  struct FullRecompute {
    std::optional<Input> first;  // stage 0: its micro-batch of the model input (a view)
    Tensor<T> x;                 // other stages: the activation received
  };

  nn::Recompute recompute_of(int st) const {
    return options_.stage_recompute.empty() ? options_.recompute
                                            : options_.stage_recompute[static_cast<std::size_t>(st)];
  }

  void forward(int st, int mb, const Input& inputs, const Target& targets) {
    Stage& stage = local_stage(st);
    const std::size_t umb = static_cast<std::size_t>(mb);
    BatchPosition at = position_;
    at.first_row += offsets_[umb];
    const BatchPositionScope scope(at);
    const nn::Recompute rc = recompute_of(st);
    const nn::SelectiveRecompute selective(rc == nn::Recompute::selective);
    // Everything this forward (and the loss's) allocates is counted in the slot's counter
    // while it lives: what the contexts keep is the micro-batch's activation memory.
    SlotActivations& acc = acts_[slot(st, mb)];
    acc = SlotActivations{.counter = std::make_shared<AllocationCounter>()};
    const AllocationCounter::Scope counting(acc.counter);
    StageOutput<T> out;
    FullRecompute keep;
    Tensor<T> input;  // a received input (allocated before the counter: not counted)
    if (st == 0) {
      const Input x = inputs.slice(0, offsets_[umb], offsets_[umb] + sizes_[umb]);
      out = stage.forward_first(x);
      if (rc == nn::Recompute::full) keep.first = x;
    } else {
      std::optional<Tensor<T>>& in = act_[slot(st - 1, mb)];
      TESSERA_EXPECTS(in.has_value(), "PipelineParallel: F(mb=", mb, ", stage=", st, ") has no input activation");
      const Tensor<T> x = std::move(*in);
      in.reset();
      acts_[slot(st - 1, mb)].unsent = 0;  // a local previous stage's output: now this stage's input
      input = x;
      out = stage.forward(x);
      if (rc == nn::Recompute::full) {
        keep.x = x;
        acc.held_input = x.numel() * static_cast<std::int64_t>(sizeof(T));  // received: not counted above
      }
    }
    if (rc == nn::Recompute::full) out.ctx = StageContext::hold(std::move(keep));  // the layers' contexts go
    if (st == num_stages_ - 1) {
      auto [l, lctx] = loss_.forward(out.output, targets.slice(0, offsets_[umb], offsets_[umb] + sizes_[umb]));
      loss_sum_ += l;
      loss_ctx_[umb] = std::move(lctx);
    } else {
      const Shape& want = plan_[slot(st, mb)];
      TESSERA_EXPECTS(out.output.shape() == want, "PipelineParallel: stage ", st, " ('", stage.name(),
                      "') produced an output of shape ", out.output.shape(), " for micro-batch ", mb,
                      ", but its output_shape() said ", want);
      act_[slot(st, mb)] = out.output.contiguous();
      // The output waits to be sent (or taken by a local next stage): not an activation kept.
      const bool own = !act_[slot(st, mb)]->shares_storage_with(input);
      if (own) acc.unsent = act_[slot(st, mb)]->numel() * static_cast<std::int64_t>(sizeof(T));
    }
    ctx_[slot(st, mb)] = std::move(out.ctx);
    stats_.peak_in_flight = std::max(stats_.peak_in_flight, ++live_);
  }

  // B (split = false) or I (split = true: the weight gradients the stage can defer go to
  // weights_[slot] for the W).
  void backward(int st, int mb, bool split) {
    Stage& stage = local_stage(st);
    Tensor<T> dy;
    if (st == num_stages_ - 1) {
      dy = loss_.backward(T{1}, loss_ctx_[static_cast<std::size_t>(mb)]);
      loss_ctx_[static_cast<std::size_t>(mb)].reset();
    } else {
      std::optional<Tensor<T>>& g = grad_[slot(st, mb)];
      TESSERA_EXPECTS(g.has_value(), "PipelineParallel: B(mb=", mb, ", stage=", st, ") has no output gradient");
      dy = std::move(*g);
      g.reset();
    }
    StageContext& c = ctx_[slot(st, mb)];
    TESSERA_EXPECTS(c.has_value(), "PipelineParallel: B(mb=", mb, ", stage=", st, ") runs before its forward");
    if (recompute_of(st) == nn::Recompute::full) rerun_forward(st, mb, c);
    if (recompute_of(st) == nn::Recompute::full) track_activations();  // the rerun's contexts: this rank's peak
    Tensor<T> dx = split ? stage.backward_input(dy, c, weights_[slot(st, mb)]) : stage.backward(dy, c);
    c.reset();
    if (!split) --live_;
    if (st > 0) {
      const Shape& want = plan_[slot(st - 1, mb)];
      TESSERA_EXPECTS(dx.shape() == want, "PipelineParallel: stage ", st, " ('", stage.name(),
                      "') returned an input gradient of shape ", dx.shape(), " for micro-batch ", mb,
                      ", but its input has shape ", want);
      grad_[slot(st - 1, mb)] = dx.contiguous();
    }
  }

  // Full recomputation: the stage's forward again on its kept input, at the micro-batch's
  // BatchPosition (the same dropout masks), replacing the kept input by the layers' contexts.
  void rerun_forward(int st, int mb, StageContext& c) {
    const auto c0 = std::chrono::steady_clock::now();
    FullRecompute keep = std::move(c.get<FullRecompute>());
    Stage& stage = local_stage(st);
    BatchPosition at = position_;
    at.first_row += offsets_[static_cast<std::size_t>(mb)];
    const BatchPositionScope scope(at);
    SlotActivations& acc = acts_[slot(st, mb)];
    const AllocationCounter::Scope counting(acc.counter);
    StageOutput<T> out = st == 0 ? stage.forward_first(*keep.first) : stage.forward(keep.x);
    c = std::move(out.ctx);
    acc.held_input = 0;  // the rerun's contexts replace the kept input
    ++stats_.recomputed_forwards;
    stats_.recompute_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
  }

  void backward_weight(int st, int mb) {
    Stage& stage = local_stage(st);
    TESSERA_EXPECTS(!ctx_[slot(st, mb)].has_value(), "PipelineParallel: W(mb=", mb, ", stage=", st,
                    ") runs before its I");
    stage.backward_weight(weights_[slot(st, mb)]);
    --live_;
  }

  // Sets this rank's MemoryTracker activations (and the step's peak) to what the slots'
  // counters hold now, less the outputs waiting to be sent, plus kept full-recompute inputs.
  void track_activations() {
    std::int64_t sum = 0;
    for (const SlotActivations& a : acts_)
      if (a.counter) sum += std::max<std::int64_t>(0, a.counter->bytes() - a.unsent) + a.held_input;
    stats_.peak_activation_bytes = std::max(stats_.peak_activation_bytes, sum);
    if (activations_) activations_->set(static_cast<std::size_t>(sum));
  }

  // ---- state ----------------------------------------------------------------------------------
  Comm pp_;
  PipelineLoss<T, Target> loss_;
  PipelineOptions options_;
  int p_ = 1, rank_ = 0, num_stages_ = 1;
  schedule::Schedule placement_;
  std::vector<std::unique_ptr<Stage>> stages_;
  std::vector<int> stage_ids_;
  std::vector<int> local_index_;  // stage -> index into stages_, -1 if not here
  ParameterList<T> params_;
  Comm embedding_group_;
  ParameterList<T> tied_;  // this rank's tied copies (embedding group member)

  std::unique_ptr<schedule::Schedule> kind_cache_;
  int kind_cache_m_ = 0;
  std::unique_ptr<schedule::Schedule> checked_schedule_;
  schedule::CheckReport report_;

  Shape input_shape_;
  std::vector<std::int64_t> sizes_, offsets_;
  std::vector<Shape> plan_;  // [stage][mb] output shapes of stages 0..S-2
  int plan_m_ = -1;
  Shape plan_input_;

  int m_ = 1;
  std::vector<std::optional<Tensor<T>>> act_, grad_;  // [boundary][mb]: activation / gradient between stage b and b+1
  std::vector<StageContext> ctx_;                      // [stage][mb]
  std::vector<nn::WeightGradQueue> weights_;           // [stage][mb]: deferred weight gradients, I to W
  std::vector<StageContext> loss_ctx_;                 // [mb]
  // Activation accounting per (stage, micro-batch) slot: the counter of what its forward
  // allocated (kept to the end of the step: after the micro-batch's backward, or its W, it
  // counts what is still alive, 0 unless something kept a forward tensor), the bytes of its
  // output not yet sent, and a full-recompute stage's kept input (received: not counted).
  struct SlotActivations {
    std::shared_ptr<AllocationCounter> counter;
    std::int64_t unsent = 0;
    std::int64_t held_input = 0;
  };
  std::vector<SlotActivations> acts_;                  // [stage][mb]
  std::optional<MemoryTracker::Entry> activations_;    // this rank's tracker, category activations
  int live_ = 0;
  double loss_sum_ = 0;
  std::optional<schedule::Recorder> recorder_;
  std::string last_description_;
  PipelineStepStats stats_;

  double window_sum_ = 0;
  std::int64_t window_count_ = 0;
  int window_steps_ = 0;
  std::uint64_t windows_closed_ = 0;           // the default BatchPosition's step
  int replica_ = 0;                            // the default BatchPosition's replica
  std::optional<BatchPosition> next_position_;  // set_batch_position's, for the next step
  BatchPosition position_{};                   // the current step's
  double accumulated_loss_ = 0;
  std::int64_t accumulated_count_ = 0;
};

}  // namespace tessera
