#pragma once
/// @file
/// Implementation detail of schedule::check and schedule::simulate: validates a Schedule
/// statically and then simulates it across all ranks with batched-group semantics.

#include <algorithm>
#include <cstddef>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"
#include "tessera/schedule/schedule.hpp"
#include "tessera/schedule/timeline.hpp"

namespace tessera::schedule::detail {

/// Where an action sits in its rank's list.
struct Loc {
  int rank = -1;  ///< -1: not in the schedule
  int tick = 0;
  int index = 0;
  bool found() const { return rank >= 0; }
  bool before(const Loc& o) const { return tick < o.tick || (tick == o.tick && index < o.index); }
};

/// The result of a simulation.
struct EngineResult {
  std::vector<TimelineEvent> events{};  // compute actions with simulated times
  std::vector<int> peak_in_flight{};    // per rank
  std::vector<int> num_ticks{};         // per rank
};

class Engine {
 public:
  explicit Engine(const Schedule& s) : s_(s) {}

  /// Validates, then simulates; `duration` gives each compute action's length (nullptr: 0),
  /// `transfer_duration` each transfer's (nullptr: 0, and no transfer events are recorded).
  EngineResult run(const std::function<double(const Action&)>* duration,
                   const std::function<double(const Action&)>* transfer_duration = nullptr) {
    check_shape();
    for (int st = 0; st < stages(); ++st) chunks_.push_back(s_.chunk_of(st));
    index_actions();
    check_complete();
    check_pairs();
    check_local_order();
    check_pair_order();
    EngineResult res;
    res.peak_in_flight = peak_in_flight();
    for (const auto& ticks : s_.ticks) res.num_ticks.push_back(static_cast<int>(ticks.size()));
    simulate(duration, transfer_duration, res.events);
    return res;
  }

 private:
  const Schedule& s_;
  std::vector<Loc> loc_;     // [key(kind, mb, stage)]
  std::vector<int> chunks_;  // [stage] -> model chunk on its rank

  std::string who() const { return str("schedule '", s_.description(), "'"); }
  int p() const { return s_.pp_size; }
  int m() const { return s_.num_microbatches; }
  int stages() const { return s_.num_stages(); }
  std::size_t key(ActionKind k, int mb, int stage) const {
    return (static_cast<std::size_t>(stage) * static_cast<std::size_t>(m()) + static_cast<std::size_t>(mb)) *
               static_cast<std::size_t>(num_action_kinds) +
           static_cast<std::size_t>(k);
  }
  const Loc& loc(ActionKind k, int mb, int stage) const { return loc_[key(k, mb, stage)]; }
  const Loc& loc(const Action& a) const { return loc(a.kind, a.microbatch, a.stage_index); }
  const Action& at(const Loc& l) const {
    return s_.ticks[static_cast<std::size_t>(l.rank)][static_cast<std::size_t>(l.tick)][static_cast<std::size_t>(l.index)];
  }
  template <class F>
  void for_each_action(F&& f) const {
    for (int r = 0; r < static_cast<int>(s_.ticks.size()); ++r)
      for (int t = 0; t < static_cast<int>(s_.ticks[static_cast<std::size_t>(r)].size()); ++t) {
        const Tick& tick = s_.ticks[static_cast<std::size_t>(r)][static_cast<std::size_t>(t)];
        for (int i = 0; i < static_cast<int>(tick.size()); ++i) f(tick[static_cast<std::size_t>(i)], Loc{r, t, i});
      }
  }

