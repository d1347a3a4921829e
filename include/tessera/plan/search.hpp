#pragma once
/// @file
/// plan::search: every layout of a world size and global batch, predicted; the fastest that
/// fit in memory ranked, and every other with the reason it was rejected.

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/plan/cluster.hpp"
#include "tessera/plan/layout.hpp"
#include "tessera/plan/model_spec.hpp"
#include "tessera/plan/plan.hpp"
#include "tessera/plan/precision.hpp"

namespace tessera::plan {

/// What plan::search tries. Set with designated initializers:
/// `SearchOptions{.world = 64, .global_batch = 512}`.
struct SearchOptions {
  int world = 1;                                       ///< devices to use, exactly dp * tp * pp
  long long global_batch = 1;                          ///< sequences per step
  std::vector<int> microbatch_sizes{1, 2, 4, 8};       ///< micro-batch sizes to try
  std::vector<int> virtual_stages{1, 2, 3, 4};         ///< v to try (v > 1: interleaved 1F1B)
  std::vector<Recompute> recompute{Recompute::none, Recompute::selective, Recompute::full};  ///< modes to try
  std::vector<int> zero_stages{0, 1};                  ///< ZeRO stages to try
  int zero3_unit_layers = 1;  ///< ZeRO-3's gathered unit for every ZeRO-3 layout (Layout::zero3_unit_layers; 0: a stage)
  /// Bytes of the dp gradient buckets of every layout (Layout::dp_bucket_bytes: Hybrid's
  /// bucket_size, train_gpt's --bucket-mb); ZeRO-3's per-unit messages are counted from it.
  std::size_t dp_bucket_bytes = std::size_t{25} << 20;
  /// Bytes of a unit's first bucket for every layout (Layout::dp_first_bucket_bytes).
  std::size_t dp_first_bucket_bytes = std::size_t{25} << 20;
  bool zero_bubble = true;  ///< also try ZB-H1 (schedule::ZeroBubbleH1) for every pipeline with v = 1 and pp > 1
  bool sequence_parallel = true;                       ///< use sequence parallelism whenever tp > 1
  bool p2p_scatter_gather = false;  ///< Layout::p2p_scatter_gather for every layout (Megatron-LM: true)
  bool overlap_grad_reduce = false;                    ///< whether the dp reduction is overlapped
  std::vector<int> tp_sizes{};                         ///< tp sizes to try; empty: powers of 2 up to a node
  std::vector<int> pp_sizes{};                         ///< pp sizes to try; empty: every divisor
  std::vector<int> dp_sizes{};                         ///< dp sizes to try; empty: every divisor
  /// Called after each layout is predicted, with it and the count predicted so far (e.g. a
  /// progress line: a 1T model at world 512 predicts thousands of layouts); empty: none.
  std::function<void(const Layout&, std::size_t)> on_predicted{};
};

/// A layout the search did not rank, and why.
struct Rejected {
  Layout layout{};       ///< the layout
  std::string reason{};  ///< e.g. "needs 93.2 GiB, the device has 80.0 GiB (activations 61.0 GiB)"
};

/// What plan::search found.
struct SearchResult {
  std::vector<Plan> ranked{};        ///< layouts that fit, fastest first
  std::vector<Rejected> rejected{};  ///< every other layout tried, with its reason

