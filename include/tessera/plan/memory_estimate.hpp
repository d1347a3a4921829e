#pragma once
/// @file
/// MemoryEstimate: the predicted memory of one device for a layout, by kind, on the pipeline
/// rank that needs the most.

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/plan/bucket_layout.hpp"
#include "tessera/plan/cost_model.hpp"
#include "tessera/plan/layer_activations.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::plan {

/// Predicted bytes on one device, by kind.
struct MemoryEstimate {
  int pp_rank = 0;            ///< the pipeline rank these bytes are for (the fullest one)
  double parameters = 0;      ///< 16-bit weights (sharded over dp under ZeRO-3), bytes
  double gradients = 0;       ///< gradients (sharded over dp under ZeRO-2 and 3), bytes
  double optimizer_state = 0; ///< master weights and moments (sharded over dp under ZeRO 1-3), bytes
  double activations = 0;     ///< activations kept for backward at the schedule's peak, bytes
  double buffers = 0;         ///< logits, p2p buffers, recomputation working set, bytes
  /// Sum of the kinds, bytes.
  double total() const { return parameters + gradients + optimizer_state + activations + buffers; }

  /// The memory of pipeline rank `pp_rank` when it runs `sched` (the layout's schedule;
  /// every F of a stage keeps stage_layers(stage) blocks' LayerActivations until its B, or
  /// until its I, which keeps LayerActivations::weight_pass until its W):
  /// the activation peak is found by walking the rank's compute actions in order, so it is the
  /// schedule's own in-flight count (1F1B's first rank holds p micro-batches, the interleaved
  /// schedule's p (1 + (p-1)/(p v)) stage-equivalents, Korthikanti et al. 2022).
  static MemoryEstimate of_rank(const CostModel& cm, const schedule::Schedule& sched, int pp_rank) {
    const Layout& L = cm.layout;
    const Precision& pr = cm.precision;
    MemoryEstimate m;
    m.pp_rank = pp_rank;
    const double params = cm.rank_parameters(pp_rank);
    m.parameters = params * pr.parameter_bytes / (L.zero_stage >= 3 ? L.dp : 1);
    m.gradients = params * pr.gradient_bytes / (L.zero_stage >= 2 ? L.dp : 1);
    m.optimizer_state = params * pr.optimizer_bytes / (L.zero_stage >= 1 ? L.dp : 1);
    if (cm.model.tessera_block && L.zero_stage == 2 && L.dp > 1) {
      // tessera's ZeRO-2 (ZeroOptimizer, GradBuckets::set_shard_grads): the gradients are the
      // rank's shard (above), but the bucket buffers hold the whole gradient during backward
      // (released after it), and a tied embedding keeps its own full gradient tensor besides;
      // the MemoryTracker counts both as communication buffers (docs/memory.md; tests/plan's
      // plan_zero measures them at pp 1).
      m.buffers += params * pr.gradient_bytes;
      const bool holds_tied = cm.model.tied && (pp_rank == 0 || pp_rank == L.pp - 1);
      if (holds_tied) m.buffers += static_cast<double>(cm.model.vocab) * cm.model.hidden / L.tp * pr.gradient_bytes;
    }
    if (L.zero_stage == 3 && L.dp > 1) {
      // ZeRO-3 (tessera's GradBuckets::set_shard_params, FSDP's FULL_SHARD): besides the 16/N
      // shards above, a unit's parameters are gathered whole while it computes -- with the
      // neighbour unit's gather prefetched meanwhile when the rank holds two or more units --
      // and a unit's whole gradient lives in its bucket buffers during its backward (freed
      // after the reduce-scatter). Both are communication buffers: the largest unit's padded
      // buckets (CostModel::zero3_buckets).
      double largest = 0;
      int units = 0;
      for (int c = 0; c < L.virtual_stages; ++c)
        for (const BucketLayout& u : cm.zero3_buckets(c * L.pp + pp_rank)) {
          largest = std::max(largest, static_cast<double>(u.padded_elements()));
          ++units;
        }
      m.buffers += largest * (units >= 2 ? 2 : 1) * pr.parameter_bytes + largest * pr.gradient_bytes;
    }
    const double per_layer = LayerActivations::of(cm.model, L, pr).bytes();
    const double per_layer_w = LayerActivations::weight_pass(cm.model, L, pr).bytes();
    const double tokens = static_cast<double>(cm.model.seq) * L.microbatch_size;
    // What a stage's split backward keeps from I to W: its blocks' weight_pass, and on the
    // last stage the LM head's input and logits gradient.
    auto weight_pass_bytes = [&](int stage) {
      double w = cm.stage_layers(stage) * per_layer_w;
      if (stage == L.num_stages() - 1)
        w += pr.activation_bytes * tokens * (cm.model.hidden + static_cast<double>(cm.model.vocab) / L.tp);
      return w;
    };
    const double stage_input = LayerActivations::stage_input_bytes(cm.model, L, pr);
    double live = 0, peak = 0;
    for (const schedule::Action& a : sched.compute_order(pp_rank)) {
      const double bytes = cm.stage_layers(a.stage_index) * per_layer + stage_input;
      switch (a.kind) {
        case schedule::ActionKind::forward: live += bytes; break;
        case schedule::ActionKind::backward_input: live += weight_pass_bytes(a.stage_index) - bytes; break;
        case schedule::ActionKind::backward_weight: live -= weight_pass_bytes(a.stage_index); break;
        default: live -= bytes;
      }
      peak = std::max(peak, live);
    }
    m.activations = peak;
    if (pp_rank == L.pp - 1) m.buffers += tokens * cm.model.vocab / L.tp * (pr.activation_bytes + 4.0);
    if (L.pp > 1) m.buffers += 2 * cm.p2p_bytes();
    if (L.recompute != Recompute::none) {
      // The recomputed working set of one micro-batch: one block's (Megatron-LM recomputes
      // block by block), or under tessera's full recomputation its largest stage's blocks
      // (the stage's forward reruns whole before its backward).
      Layout keep_all = L;
      keep_all.recompute = Recompute::none;
      const double block = LayerActivations::of(cm.model, keep_all, pr).bytes() - per_layer;
      int blocks = 1;
      if (cm.model.tessera_block && L.recompute == Recompute::full)
        for (int c = 0; c < L.virtual_stages; ++c) blocks = std::max(blocks, cm.stage_layers(c * L.pp + pp_rank));
      m.buffers += blocks * block;
    }
    return m;
  }