  void check_shape() const {
    TESSERA_EXPECTS(s_.pp_size >= 1, who(), ": pp_size must be >= 1, got ", s_.pp_size);
    TESSERA_EXPECTS(s_.num_microbatches >= 1, who(), ": num_microbatches must be >= 1, got ", s_.num_microbatches);
    TESSERA_EXPECTS(s_.virtual_stages >= 1, who(), ": virtual_stages must be >= 1, got ", s_.virtual_stages);
    TESSERA_EXPECTS(static_cast<int>(s_.ticks.size()) == s_.pp_size, who(), ": ticks lists ",
                    s_.ticks.size(), " ranks, expected pp_size = ", s_.pp_size);
    if (!s_.stage_ranks.empty()) {
      TESSERA_EXPECTS(static_cast<int>(s_.stage_ranks.size()) == stages(), who(), ": stage_ranks has ",
                      s_.stage_ranks.size(), " entries, expected pp_size * virtual_stages = ", stages());
      std::vector<int> count(static_cast<std::size_t>(p()), 0);
      for (int st = 0; st < stages(); ++st) {
        const int r = s_.stage_ranks[static_cast<std::size_t>(st)];
        TESSERA_EXPECTS(r >= 0 && r < p(), who(), ": stage_ranks[", st, "] = ", r, " is not a rank in [0, ", p(), ")");
        ++count[static_cast<std::size_t>(r)];
      }
      for (int r = 0; r < p(); ++r)
        TESSERA_EXPECTS(count[static_cast<std::size_t>(r)] == s_.virtual_stages, who(), ": rank ", r, " holds ",
                        count[static_cast<std::size_t>(r)], " stages in stage_ranks, expected virtual_stages = ",
                        s_.virtual_stages);
    }
  }

  void index_actions() {
    loc_.assign(static_cast<std::size_t>(stages()) * static_cast<std::size_t>(m()) *
                    static_cast<std::size_t>(num_action_kinds),
                Loc{});
    for_each_action([&](const Action& a, Loc l) {
      auto here = [&] { return str("rank ", l.rank, " tick ", l.tick, ": ", to_string(a)); };
      TESSERA_EXPECTS(a.microbatch >= 0 && a.microbatch < m(), who(), ": ", here(), " has micro-batch ",
                      a.microbatch, " outside [0, ", m(), ")");
      TESSERA_EXPECTS(a.stage_index >= 0 && a.stage_index < stages(), who(), ": ", here(), " has stage ",
                      a.stage_index, " outside [0, ", stages(), ")");
      TESSERA_EXPECTS(s_.rank_of(a.stage_index) == l.rank, who(), ": ", here(), " belongs to stage ", a.stage_index,
                      ", which lives on rank ", s_.rank_of(a.stage_index));
      if (a.is_compute()) {
        TESSERA_EXPECTS(l.index == 0 || at(Loc{l.rank, l.tick, l.index - 1}).is_compute(), who(), ": ", here(),
                        " is listed after a transfer; a tick runs its compute actions first, then its transfers "
                        "as one batched group, so list the compute actions first");
      } else {
        const int ps = a.peer_stage();
        TESSERA_EXPECTS(ps >= 0 && ps < stages(), who(), ": ", here(), " has no peer stage: stage ", a.stage_index,
                        ps < 0 ? " is the first stage" : " is the last stage");
        const int pr = s_.rank_of(ps);
        TESSERA_EXPECTS(pr != l.rank, who(), ": ", here(), " is a transfer to stage ", ps,
                        " on the same rank; stages of one rank hand over data without transfers");
        TESSERA_EXPECTS(a.peer == pr, who(), ": ", here(), " names peer rank ", a.peer, " but stage ", ps,
                        " lives on rank ", pr);
      }
      Loc& slot = loc_[key(a.kind, a.microbatch, a.stage_index)];
      TESSERA_EXPECTS(!slot.found(), who(), ": rank ", l.rank, " does ", to_string(a), " twice, at tick ", slot.tick,
                      " and at tick ", l.tick);
      slot = l;
    });
  }

  // The Loc of the action that produces the gradient of stage st's input for mb: its B, or its
  // I when the backward is split.
  const Loc& input_grad_loc(int mb, int st) const {
    const Loc& b = loc(ActionKind::backward, mb, st);
    return b.found() ? b : loc(ActionKind::backward_input, mb, st);
  }

