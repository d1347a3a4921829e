#pragma once
/// @file
/// walk_step: the bookkeeping of executing one rank's part of a pipeline schedule for one step,
/// apart from what the computations and transfers are, so that an executor over device memory
/// (cuda::DevicePipeline) and a host test run the same walk. For every (stage, micro-batch) it
/// keeps the boundary buffers in flight -- a stage's output until it is sent or handed to this
/// rank's next stage, what was received until the stage consumes it, an input gradient until it
/// is sent or handed back -- and the activation slot each forward holds until its backward (its
/// W pass under a split backward). It follows the tick semantics of schedule.hpp: a tick's
/// compute actions in order, then its transfers as one group, each buffer sent then released.
/// Host code.

#include <algorithm>
#include <cstddef>
#include <map>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::schedule {

/// One transfer of a tick's group as walk_step hands it to the executor: send `buffer` to
/// `peer`, or receive into it from `peer`; `action` is the schedule's.
template <class Buffer>
struct WalkTransfer {
  bool is_send = true;        ///< send (the buffer is read) or receive (written)
  Buffer* buffer = nullptr;   ///< the boundary buffer (owned by the walk)
  int peer = -1;              ///< the other rank
  Action action{};            ///< SEND_F, RECV_F, SEND_B or RECV_B
};

/// Activation slots each model chunk of `rank` needs: the most (stage, micro-batch) pairs of that
/// chunk between their F and their B (or W, under a split backward), at least 1. Throws what
/// Schedule::compute_order throws.
inline std::vector<int> slots_needed(const Schedule& s, int rank) {
  std::vector<int> in_flight(static_cast<std::size_t>(s.virtual_stages), 0), most(in_flight.size(), 1);
  for (const Action& a : s.compute_order(rank)) {
    const auto c = static_cast<std::size_t>(s.chunk_of(a.stage_index));
    if (a.kind == ActionKind::forward) ++in_flight[c];
    if (a.kind == ActionKind::backward || a.kind == ActionKind::backward_weight) --in_flight[c];
    most[c] = std::max(most[c], in_flight[c]);
  }
  return most;
}

/// Whether chunk `chunk` of `rank` runs split backward passes (I and W actions).
inline bool splits_backward(const Schedule& s, int rank, int chunk) {
  for (const Action& a : s.compute_order(rank))
    if (a.kind == ActionKind::backward_input && s.chunk_of(a.stage_index) == chunk) return true;
  return false;
}

/// Per model chunk of `rank`, the micro-batch of its last backward pass (B) in the rank's
/// compute order: the pass after which the chunk's gradients of the step are final, so data
/// parallelism can reduce them while the rest of the step runs (cuda::DevicePipeline's
/// overlap_data_parallel). -1 for a chunk that splits its backward (I and W passes: its weight
/// gradients finish in the W passes) or has no backward. Throws what Schedule::compute_order throws.
inline std::vector<int> last_backward_microbatch(const Schedule& s, int rank) {
  std::vector<int> last(static_cast<std::size_t>(s.virtual_stages), -1);
  for (const Action& a : s.compute_order(rank))
    if (a.kind == ActionKind::backward) last[static_cast<std::size_t>(s.chunk_of(a.stage_index))] = a.microbatch;
  for (int c = 0; c < s.virtual_stages; ++c)
    if (splits_backward(s, rank, c)) last[static_cast<std::size_t>(c)] = -1;
  return last;
}

