#pragma once
/// @file
/// Plan: a layout with its predicted step time and memory on a cluster -- what the planner
/// returns for one layout (Plan::predict) and ranks (plan::search).

#include <string>

#include "tessera/plan/cluster.hpp"
#include "tessera/plan/cost_model.hpp"
#include "tessera/plan/layout.hpp"
#include "tessera/plan/memory_estimate.hpp"
#include "tessera/plan/model_spec.hpp"
#include "tessera/plan/precision.hpp"
#include "tessera/plan/time_estimate.hpp"
#include "tessera/schedule/checker.hpp"

namespace tessera::plan {

/// A layout and what the planner predicts for it.
struct Plan {
  ModelSpec model{};        ///< the model planned for
  Layout layout{};          ///< the layout
  TimeEstimate time{};      ///< predicted step time, by kind
  MemoryEstimate memory{};  ///< predicted memory of the fullest device, by kind
  double device_memory = 0; ///< the cluster's memory per device, bytes

  /// True when the predicted memory fits in the device's.
  bool fits() const { return memory.total() <= device_memory; }
  /// Sequences per second of the whole job: global batch / step time.
  double sequences_per_second() const { return static_cast<double>(layout.global_batch()) / time.total(); }
  /// Model FLOP/s per device (no recomputation counted): 6 * parameters per token for the
  /// weights plus the attention scores (Narayanan et al. 2021's 72-factor form without the
  /// recomputation) over all devices.
  double model_flops_per_device() const {
    const double h = model.hidden, s = model.seq, l = model.layers, V = model.vocab;
    const double flops = 72.0 * static_cast<double>(layout.global_batch()) * s * l * h * h *
                         (1 + s / (6 * h) + V / (12 * l * h));
    return flops / time.total() / layout.world();
  }

  /// Predicts `layout` for `model` on `cluster`: builds the layout's tessera schedule, checks
  /// it (schedule::check), replays it with CostModel's times (TimeEstimate::of) and walks it
  /// for the activation peak (MemoryEstimate::of). Throws Error naming the numbers when the
  /// model, the cluster or the layout is invalid, tp does not divide the heads, the key/value
  /// heads and the MLP width (the search's rule), or the schedule cannot be built (e.g.
  /// interleaving with num_microbatches not a multiple of pp) or fill the stages.
  static Plan predict(const ModelSpec& model, const Cluster& cluster, const Layout& layout,
                      const Precision& precision = {}) {
    model.validate();
    cluster.validate();
    layout.validate();
    TESSERA_EXPECTS(model.heads % layout.tp == 0 && model.num_kv_heads() % layout.tp == 0 &&
                        model.ffn_size() % layout.tp == 0,
                    "Plan: tp ", layout.tp, " does not divide the heads ", model.heads, ", key/value heads ",
                    model.num_kv_heads(), " and MLP width ", model.ffn_size());
    const CostModel cm{.model = model, .cluster = cluster, .layout = layout, .precision = precision};
    // Before the schedule is built: a pipeline of more stages than layers (e.g. pp 10^6) is
    // refused here rather than allocated.
    const long long stages = static_cast<long long>(layout.pp) * layout.virtual_stages;
    TESSERA_EXPECTS(stages <= model.layers, "Plan: ", model.layers, " layers cannot fill ", stages,
                    " pipeline stages (pp ", layout.pp, " x virtual_stages ", layout.virtual_stages, ")");
    const schedule::Schedule sched = layout.build_schedule();
    schedule::check(sched);
    cm.stage_layers(0);  // throws when the layers cannot fill the stages
    return Plan{.model = model,
                .layout = layout,
                .time = TimeEstimate::of(cm, sched),
                .memory = MemoryEstimate::of(cm, sched),
                .device_memory = cluster.device_memory};
  }

  /// Two lines: the layout, then the time and memory breakdowns.
  std::string to_string() const {
    return layout.to_string() + "\n  time   " + time.to_string() + "\n  memory " + memory.to_string() +
           (fits() ? "" : "  DOES NOT FIT");
  }
};

}  // namespace tessera::plan