  void check_complete() const {
    std::vector<std::string> missing;
    for (int st = 0; st < stages(); ++st)
      for (int mb = 0; mb < m(); ++mb) {
        const int r = s_.rank_of(st);
        if (!loc(ActionKind::forward, mb, st).found())
          missing.push_back(str("rank ", r, " never runs ", to_string(Action::forward(mb, st))));
        const bool b = loc(ActionKind::backward, mb, st).found();
        const bool i = loc(ActionKind::backward_input, mb, st).found();
        const bool w = loc(ActionKind::backward_weight, mb, st).found();
        if (b && (i || w))
          missing.push_back(str("rank ", r, " runs both the fused ", to_string(Action::backward(mb, st)),
                                " and the split ", to_string(Action{i ? ActionKind::backward_input
                                                                      : ActionKind::backward_weight, mb, st, -1}),
                                "; a backward is either fused (B) or split (I, then W)"));
        else if (i && !w)
          missing.push_back(str("rank ", r, " runs ", to_string(Action::backward_input(mb, st)), " but never ",
                                to_string(Action::backward_weight(mb, st)),
                                " (the weight gradient of a split backward would be lost)"));
        else if (w && !i)
          missing.push_back(str("rank ", r, " runs ", to_string(Action::backward_weight(mb, st)), " but never ",
                                to_string(Action::backward_input(mb, st)), " (a W needs its I first)"));
        else if (!b && !i)
          missing.push_back(str("rank ", r, " never runs ", to_string(Action::backward(mb, st)),
                                " (or its split I + W)"));
      }
    if (missing.empty()) return;
    std::string msg = str(who(), " is incomplete: ", missing.front());
    for (std::size_t i = 1; i < std::min<std::size_t>(missing.size(), 4); ++i) msg += "; " + missing[i];
    if (missing.size() > 4) msg += str("; and ", missing.size() - 4, " more");
    throw Error(msg);
  }

  void check_pairs() const {
    for_each_action([&](const Action& a, Loc l) {
      if (a.is_compute()) return;
      const Action other = a.counterpart(l.rank);
      if (loc(other).found()) return;
      if (a.is_recv())
        throw Error(str(who(), ": rank ", l.rank, " is stuck at tick ", l.tick, " waiting for ", to_string(a),
                        ", which rank ", a.peer, " never sends (it has no ", to_string(other), ")"));
      throw Error(str(who(), ": rank ", l.rank, " sends ", to_string(a), " at tick ", l.tick, ", but rank ", a.peer,
                      " never receives it (it has no ", to_string(other), "); the send would never complete"));
    });
    // Every hand-off between stages on different ranks must be transferred.
    for (int st = 0; st + 1 < stages(); ++st) {
      if (s_.rank_of(st) == s_.rank_of(st + 1)) continue;
      for (int mb = 0; mb < m(); ++mb) {
        TESSERA_EXPECTS(loc(ActionKind::send_forward, mb, st).found(), who(), " is incomplete: the activation of ",
                        "micro-batch ", mb, " from stage ", st, " (rank ", s_.rank_of(st), ") to stage ", st + 1,
                        " (rank ", s_.rank_of(st + 1), ") is never transferred (no SEND_F / RECV_F)");
        TESSERA_EXPECTS(loc(ActionKind::send_backward, mb, st + 1).found(), who(), " is incomplete: the gradient of ",
                        "micro-batch ", mb, " from stage ", st + 1, " (rank ", s_.rank_of(st + 1), ") to stage ", st,
                        " (rank ", s_.rank_of(st), ") is never transferred (no SEND_B / RECV_B)");
      }
    }
  }

