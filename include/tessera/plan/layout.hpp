#pragma once
/// @file
/// Layout: one way to run a training step -- dp x tp x pp, virtual stages, micro-batching,
/// the pipeline schedule, sequence parallelism, recomputation and ZeRO stage -- and the
/// tessera schedule object it runs.

#include <cstddef>
#include <string>

#include "tessera/core/error.hpp"
#include "tessera/schedule/gpipe.hpp"
#include "tessera/schedule/interleaved_one_f_one_b.hpp"
#include "tessera/schedule/one_f_one_b.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/zero_bubble_h1.hpp"

namespace tessera::plan {

/// Activation recomputation (Korthikanti et al., "Reducing Activation Recomputation in Large
/// Transformer Models", 2022): none; selective (the attention core, softmax and dropout, is
/// recomputed in backward); full (each layer keeps only its input and reruns its forward).
enum class Recompute { none, selective, full };

/// The pipeline schedule a layout runs (tessera::schedule's builders): 1F1B, interleaved 1F1B,
/// GPipe, or ZB-H1 (Qi et al., ICLR 2024: each backward split into its input-gradient pass I
/// and its weight-gradient pass W, the W passes deferred into 1F1B's bubble; v = 1 only).
enum class PipelineSchedule { one_f_one_b, interleaved, gpipe, zero_bubble_h1 };

/// "none", "selective" or "full".
inline const char* to_string(Recompute r) {
  switch (r) {
    case Recompute::none: return "none";
    case Recompute::selective: return "selective";
    case Recompute::full: return "full";
  }
  return "?";
}

/// "1F1B", "interleaved", "GPipe" or "ZB-H1".
inline const char* to_string(PipelineSchedule s) {
  switch (s) {
    case PipelineSchedule::one_f_one_b: return "1F1B";
    case PipelineSchedule::interleaved: return "interleaved";
    case PipelineSchedule::gpipe: return "GPipe";
    case PipelineSchedule::zero_bubble_h1: return "ZB-H1";
  }
  return "?";
}

/// One layout of a training step over dp * tp * pp devices (rank order tp fastest, then dp,
/// then pp, as tessera's Mesh and Megatron-LM). Each of the dp replicas runs
/// num_microbatches micro-batches of microbatch_size sequences per step, so the global batch is
/// dp * microbatch_size * num_microbatches sequences. Set with designated initializers:
/// `Layout{.dp = 8, .tp = 4, .pp = 12, .microbatch_size = 2, .num_microbatches = 128}`.
struct Layout {
  int dp = 1;                  ///< data-parallel replicas
  int tp = 1;                  ///< tensor-parallel size (Megatron-LM column/row parallel)
  int pp = 1;                  ///< pipeline ranks
  int virtual_stages = 1;      ///< model chunks per pipeline rank (v); > 1 needs `interleaved`
  int microbatch_size = 1;     ///< sequences per micro-batch (b)
  int num_microbatches = 1;    ///< micro-batches per step per replica (m)
  PipelineSchedule schedule = PipelineSchedule::one_f_one_b;  ///< pipeline schedule
  bool sequence_parallel = false;      ///< activations outside the tp regions split along the sequence
  /// Pipeline hand-offs split over tp without sequence parallelism: each tp rank sends 1/tp of
  /// the activation and the receiver all-gathers it (Megatron-LM's
  /// scatter_gather_tensors_in_pipeline, on in the published runs of plan/validation). tessera's
  /// Hybrid sends each tp rank's whole activation: false.
  bool p2p_scatter_gather = false;
  Recompute recompute = Recompute::none;  ///< activation recomputation
  int zero_stage = 0;                  ///< ZeRO stage 0-3 over the dp axis
  bool overlap_grad_reduce = false;    ///< dp reduction overlapped with the last backward
  /// ZeRO-3's unit of gathering (FSDP's wrapped module): runs of this many layers of a stage
  /// whose parameters are all-gathered together before each forward and backward and freed
  /// after (Hybrid's HybridOptions::unit_layers); the embedding (first stage) and the head with
  /// the final LayerNorm (last stage) are layers of their stage, as SequentialModel lists them;
  /// 0: a whole pipeline stage (train_gpt's default).
  int zero3_unit_layers = 1;
  /// Bytes of the dp gradient buckets (each unit's buckets; GradBuckets): Hybrid's bucket_size,
  /// 25 MiB, as train_gpt runs.
  std::size_t dp_bucket_bytes = std::size_t{25} << 20;
  /// Bytes of a unit's first bucket: Hybrid's DataParallelStage uses dp_bucket_bytes for it
  /// too; a plain DataParallel's default is 1 MiB (DDP's first bucket).
  std::size_t dp_first_bucket_bytes = std::size_t{25} << 20;