  /// The fullest pipeline rank's memory (see of_rank).
  static MemoryEstimate of(const CostModel& cm, const schedule::Schedule& sched) {
    MemoryEstimate worst = of_rank(cm, sched, 0);
    for (int r = 1; r < cm.layout.pp; ++r) {
      MemoryEstimate m = of_rank(cm, sched, r);
      if (m.total() > worst.total()) worst = m;
    }
    return worst;
  }

  /// One line, e.g. "71.3 GiB on pp rank 0: parameters 7.1, gradients 7.1, optimizer 5.3,
  /// activations 48.0, buffers 3.8": in GiB from 1 GiB up, in MiB below it.
  std::string to_string() const {
    // GiB from 1 GiB up, MiB below it (a small model's memory does not print as 0.0 GiB).
    const bool gib = total() >= 1024.0 * 1024.0 * 1024.0;
    const double g = gib ? 1024.0 * 1024.0 * 1024.0 : 1024.0 * 1024.0;
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "%.1f %s on pp rank %d: parameters %.1f, gradients %.1f, optimizer %.1f, activations %.1f, "
                  "buffers %.1f",
                  total() / g, gib ? "GiB" : "MiB", pp_rank, parameters / g, gradients / g, optimizer_state / g,
                  activations / g, buffers / g);
    return buf;
  }
};

}  // namespace tessera::plan