  // "needs X, which rank r runs/receives only at tick t" checks inside one rank.
  void check_local_order() const {
    const std::string rule =
        " (a tick's compute runs before its transfers, so it can only use data received in earlier ticks)";
    for_each_action([&](const Action& a, Loc l) {
      const int st = a.stage_index, mb = a.microbatch;
      auto stuck = [&](const Action& need, const Loc& nl, const char* what, const std::string& why) {
        throw Error(str(who(), ": rank ", l.rank, " is stuck at tick ", l.tick, ": ", to_string(a), " needs ",
                        to_string(need), ", which rank ", l.rank, " ", what, " only at tick ", nl.tick, why));
      };
      switch (a.kind) {
        case ActionKind::forward:
          if (st > 0) {
            if (s_.rank_of(st - 1) == l.rank) {
              const Loc& nl = loc(ActionKind::forward, mb, st - 1);
              if (!nl.before(l)) stuck(at(nl), nl, "runs", "");
            } else {
              const Loc& nl = loc(ActionKind::recv_forward, mb, st);
              if (nl.tick >= l.tick) stuck(at(nl), nl, "receives", rule);
            }
          }
          break;
        case ActionKind::backward_weight: {
          const Loc& il = loc(ActionKind::backward_input, mb, st);
          if (!il.before(l))
            stuck(at(il), il, "runs", " (a W computes the weight gradient from what its I leaves; it must come after it)");
          break;
        }
        case ActionKind::backward:
        case ActionKind::backward_input: {
          const Loc& fl = loc(ActionKind::forward, mb, st);
          if (!fl.before(l)) stuck(at(fl), fl, "runs", "");
          if (st + 1 < stages()) {
            if (s_.rank_of(st + 1) == l.rank) {
              const Loc& nl = input_grad_loc(mb, st + 1);
              if (!nl.before(l)) stuck(at(nl), nl, "runs", "");
            } else {
              const Loc& nl = loc(ActionKind::recv_backward, mb, st);
              if (nl.tick >= l.tick) stuck(at(nl), nl, "receives", rule);
            }
          }
          break;
        }
        case ActionKind::send_forward:
        case ActionKind::send_backward: {
          const Loc& pl = a.kind == ActionKind::send_forward ? loc(ActionKind::forward, mb, st) : input_grad_loc(mb, st);
          if (pl.tick > l.tick) stuck(at(pl), pl, "runs", " (a SEND carries the output of a compute of its own tick or an earlier one)");
          break;
        }
        default: break;
      }
    });
  }

  // Transfers between two ranks must be posted in the same order on both sides (NCCL and MPI
  // without tags match point-to-point operations between a pair of ranks in issue order).
  void check_pair_order() const {
    // Per (sender, receiver): the sends in issue order (ranks' ticks are visited in order).
    std::vector<std::vector<Loc>> sends(static_cast<std::size_t>(p()) * static_cast<std::size_t>(p()));
    for_each_action([&](const Action& x, Loc l) {
      if (x.is_send())
        sends[static_cast<std::size_t>(l.rank) * static_cast<std::size_t>(p()) + static_cast<std::size_t>(x.peer)]
            .push_back(l);
    });
    for (const std::vector<Loc>& list : sends) {
      Loc latest_recv{}, latest_send{};
      for (const Loc& l : list) {
        const Action& x = at(l);
        const Loc rl = loc(x.counterpart(l.rank));
        if (latest_recv.found() && rl.before(latest_recv))
          throw Error(str(who(), ": rank ", l.rank, " sends ", to_string(at(latest_send)), " (tick ", latest_send.tick,
                          ") before ", to_string(x), " (tick ", l.tick, ") to rank ", x.peer, ", but rank ", x.peer,
                          " posts the matching receives in the opposite order (tick ", latest_recv.tick, " and tick ",
                          rl.tick, "); transfers between two ranks are matched in issue order (NCCL), so both "
                          "sides must list them in the same order"));
        latest_recv = rl;
        latest_send = l;
      }
    }
  }

  std::vector<int> peak_in_flight() const {
    std::vector<int> peak(static_cast<std::size_t>(p()), 0);
    for (int r = 0; r < p(); ++r) {
      int live = 0;
      for (const Action& a : s_.compute_order(r)) {
        // A micro-batch is in flight from its F to its B, or to its W when split (W needs what
        // the forward kept: the layers' inputs).
        if (a.kind == ActionKind::backward_input) continue;
        live += a.kind == ActionKind::forward ? 1 : -1;
        peak[static_cast<std::size_t>(r)] = std::max(peak[static_cast<std::size_t>(r)], live);
      }
    }
    return peak;
  }

