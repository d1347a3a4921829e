#pragma once
/// @file
/// TimeEstimate: the predicted time of one training step for a layout, by kind, from a
/// replay of the layout's own pipeline schedule with predicted per-action times.

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <tuple>
#include <string>
#include <vector>

#include "tessera/plan/cost_model.hpp"
#include "tessera/schedule/bubble.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/simulate.hpp"
#include "tessera/schedule/timeline.hpp"

namespace tessera::plan {

/// Predicted seconds of one training step, by kind; total() is the step time.
struct TimeEstimate {
  double compute = 0;             ///< GEMMs and kernels on the busiest pipeline rank, seconds
  double tp_comm = 0;             ///< tensor-parallel collectives on that rank, seconds
  double pp_p2p = 0;              ///< pipeline hand-offs on the critical path, seconds
  double bubble = 0;              ///< pipeline idle time of the busiest rank, seconds
  double dp_comm_exposed = 0;     ///< dp reduction (and tied-embedding sum; ZeRO-3's gathers and reduce-scatters) not hidden, seconds
  double dp_comm_overlapped = 0;  ///< dp reduction hidden behind the last backward, seconds
  double optimizer = 0;           ///< optimizer step, seconds
  /// Waiting for a core, seconds: when a node holds more ranks than cluster.cores_per_node, the
  /// step takes at least the node's work (every rank's busy time) / cores_per_node; this is
  /// what that bound adds to the replay's time (a rank waiting in the bubble gives its core to
  /// the others, so bubbles are absorbed first, unless it polls: Cluster::waiting_core_share).
  /// 0 on accelerators.
  double contention = 0;
  double bubble_ratio = 0;        ///< Megatron's bubble ratio of the replay with free transfers
  long long p2p_messages = 0;     ///< point-to-point sends per step in one pipeline (the schedule's SEND actions)
  double p2p_bytes = 0;           ///< bytes each of those sends carries on one device
  /// dp collective calls one device issues per step, averaged over the pp ranks: one all-reduce
  /// per gradient bucket of each whole stage (ZeRO 1-2: a reduce-scatter and an all-gather), or
  /// ZeRO-3's per-unit gathers and reduce-scatters (CostModel::zero3_traffic); 0 at dp 1.
  double dp_collectives = 0;
  schedule::Timeline timeline{};  ///< the replayed pipeline step (F, B and transfers), seconds

  /// The step time: compute + tp_comm + pp_p2p + bubble + dp_comm_exposed + optimizer + contention.
  double total() const { return compute + tp_comm + pp_p2p + bubble + dp_comm_exposed + optimizer + contention; }