  /// The rejections counted by kind: each reason with its numbers replaced by N (e.g. "pp N
  /// does not divide the N layers" -> 14), in the order of the kinds' text.
  std::map<std::string, int> rejections_by_kind() const {
    std::map<std::string, int> kinds;
    for (const Rejected& r : rejected) {
      std::string kind;
      for (char ch : r.reason)
        if (!std::isdigit(static_cast<unsigned char>(ch)) && ch != '.') kind += ch;
        else if (kind.empty() || kind.back() != 'N') kind += 'N';
      ++kinds[kind];
    }
    return kinds;
  }
};

/// Tries every layout of `opts.world` devices for `opts.global_batch` sequences: dp x tp x pp
/// = world (tp at most a node and dividing the heads, key/value heads and the MLP width; pp
/// dividing the layers), every micro-batch size that divides the batch per replica, 1F1B,
/// ZB-H1 (pp > 1, unless opts.zero_bubble is false) and interleaved 1F1B with each v whose
/// stages divide the layers and whose micro-batch count is a multiple of pp, every
/// recomputation mode and ZeRO stage asked for. Each is predicted
/// with Plan::predict; those that fit are ranked by step time (ties: less memory first), the
/// rest are returned with the reason. Throws Error if world or global_batch is < 1.
inline SearchResult search(const ModelSpec& model, const Cluster& cluster, const SearchOptions& opts,
                           const Precision& precision = {}) {
  model.validate();
  cluster.validate();
  TESSERA_EXPECTS(opts.world >= 1 && opts.global_batch >= 1, "plan::search: world and global_batch must be >= 1, got ",
                  opts.world, " and ", opts.global_batch);
  using tessera::detail::str;
  const double gib = 1024.0 * 1024.0 * 1024.0;
  SearchResult out;
  std::size_t predicted = 0;  // layouts predicted so far (SearchOptions::on_predicted)
  auto divisors = [](int n) {
    std::vector<int> d;
    for (int i = 1; i <= n; ++i)
      if (n % i == 0) d.push_back(i);
    return d;
  };
  std::vector<int> tps = opts.tp_sizes;
  if (tps.empty())
    for (int t = 1; t <= opts.world && t <= cluster.devices_per_node; t *= 2) tps.push_back(t);
  const std::vector<int> pps = opts.pp_sizes.empty() ? divisors(opts.world) : opts.pp_sizes;
  for (int tp : tps)
    for (int pp : pps) {
      const std::int64_t tp_pp = static_cast<std::int64_t>(tp) * pp;  // tp * pp can pass int's range
      if (tp_pp > opts.world || opts.world % tp_pp != 0) continue;
      const int dp = static_cast<int>(opts.world / tp_pp);
      if (!opts.dp_sizes.empty() && std::find(opts.dp_sizes.begin(), opts.dp_sizes.end(), dp) == opts.dp_sizes.end())
        continue;
      Layout base{.dp = dp, .tp = tp, .pp = pp};
      base.sequence_parallel = opts.sequence_parallel && tp > 1;
      base.p2p_scatter_gather = opts.p2p_scatter_gather;
      base.overlap_grad_reduce = opts.overlap_grad_reduce;
      auto reject = [&](const Layout& l, std::string why) { out.rejected.push_back({l, std::move(why)}); };
      if (tp > cluster.devices_per_node) {
        reject(base, str("tp ", tp, " spans nodes of ", cluster.devices_per_node, " devices"));
        continue;
      }
      if (model.heads % tp != 0 || model.num_kv_heads() % tp != 0 || model.ffn_size() % tp != 0) {
        reject(base, str("tp ", tp, " does not divide the heads ", model.heads, ", key/value heads ",
                         model.num_kv_heads(), " and MLP width ", model.ffn_size()));
        continue;
      }
      if (model.layers % pp != 0) {
        reject(base, str("pp ", pp, " does not divide the ", model.layers, " layers"));
        continue;
      }
      if (opts.global_batch % dp != 0) {
        reject(base, str("dp ", dp, " does not divide the global batch ", opts.global_batch));
        continue;
      }
      const long long per_replica = opts.global_batch / dp;
      for (int mbs : opts.microbatch_sizes) {
        Layout lm = base;
        lm.microbatch_size = mbs;
        if (per_replica % mbs != 0) {
          reject(lm, str("micro-batch size ", mbs, " does not divide the ", per_replica, " sequences per replica"));
          continue;
        }
        lm.num_microbatches = static_cast<int>(per_replica / mbs);
        for (int v : opts.virtual_stages) {
          Layout lv = lm;
          lv.virtual_stages = v;
          lv.schedule = v > 1 ? PipelineSchedule::interleaved : PipelineSchedule::one_f_one_b;
          if (v > 1 && pp == 1) continue;  // interleaving needs a pipeline; not a layout
          if (v > 1 && model.layers % (pp * v) != 0) {
            reject(lv, str("pp ", pp, " x v ", v, " = ", pp * v, " stages do not divide the ", model.layers, " layers"));
            continue;
          }
          if (v > 1 && lv.num_microbatches % pp != 0) {
            reject(lv, str("interleaving needs the micro-batch count ", lv.num_microbatches, " to be a multiple of pp ",
                           pp));
            continue;
          }
          if (lv.schedule_units() > Layout::max_schedule_units) {
            reject(lv, str("pp ", pp, " x v ", v, " x ", lv.num_microbatches, " micro-batches = ", lv.schedule_units(),
                           " schedule units, above the planner's limit ", Layout::max_schedule_units));
            continue;
          }
          std::vector<PipelineSchedule> scheds{lv.schedule};
          if (v == 1 && pp > 1 && opts.zero_bubble) scheds.push_back(PipelineSchedule::zero_bubble_h1);
          for (PipelineSchedule sc : scheds)
          for (Recompute rc : opts.recompute)
            for (int z : opts.zero_stages) {
              Layout l = lv;
              l.schedule = sc;
              l.recompute = rc;
              l.zero_stage = z;
              l.zero3_unit_layers = opts.zero3_unit_layers;
              l.dp_bucket_bytes = opts.dp_bucket_bytes;
              l.dp_first_bucket_bytes = opts.dp_first_bucket_bytes;
              if (z > 0 && dp == 1) continue;  // ZeRO over one replica is stage 0
              Plan p = Plan::predict(model, cluster, l, precision);
              if (opts.on_predicted) opts.on_predicted(l, ++predicted);
              if (!p.fits()) {
                const MemoryEstimate& m = p.memory;
                reject(l, str("needs ", m.total() / gib, " GiB on pp rank ", m.pp_rank, ", the device has ",
                              cluster.device_memory / gib, " GiB (activations ", m.activations / gib,
                              " GiB, model state ", (m.parameters + m.gradients + m.optimizer_state) / gib, " GiB)"));
                continue;
              }
              p.time.timeline = {};  // keep the result small; Plan::predict redraws one
              out.ranked.push_back(std::move(p));
            }
        }
      }
    }
  std::stable_sort(out.ranked.begin(), out.ranked.end(), [](const Plan& a, const Plan& b) {
    if (a.time.total() != b.time.total()) return a.time.total() < b.time.total();
    return a.memory.total() < b.memory.total();
  });
  return out;
}

/// The optional mechanisms a layout uses, counted: a ZeRO stage, a pipeline schedule other than
/// 1F1B (interleaved, ZB-H1, GPipe; at pp > 1), recomputation. (Sequence parallelism is not
/// counted: it only splits what tp already synchronizes, and the search turns it on with tp.)
inline int mechanisms(const Layout& l) {
  return (l.zero_stage > 0 ? 1 : 0) + (l.pp > 1 && l.schedule != PipelineSchedule::one_f_one_b ? 1 : 0) +
         (l.recompute != Recompute::none ? 1 : 0);
}

/// Blocking synchronizations one device takes part in per step, on average over the pipeline
/// ranks: its pipeline hand-offs (each SEND of `p` and its RECV, TimeEstimate::p2p_messages
/// spread over pp), its tensor-parallel collectives (CostModel::tp_all_reduces_forward and
/// _backward per block and micro-batch, a recomputed forward's again) and its dp collectives
/// (TimeEstimate::dp_collectives: a call per gradient bucket, two under ZeRO-1/2, ZeRO-3's
/// per-unit gathers and reduce-scatters).
inline double synchronizations(const Plan& p) {
  const Layout& l = p.layout;
  double syncs = 2.0 * static_cast<double>(p.time.p2p_messages) / l.pp + p.time.dp_collectives;
  if (l.tp > 1) {
    const int per_block = CostModel::tp_all_reduces_forward * (l.recompute == Recompute::full ? 2 : 1) +
                          CostModel::tp_all_reduces_backward;
    syncs += static_cast<double>(per_block) * p.model.layers / l.pp * l.num_microbatches;
  }
  return syncs;
}

/// Which ranked layout plan::choose picked, and why, in one sentence.
struct Choice {
  std::size_t index = 0;  ///< into SearchResult::ranked
  std::string reason{};   ///< e.g. "the fastest predicted" or what it was preferred for
};

/// The layout to run from a search's ranking (which must not be empty): among the layouts
/// predicted within `tolerance` (a fraction in [0, 1]) of the fastest, the one with the fewest
/// optional mechanisms (plan::mechanisms); among those, the fewest synchronizations per step
/// (plan::synchronizations); then the fastest. A predicted difference smaller than the planner's
/// own error is not evidence, and what the model leaves out costs layouts with more mechanisms
/// and synchronizations more (a hand-off that waits for a core when ranks outnumber them, ZeRO's
/// gathers as copies on the ranks' own cores: docs/planner.md); so within the tolerance the
/// plainer layout is the safer bet. tolerance 0: the fastest, and among layouts predicted
/// exactly as fast the plainest. Throws Error on an empty ranking or a tolerance outside
/// [0, 1] (NaN included).
inline Choice choose(const SearchResult& r, double tolerance) {
  TESSERA_EXPECTS(!r.ranked.empty(), "plan::choose: the ranking is empty (no layout fits)");
  TESSERA_EXPECTS(tolerance >= 0 && tolerance <= 1, "plan::choose: the tolerance must be in [0, 1], got ", tolerance);
  const double limit = r.ranked.front().time.total() * (1 + tolerance);
  std::size_t best = 0;
  for (std::size_t i = 1; i < r.ranked.size() && r.ranked[i].time.total() <= limit; ++i) {
    const Plan &a = r.ranked[i], &b = r.ranked[best];
    const int ma = mechanisms(a.layout), mb = mechanisms(b.layout);
    const double sa = synchronizations(a), sb = synchronizations(b);
    if (ma < mb || (ma == mb && sa < sb)) best = i;  // equal in both: the faster (earlier) stays
  }
  if (best == 0) return {0, "the fastest predicted"};
  const Plan &c = r.ranked[best], &f = r.ranked.front();
  char why[512];
  std::snprintf(why, sizeof why,
                "predicted %.1f%% slower than the fastest (%s), within the %g%% tolerance, with %d optional "
                "mechanism%s against %d, then %.0f synchronizations per step against %.0f",
                100 * (c.time.total() / f.time.total() - 1), f.layout.to_string().c_str(), 100 * tolerance + 0.0,
                mechanisms(c.layout), mechanisms(c.layout) == 1 ? "" : "s", mechanisms(f.layout), synchronizations(c),
                synchronizations(f));
  return {best, why};
}

}  // namespace tessera::plan