  // Runs all ranks tick by tick. A rank's tick: compute (durations add up), then its transfers
  // are issued at once; each completes when the peer has issued the counterpart (rendezvous, so
  // a send also waits for its receive, as large NCCL / MPI messages do); the tick ends when its
  // whole group has completed: each transfer starts at the later of its own and its
  // counterpart's issue time and lasts transfer_duration (0 without one); the group ends with
  // its last transfer.
  void simulate(const std::function<double(const Action&)>* duration,
                const std::function<double(const Action&)>* transfer_duration,
                std::vector<TimelineEvent>& events) const {
    const std::size_t np = static_cast<std::size_t>(p());
    std::vector<int> tick(np, 0);
    std::vector<bool> issued(np, false);
    std::vector<double> clock(np, 0.0);
    std::vector<double> issue_time(loc_.size(), -1.0);
    auto ticks_of = [&](int r) -> const std::vector<Tick>& { return s_.ticks[static_cast<std::size_t>(r)]; };
    auto done = [&](int r) { return tick[static_cast<std::size_t>(r)] >= static_cast<int>(ticks_of(r).size()); };
    bool progress = true;
    while (progress) {
      progress = false;
      for (int r = 0; r < p(); ++r) {
        const std::size_t ur = static_cast<std::size_t>(r);
        while (!done(r)) {
          const Tick& t = ticks_of(r)[static_cast<std::size_t>(tick[ur])];
          if (!issued[ur]) {
            for (const Action& a : t) {
              if (a.is_compute()) {
                const double d = duration ? (*duration)(a) : 0.0;
                TESSERA_EXPECTS(d >= 0.0, who(), ": the duration of ", to_string(a), " is negative (", d, ")");
                events.push_back({a, r, chunks_[static_cast<std::size_t>(a.stage_index)], clock[ur], clock[ur] + d});
                clock[ur] += d;
              } else {
                issue_time[key(a.kind, a.microbatch, a.stage_index)] = clock[ur];
              }
            }
            issued[ur] = true;
            progress = true;
          }
          double end = clock[ur];
          bool complete = true;
          for (const Action& a : t) {
            if (a.is_compute()) continue;
            const Action other = a.counterpart(r);
            const double it = issue_time[key(other.kind, other.microbatch, other.stage_index)];
            if (it < 0) {
              complete = false;
              break;
            }
            end = std::max(end, it);
          }
          if (!complete) break;
          if (transfer_duration) {
            double group_end = end;
            for (const Action& a : t) {
              if (a.is_compute()) continue;
              const Action other = a.counterpart(r);
              const double start = std::max(clock[ur], issue_time[key(other.kind, other.microbatch, other.stage_index)]);
              const double d = (*transfer_duration)(a);
              TESSERA_EXPECTS(d >= 0.0, who(), ": the duration of ", to_string(a), " is negative (", d, ")");
              events.push_back({a, r, chunks_[static_cast<std::size_t>(a.stage_index)], start, start + d});
              group_end = std::max(group_end, start + d);
            }
            end = group_end;
          }
          clock[ur] = end;
          ++tick[ur];
          issued[ur] = false;
          progress = true;
        }
      }
    }
    std::vector<std::string> stuck;
    for (int r = 0; r < p(); ++r) {
      if (done(r)) continue;
      const int tr = tick[static_cast<std::size_t>(r)];
      for (const Action& a : ticks_of(r)[static_cast<std::size_t>(tr)]) {
        if (a.is_compute()) continue;
        const Action other = a.counterpart(r);
        if (issue_time[key(other.kind, other.microbatch, other.stage_index)] >= 0) continue;
        const Loc& ol = loc(other);
        const std::string peer_state = str("rank ", a.peer, " posts ", kind_name(other.kind), " only at its tick ",
                                           ol.tick, " and is itself stuck at tick ", tick[static_cast<std::size_t>(a.peer)]);
        if (a.is_recv())
          stuck.push_back(str("rank ", r, " is stuck at tick ", tr, " waiting for ", to_string(a), ": ", peer_state));
        else
          stuck.push_back(str("rank ", r, " is stuck at tick ", tr, " waiting for rank ", a.peer, " to receive ",
                              to_string(a), ": ", peer_state));
      }
    }
    if (stuck.empty()) return;
    std::string msg = str(who(), " deadlocks: ", stuck.front());
    for (std::size_t i = 1; i < stuck.size(); ++i) msg += "; " + stuck[i];
    throw Error(msg);
  }

  template <class... Args>
  static std::string str(Args&&... args) {
    return tessera::detail::str(std::forward<Args>(args)...);
  }
};

}  // namespace tessera::schedule::detail