  /// Replays `sched` (the layout's schedule) with CostModel's durations for every F, B, I, W
  /// (stage_forward, stage_backward, stage_backward_input, stage_backward_weight) and
  /// transfer, once with free transfers (the bubble) and once with them (their exposed part),
  /// and adds the dp reduction and the optimizer step after the pipeline flush.
  static TimeEstimate of(const CostModel& cm, const schedule::Schedule& sched) {
    const Layout& L = cm.layout;
    const int S = L.num_stages();
    std::vector<WorkTime> fwd, bwd, bwd_input, bwd_weight;
    for (int s = 0; s < S; ++s) {
      fwd.push_back(cm.stage_forward(s));
      bwd.push_back(cm.stage_backward(s));
      bwd_input.push_back(cm.stage_backward_input(s));
      bwd_weight.push_back(cm.stage_backward_weight(s));
    }
    // The work of one compute action: F, a fused B, or a split backward's I or W.
    auto work_of = [&](const schedule::Action& a) -> const WorkTime& {
      const auto s = static_cast<std::size_t>(a.stage_index);
      switch (a.kind) {
        case schedule::ActionKind::forward: return fwd[s];
        case schedule::ActionKind::backward_input: return bwd_input[s];
        case schedule::ActionKind::backward_weight: return bwd_weight[s];
        default: return bwd[s];
      }
    };
    std::function<double(const schedule::Action&)> duration = [&](const schedule::Action& a) {
      return work_of(a).total();
    };
    std::function<double(const schedule::Action&)> transfer = [&](const schedule::Action& a) {
      return cm.p2p_seconds(sched.rank_of(a.stage_index), a.peer);
    };
    const schedule::Timeline free_run = schedule::simulate(sched, {.t_forward = 0, .t_backward = 0,
                                                                   .duration = duration, .transfer_duration = {}});
    TimeEstimate t;
    t.timeline = schedule::simulate(sched, {.t_forward = 0, .t_backward = 0, .duration = duration,
                                            .transfer_duration = transfer});
    t.timeline.title = L.to_string();
    const schedule::BubbleStats b = schedule::bubble_stats(free_run);
    t.bubble_ratio = b.bubble_ratio;
    int busiest = 0;
    for (int r = 1; r < L.pp; ++r)
      if (b.busy[static_cast<std::size_t>(r)] > b.busy[static_cast<std::size_t>(busiest)]) busiest = r;
    double zero3 = 0;  // ZeRO-3's gathers and reduce-scatters inside the busiest rank's F and B
    for (const schedule::Action& a : sched.compute_order(busiest)) {
      const WorkTime& w = work_of(a);
      t.compute += w.compute;
      t.tp_comm += w.tp_comm;
      zero3 += w.dp_comm;
    }
    t.bubble = std::max(0.0, free_run.span() - (t.compute + t.tp_comm + zero3));
    t.pp_p2p = std::max(0.0, t.timeline.span() - free_run.span());
    for (int r = 0; r < L.pp; ++r)
      for (const schedule::Tick& tick : sched.ticks[static_cast<std::size_t>(r)])
        for (const schedule::Action& a : tick) t.p2p_messages += a.is_send() ? 1 : 0;
    t.p2p_bytes = cm.p2p_bytes();
    if (L.dp > 1) {
      // ZeRO 0-2: DDP's buckets over the whole stage (train_gpt's Hybrid uses per-layer units
      // for ZeRO-3 only).
      CostModel whole = cm;
      whole.layout.zero3_unit_layers = 0;
      for (int r = 0; r < L.pp; ++r) {
        if (L.zero_stage == 3) {
          const CostModel::Zero3Traffic z = cm.zero3_traffic(r);
          t.dp_collectives += static_cast<double>(z.all_gathers + z.reduce_scatters);
          continue;
        }
        for (int c = 0; c < L.virtual_stages; ++c)
          for (const BucketLayout& u : whole.zero3_buckets(c * L.pp + r))
            t.dp_collectives += static_cast<double>(u.padded.size()) * (L.zero_stage >= 1 ? 2 : 1);
      }
      t.dp_collectives /= L.pp;
    }
    // After the flush: each pp rank reduces its gradients over dp (the last backward of its
    // first chunk can hide it when overlapped), the embedding group sums the tied gradient,
    // then the optimizer steps; the slowest rank sets the time.
    for (int r = 0; r < L.pp; ++r) {
      const double reduce = cm.dp_reduce_seconds(r);
      const double hidden = L.overlap_grad_reduce ? std::min(reduce, bwd[static_cast<std::size_t>(r)].total()) : 0.0;
      const bool tied_rank = r == 0 || r == L.pp - 1;
      const double exposed = reduce - hidden + (tied_rank ? cm.tied_embedding_seconds() : 0.0);
      if (exposed + cm.optimizer_seconds(r) > t.dp_comm_exposed + t.optimizer) {
        t.dp_comm_exposed = exposed;
        t.dp_comm_overlapped = hidden;
        t.optimizer = cm.optimizer_seconds(r);
      }
    }
    t.dp_comm_exposed += zero3;
    // Ranks sharing fewer cores (CPU ranks): the node's cores run at most cores_per_node ranks'
    // work at once, so the step lasts at least the node's work / cores (Brent's bound, the
    // replay being the other: max(span, work / cores)). The node's share of the work: every
    // rank's busy time -- its F and B, its dp reduction and tied-embedding sum, its optimizer
    // step -- plus waiting_core_share of the rest of the step (a polling rank keeps its core),
    // times the ranks of the node over the world.
    // The cores are those measured with as many ranks as the node holds (Cluster::cores_for).
    const double cores = cm.cluster.cores_for(cm.ranks_per_node());
    if (cm.cluster.cores_per_node > 0 && cm.ranks_per_node() > cores) {
      const double span = t.total();
      // After the flush every rank reduces and steps at once: the slowest rank's time, or the
      // node's share of all of it over the cores, whichever is longer.
      double after = 0;
      for (int r = 0; r < L.pp; ++r)
        after += cm.dp_reduce_seconds(r) + (r == 0 || r == L.pp - 1 ? cm.tied_embedding_seconds() : 0.0) +
                 cm.optimizer_seconds(r);
      after *= static_cast<double>(L.dp) * L.tp * cm.ranks_per_node() / L.world();
      const double shared = processor_sharing_span(cm, sched, work_of, transfer, cores) +
                            std::max(t.dp_comm_exposed - zero3 + t.optimizer, after / cores);
      double work = 0;
      for (int r = 0; r < L.pp; ++r) {
        double busy = 0;
        for (const schedule::Action& a : sched.compute_order(r)) busy += work_of(a).total();
        const bool tied_rank = r == 0 || r == L.pp - 1;
        busy += cm.dp_reduce_seconds(r) + (tied_rank ? cm.tied_embedding_seconds() : 0.0) + cm.optimizer_seconds(r);
        busy += cm.cluster.waiting_core_share * std::max(0.0, span - busy);
        work += busy * L.dp * L.tp;
      }
      work *= static_cast<double>(cm.ranks_per_node()) / L.world();
      t.contention = std::max(0.0, std::max(shared, work / cores) - span);
    }
    return t;
  }

