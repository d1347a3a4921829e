#pragma once
/// @file
/// Schedule: a pipeline schedule as plain data -- for every pipeline rank, its actions grouped
/// in ticks. The provided schedules (GPipe, OneFOneB, InterleavedOneFOneB, ZeroBubbleH1) build one; a user
/// can write one by hand and pass it to schedule::check.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <string>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"

namespace tessera::schedule {

/// One tick of one rank: what that rank does in one step of the schedule.
///
/// Semantics (what the checker simulates and what an executor must do): first the tick's
/// compute actions (F, B) run in the order listed; then all of the tick's transfers (SEND_F,
/// RECV_F, SEND_B, RECV_B) are issued together as ONE batched group (Comm::batch_isend_irecv,
/// an NCCL group; CASES.md C6) and the tick ends when the whole group has completed. So a SEND
/// may carry the output of a compute action of the same tick, and data received in a tick is
/// used by compute of later ticks only. Compute actions must be listed before transfers.
/// An executor issues the group's transfers in the listed order (NCCL matches the transfers
/// between two ranks in issue order; the checker verifies that both sides agree).
using Tick = std::vector<Action>;

/// A pipeline schedule as data: `ticks[rank][t]` is rank `rank`'s tick t.
///
/// `pp_size` ranks (p in the papers) hold `pp_size * virtual_stages` stages; each rank holds
/// `virtual_stages` model chunks (v; 1 without interleaving). Stage s lives on rank
/// `stage_ranks[s]`, or, when `stage_ranks` is empty, on rank s % pp_size (loop placement, as
/// Megatron-LM and torch.distributed.pipelining place interleaved chunks: chunk c of rank r is
/// stage c * pp_size + r). Every (stage, micro-batch) needs exactly one F and either one B
/// or one I followed by one W (a split backward) on the stage's rank, and every hand-off
/// between stages on different ranks a SEND and a RECV.
///
/// A Schedule is an aggregate: `Schedule{.name = "mine", .pp_size = 2, .num_microbatches = 1,
/// .ticks = {...}}`. Validate it with schedule::check.
struct Schedule {
  std::string name{};                      ///< e.g. "1F1B"; used in titles and error messages
  int pp_size = 1;                       ///< number of pipeline ranks (p)
  int num_microbatches = 1;              ///< micro-batches per step (m)
  int virtual_stages = 1;                ///< model chunks per rank (v); stages = p * v
  std::vector<std::vector<Tick>> ticks{};  ///< [rank][tick]: each rank's ticks in order
  std::vector<int> stage_ranks{};          ///< [stage] -> rank; empty means loop placement

  /// Total number of stages, pp_size * virtual_stages.
  int num_stages() const { return pp_size * virtual_stages; }

  /// The rank holding `stage`. Throws Error if stage is not in [0, num_stages()).
  int rank_of(int stage) const {
    TESSERA_EXPECTS(stage >= 0 && stage < num_stages(), "Schedule '", name, "': stage ", stage,
                    " is outside [0, ", num_stages(), ")");
    if (stage_ranks.empty()) return stage % pp_size;
    TESSERA_EXPECTS(static_cast<int>(stage_ranks.size()) == num_stages(), "Schedule '", name,
                    "': stage_ranks has ", stage_ranks.size(), " entries, expected pp_size * virtual_stages = ",
                    num_stages());
    return stage_ranks[static_cast<std::size_t>(stage)];
  }

  /// The stages held by `rank`, ascending; the position of a stage in this list is its model
  /// chunk index on that rank.
  std::vector<int> stages_of(int rank) const {
    std::vector<int> out;
    for (int s = 0; s < num_stages(); ++s)
      if (rank_of(s) == rank) out.push_back(s);
    return out;
  }

  /// The model chunk index of `stage` on its rank (stage / pp_size under loop placement).
  /// Throws Error if stage is out of range.
  int chunk_of(int stage) const {
    const int r = rank_of(stage);
    if (stage_ranks.empty()) return stage / pp_size;
    int c = 0;
    for (int s = 0; s < stage; ++s)
      if (rank_of(s) == r) ++c;
    return c;
  }

  /// The compute actions (F, B, I, W) of `rank` in execution order, ticks flattened.
  /// Throws Error if rank is out of range.
  std::vector<Action> compute_order(int rank) const {
    TESSERA_EXPECTS(rank >= 0 && rank < static_cast<int>(ticks.size()), "Schedule '", name, "': rank ", rank,
                    " is outside [0, ", ticks.size(), ")");
    std::vector<Action> out;
    for (const Tick& t : ticks[static_cast<std::size_t>(rank)])
      for (const Action& a : t)
        if (a.is_compute()) out.push_back(a);
    return out;
  }

  /// "1F1B (p=4, m=8)" or "Interleaved 1F1B (p=4, v=2, m=8)".
  /// An empty name prints as "schedule".
  std::string description() const {
    const std::string n = name.empty() ? std::string("schedule") : name;
    if (virtual_stages > 1)
      return tessera::detail::str(n, " (p=", pp_size, ", v=", virtual_stages, ", m=", num_microbatches, ")");
    return tessera::detail::str(n, " (p=", pp_size, ", m=", num_microbatches, ")");
  }

  /// Returns this schedule unchanged, so a hand-written Schedule can be passed wherever a
  /// ScheduleBuilder (GPipe, OneFOneB, ...) is expected. Throws Error if `pp` != pp_size.
  Schedule build(int pp) const {
    TESSERA_EXPECTS(pp == pp_size, "Schedule '", name, "' was written for pp_size ", pp_size,
                    " but is used with a pipeline of ", pp, " ranks");
    return *this;
  }
};

/// What a schedule generator offers: `build(pp_size)` returns the Schedule for a pipeline of
/// `pp_size` ranks (the executor passes its pipeline communicator's size). GPipe, OneFOneB,
/// InterleavedOneFOneB, ZeroBubbleH1 and Schedule itself model it.
template <class S>
concept ScheduleBuilder = requires(const S& s, int pp_size) {
  { s.build(pp_size) } -> std::convertible_to<Schedule>;
};

/// A text picture of the schedule, one line per rank, ticks separated by " | ", e.g.
/// "rank 0: F0 SEND_F0 | RECV_B0 | B0 | ..." -- for logs, docs and error reports.
inline std::string to_string(const Schedule& s) {
  std::string out = s.description() + "\n";
  for (std::size_t r = 0; r < s.ticks.size(); ++r) {
    out += tessera::detail::str("rank ", r, ":");
    for (std::size_t t = 0; t < s.ticks[r].size(); ++t) {
      out += t == 0 ? " " : " | ";
      for (std::size_t i = 0; i < s.ticks[r][t].size(); ++i) {
        const Action& a = s.ticks[r][t][i];
        if (i) out += " ";
        out += short_name(a);
        if (s.virtual_stages > 1) out += tessera::detail::str("@", a.stage_index);
      }
    }
    out += "\n";
  }
  return out;
}

}  // namespace tessera::schedule