/// Walks `rank`'s ticks of `s` for one step, calling on `ex`:
/// - `Buffer ex.make(const Action&)`: a new boundary buffer (a stage's output or input gradient,
///   or a receive's);
/// - `ex.forward(const Action& f, int slot, const Buffer* input, Buffer* output)`: F of
///   f.stage_index on f.microbatch in activation slot `slot` of its chunk; `input` the previous
///   stage's output (received, or this rank's own), null on stage 0; `output` null on the last stage;
/// - `ex.backward(const Action& b, int slot, const Buffer* grad_output, Buffer* grad_input)`: B,
///   or a split backward's I (b.kind says); `grad_output` null on the last stage, `grad_input` null
///   on stage 0;
/// - `ex.backward_weight(const Action& w, int slot)`: W;
/// - `ex.exchange(std::vector<WalkTransfer<Buffer>>& group)`: a tick's transfers, in listed order;
/// - `int ex.slots(int chunk)`: the slots of each chunk (slots_needed's, or more).
/// Throws tessera::Error naming the stage and micro-batch when an action needs a buffer that was
/// not computed or received, no slot is free, or buffers or slots are left over at the end (a
/// schedule schedule::check passes never does this).
template <class Buffer, class Executor>
void walk_step(const Schedule& s, int rank, Executor& ex) {
  using Key = std::pair<int, int>;  // (stage, micro-batch)
  const int stages = s.num_stages();
  std::map<Key, Buffer> in_f, out_f, in_b, out_b;
  std::map<Key, int> slot_of;
  std::vector<std::vector<bool>> busy;
  for (int c = 0; c < s.virtual_stages; ++c) busy.emplace_back(static_cast<std::size_t>(ex.slots(c)), false);
  auto found = [](std::map<Key, Buffer>& m, Key k, const char* what) -> Buffer& {
    const auto it = m.find(k);
    TESSERA_EXPECTS(it != m.end(), "pipeline step: ", what, " of stage ", k.first, ", micro-batch ", k.second,
                    " before its buffer was computed or received");
    return it->second;
  };
  auto local = [&](int stage) { return stage >= 0 && stage < stages && s.rank_of(stage) == rank; };
  for (const Tick& tick : s.ticks[static_cast<std::size_t>(rank)]) {
    std::vector<WalkTransfer<Buffer>> group;
    std::vector<std::pair<std::map<Key, Buffer>*, Key>> sent;
    for (const Action& a : tick) {
      const Key key{a.stage_index, a.microbatch};
      const int st = a.stage_index, mb = a.microbatch;
      const auto c = static_cast<std::size_t>(s.chunk_of(st));
      switch (a.kind) {
        case ActionKind::forward: {
          const auto free = std::find(busy[c].begin(), busy[c].end(), false);
          TESSERA_EXPECTS(free != busy[c].end(), "pipeline step: no free activation slot for stage ", st,
                          ", micro-batch ", mb, " (", busy[c].size(), " slots)");
          *free = true;
          const int slot = static_cast<int>(free - busy[c].begin());
          slot_of[key] = slot;
          const Buffer* input = nullptr;
          if (st > 0) input = local(st - 1) ? &found(out_f, {st - 1, mb}, "F") : &found(in_f, key, "F");
          Buffer* output = nullptr;
          if (st < stages - 1) output = &(out_f[key] = ex.make(a));
          ex.forward(a, slot, input, output);
          in_f.erase(key);
          if (local(st - 1)) out_f.erase({st - 1, mb});
          break;
        }
        case ActionKind::backward:
        case ActionKind::backward_input: {
          const Buffer* grad_output = nullptr;
          if (st < stages - 1) grad_output = local(st + 1) ? &found(out_b, {st + 1, mb}, "B") : &found(in_b, key, "B");
          Buffer* grad_input = nullptr;
          if (st > 0) grad_input = &(out_b[key] = ex.make(a));
          const auto it = slot_of.find(key);
          TESSERA_EXPECTS(it != slot_of.end(), "pipeline step: backward of stage ", st, ", micro-batch ", mb,
                          " before its forward");
          const int slot = it->second;
          ex.backward(a, slot, grad_output, grad_input);
          if (a.kind == ActionKind::backward) {  // (an I pass holds the slot until its W)
            busy[c][static_cast<std::size_t>(slot)] = false;
            slot_of.erase(it);
          }
          in_b.erase(key);
          if (local(st + 1)) out_b.erase({st + 1, mb});
          break;
        }
        case ActionKind::backward_weight: {
          const auto it = slot_of.find(key);
          TESSERA_EXPECTS(it != slot_of.end(), "pipeline step: W of stage ", st, ", micro-batch ", mb,
                          " before its forward");
          ex.backward_weight(a, it->second);
          busy[c][static_cast<std::size_t>(it->second)] = false;
          slot_of.erase(it);
          break;
        }
        case ActionKind::send_forward:
          group.push_back({true, &found(out_f, key, "SEND_F"), a.peer, a});
          sent.emplace_back(&out_f, key);
          break;
        case ActionKind::recv_forward:
          group.push_back({false, &(in_f[key] = ex.make(a)), a.peer, a});
          break;
        case ActionKind::send_backward:
          group.push_back({true, &found(out_b, key, "SEND_B"), a.peer, a});
          sent.emplace_back(&out_b, key);
          break;
        case ActionKind::recv_backward:
          group.push_back({false, &(in_b[key] = ex.make(a)), a.peer, a});
          break;
      }
    }
    if (!group.empty()) ex.exchange(group);
    for (auto& [m, k] : sent) m->erase(k);  // sent: back to the executor's pool
  }
  TESSERA_EXPECTS(in_f.empty() && out_f.empty() && in_b.empty() && out_b.empty() && slot_of.empty(),
                  "pipeline step: rank ", rank, " of ", s.description(), " ends with ", in_f.size() + in_b.size(),
                  " received and ", out_f.size() + out_b.size(), " computed boundary buffers unused and ", slot_of.size(),
                  " activation slots held");
}

}  // namespace tessera::schedule