  /// The pipeline's span when the node's ranks share `cores` cores by time slices (processor
  /// sharing), replayed event by event with the engine's semantics (a tick's compute back to
  /// back, then its transfers, each ending `transfer` seconds after both sides issued it; the
  /// tick ends with its last): while n of the pp ranks compute, each of them progresses at
  /// min(1, cores / wanting) seconds of work per second, wanting = their dp x tp copies on the
  /// node x (n + waiting_core_share x (pp - n)). Brent's bound (the node's work / cores) is what
  /// this gives when every rank always computes; with a pipeline it also slows the critical
  /// path while 3 or 4 ranks compute at once. Throws Error if the replay cannot finish (an
  /// invalid schedule: check() first).
  template <class WorkOf>
  static double processor_sharing_span(const CostModel& cm, const schedule::Schedule& sched, const WorkOf& work_of,
                                       const std::function<double(const schedule::Action&)>& transfer, double cores) {
    const Layout& L = cm.layout;
    const int P = L.pp;
    const double copies = static_cast<double>(L.dp) * L.tp * cm.ranks_per_node() / L.world();
    const double w = cm.cluster.waiting_core_share;
    auto key = [](const schedule::Action& a) { return std::tuple{static_cast<int>(a.kind), a.microbatch, a.stage_index}; };
    std::map<std::tuple<int, int, int>, double> issued_at;
    enum class Phase { next, compute, blocked, timed, done };
    struct Rank {
      std::size_t tick = 0, index = 0;  // position: tick, action within it
      Phase phase = Phase::next;
      double remaining = 0;  // compute: seconds of work left
      double until = 0;      // timed: when the tick's transfers end
      bool issued = false;   // the tick's transfers are issued
    };
    std::vector<Rank> ranks(static_cast<std::size_t>(P));
    double now = 0;
    auto ticks_of = [&](int r) -> const std::vector<schedule::Tick>& { return sched.ticks[static_cast<std::size_t>(r)]; };
    for (;;) {
      // Move every rank that can move without time passing.
      for (bool moved = true; moved;) {
        moved = false;
        for (int r = 0; r < P; ++r) {
          Rank& k = ranks[static_cast<std::size_t>(r)];
          if (k.phase != Phase::next && k.phase != Phase::blocked) continue;
          const auto& ticks = ticks_of(r);
          if (k.tick >= ticks.size()) {
            k.phase = Phase::done;
            continue;
          }
          const schedule::Tick& tick = ticks[k.tick];
          if (k.index < tick.size() && tick[k.index].is_compute()) {
            k.remaining = work_of(tick[k.index]).total();
            k.phase = Phase::compute;
            moved = true;
            continue;
          }
          if (!k.issued) {
            for (const schedule::Action& a : tick)
              if (a.is_transfer()) issued_at[key(a)] = now;
            k.issued = true;
            moved = true;
          }
          double end = now;
          bool complete = true;
          for (const schedule::Action& a : tick) {
            if (!a.is_transfer()) continue;
            const auto it = issued_at.find(key(a.counterpart(r)));
            if (it == issued_at.end()) {
              complete = false;
              break;
            }
            end = std::max(end, std::max(issued_at[key(a)], it->second) + (transfer ? transfer(a) : 0.0));
          }
          if (!complete) {
            k.phase = Phase::blocked;
            continue;
          }
          if (end > now) {
            k.phase = Phase::timed;
            k.until = end;
            continue;
          }
          ++k.tick;
          k.index = 0;
          k.issued = false;
          k.phase = Phase::next;
          moved = true;
        }
      }
      int running = 0, waiting = 0;
      for (const Rank& k : ranks) {
        running += k.phase == Phase::compute ? 1 : 0;
        waiting += k.phase == Phase::blocked || k.phase == Phase::timed ? 1 : 0;
      }
      if (running == 0 && waiting == 0) break;  // every rank done
      const double wanting = copies * (running + w * (P - running));
      const double rate = wanting > cores ? cores / wanting : 1.0;
      double dt = std::numeric_limits<double>::infinity();
      for (const Rank& k : ranks) {
        if (k.phase == Phase::compute) dt = std::min(dt, k.remaining / rate);
        if (k.phase == Phase::timed) dt = std::min(dt, k.until - now);
      }
      TESSERA_EXPECTS(std::isfinite(dt), "TimeEstimate: the processor-sharing replay of ", L.to_string(),
                      " is stuck at ", now, " s (every rank waits for a transfer never issued)");
      now += dt;
      for (Rank& k : ranks) {
        if (k.phase == Phase::compute) {
          k.remaining -= rate * dt;
          if (k.remaining <= 1e-12 * std::max(1.0, now)) {
            ++k.index;
            k.phase = Phase::next;
          }
        } else if (k.phase == Phase::timed && k.until <= now) {
          ++k.tick;
          k.index = 0;
          k.issued = false;
          k.phase = Phase::next;
        }
      }
    }
    return now;
  }

  /// One line in seconds, e.g. "24.100 s: compute 19.000, tp 2.100, p2p 0.300, bubble 1.600,
  /// dp 0.800 (+0.000 hidden), optimizer 0.050" (and ", waiting for a core X" when contention >
  /// 0): 3 decimals from a 0.1 s step up, and 2 significant digits of the step below it
  /// (0.00512 s: 5 decimals), so a small model's figures do not print as 0.000.
  std::string to_string() const {
    const double t = total();
    const int d = t >= 0.1 || !(t > 0) ? 3 : std::min(12, static_cast<int>(std::ceil(-std::log10(t))) + 2);
    char extra[64] = "";
    if (contention > 0) std::snprintf(extra, sizeof extra, ", waiting for a core %.*f", d, contention);
    char buf[480];
    std::snprintf(buf, sizeof buf,
                  "%.*f s: compute %.*f, tp %.*f, p2p %.*f, bubble %.*f, dp %.*f (+%.*f hidden), optimizer %.*f%s", d, t,
                  d, compute, d, tp_comm, d, pp_p2p, d, bubble, d, dp_comm_exposed, d, dp_comm_overlapped, d, optimizer,
                  extra);
    return buf;
  }
};

}  // namespace tessera::plan