  /// Devices used, dp * tp * pp.
  int world() const { return dp * tp * pp; }
  /// Sequences per step, dp * microbatch_size * num_microbatches.
  long long global_batch() const { return 1LL * dp * microbatch_size * num_microbatches; }
  /// Pipeline stages, pp * virtual_stages.
  int num_stages() const { return pp * virtual_stages; }

  /// The most (pipeline rank, model chunk, micro-batch) triples, pp x virtual_stages x
  /// num_microbatches, a prediction replays: each is a forward and a backward the replay
  /// simulates and keeps (about 3 us and 1 KB each; 2^20 take ~3 s and ~1 GB). Published runs
  /// stay far below (a 1T model at pp 64, v 2 and 512 micro-batches: 65536).
  static constexpr long long max_schedule_units = 1LL << 20;

  /// Throws Error naming the numbers when a size is < 1, the ZeRO stage is outside 0-3,
  /// virtual_stages > 1 without the interleaved schedule, sequence parallelism without tp, or
  /// pp x virtual_stages x num_microbatches is above max_schedule_units.
  void validate() const {
    TESSERA_EXPECTS(dp >= 1 && tp >= 1 && pp >= 1 && virtual_stages >= 1 && microbatch_size >= 1 &&
                        num_microbatches >= 1,
                    "Layout: dp, tp, pp, virtual_stages, microbatch_size, num_microbatches must be >= 1, got ", dp,
                    ", ", tp, ", ", pp, ", ", virtual_stages, ", ", microbatch_size, ", ", num_microbatches);
    TESSERA_EXPECTS(zero_stage >= 0 && zero_stage <= 3, "Layout: zero_stage must be 0, 1, 2 or 3, got ", zero_stage);
    TESSERA_EXPECTS(zero3_unit_layers >= 0, "Layout: zero3_unit_layers must be >= 0 (0: a whole stage), got ",
                    zero3_unit_layers);
    TESSERA_EXPECTS(virtual_stages == 1 || schedule == PipelineSchedule::interleaved, "Layout: virtual_stages ",
                    virtual_stages, " needs the interleaved schedule, got ", plan::to_string(schedule));
    TESSERA_EXPECTS(!sequence_parallel || tp > 1, "Layout: sequence parallelism needs tp > 1, got tp ", tp);
    TESSERA_EXPECTS(schedule_units() <= max_schedule_units, "Layout: pp ", pp, " x virtual_stages ", virtual_stages,
                    " x ", num_microbatches, " micro-batches = ", schedule_units(),
                    " schedule units to replay, above the planner's limit ", max_schedule_units,
                    " (Layout::max_schedule_units); use fewer, larger micro-batches");
  }

  /// pp x virtual_stages x num_microbatches: the forward/backward pairs a prediction replays.
  long long schedule_units() const { return 1LL * pp * virtual_stages * num_microbatches; }

  /// The tessera schedule this layout runs on its pp ranks: OneFOneB, InterleavedOneFOneB,
  /// GPipe or ZeroBubbleH1 with num_microbatches (and virtual_stages). Throws what validate() and the
  /// builder throw (e.g. interleaving with num_microbatches not a multiple of pp).
  schedule::Schedule build_schedule() const {
    validate();
    switch (schedule) {
      case PipelineSchedule::interleaved:
        return schedule::InterleavedOneFOneB{.num_microbatches = num_microbatches, .virtual_stages = virtual_stages,
                                             .microbatch_group_size = 0}
            .build(pp);
      case PipelineSchedule::gpipe: return schedule::GPipe{.num_microbatches = num_microbatches}.build(pp);
      case PipelineSchedule::zero_bubble_h1:
        return schedule::ZeroBubbleH1{.num_microbatches = num_microbatches}.build(pp);
      default: return schedule::OneFOneB{.num_microbatches = num_microbatches}.build(pp);
    }
  }

  /// One line, e.g. "dp 8 x tp 4 x pp 12, 1F1B, mbs 2 x 128, recompute full, ZeRO-1".
  std::string to_string() const {
    std::string s = tessera::detail::str("dp ", dp, " x tp ", tp, " x pp ", pp, ", ", plan::to_string(schedule));
    if (virtual_stages > 1) s += tessera::detail::str(" v ", virtual_stages);
    s += tessera::detail::str(", mbs ", microbatch_size, " x ", num_microbatches);
    if (sequence_parallel) s += ", SP";
    s += tessera::detail::str(", recompute ", plan::to_string(recompute));
    if (zero_stage > 0) s += tessera::detail::str(", ZeRO-", zero_stage);
    if (zero_stage == 3)
      s += zero3_unit_layers == 0 ? std::string(" (unit: a stage)")
                                  : tessera::detail::str(" (unit: ", zero3_unit_layers, zero3_unit_layers == 1 ? " layer)" : " layers)");
    if (overlap_grad_reduce) s += ", overlapped dp";
    return s;
  }
};

}  // namespace tessera::plan
