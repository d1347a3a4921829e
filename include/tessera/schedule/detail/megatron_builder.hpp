#pragma once
/// @file
/// Implementation detail of the provided schedules: turns Megatron-LM style per-rank programs
/// (a sequence of steps, each "compute, then one batched p2p call") into a Schedule, deriving
/// the sends from the computed outputs and the identity of every receive from the order in
/// which the neighbour sends (point-to-point transfers between two ranks match in order).

#include <algorithm>
#include <cstddef>
#include <deque>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/schedule/action.hpp"
#include "tessera/schedule/schedule.hpp"

namespace tessera::schedule::detail {

/// One step of a rank's program: compute actions, then one batched group that sends what they
/// produced and receives `recv_forward` activations from the previous rank and
/// `recv_backward` gradients from the next rank (0 or 1 each).
struct Step {
  std::vector<Action> compute{};
  bool recv_forward = false;
  bool recv_backward = false;
};

/// Builds the Schedule (loop placement) from each rank's steps. Throws Error if the programs do
/// not pair up (a receive with nothing sent to it, or a send nobody receives): that is a bug in
/// the generator, not in user input.
inline Schedule assemble(std::string name, int p, int m, int v, const std::vector<std::vector<Step>>& programs) {
  Schedule s{.name = std::move(name), .pp_size = p, .num_microbatches = m, .virtual_stages = v,
             .ticks = std::vector<std::vector<Tick>>(static_cast<std::size_t>(p)), .stage_ranks = {}};
  const int stages = s.num_stages();
  // Sends in issue order per (sender, receiver, direction: 0 activation, 1 gradient).
  std::map<std::tuple<int, int, int>, std::deque<Action>> sent;
  struct Slot {
    std::size_t tick;
    int direction;
  };
  std::vector<std::vector<Slot>> slots(static_cast<std::size_t>(p));
  for (int r = 0; r < p; ++r) {
    auto& ticks = s.ticks[static_cast<std::size_t>(r)];
    for (const Step& step : programs[static_cast<std::size_t>(r)]) {
      Tick tick = step.compute;
      for (const Action& a : step.compute) {
        if (a.kind == ActionKind::forward && a.stage_index + 1 < stages && s.rank_of(a.stage_index + 1) != r) {
          const int to = s.rank_of(a.stage_index + 1);
          tick.push_back(Action::send_forward(a.microbatch, a.stage_index, to));
          sent[{r, to, 0}].push_back(tick.back());
        }
        if (a.produces_input_grad() && a.stage_index > 0 && s.rank_of(a.stage_index - 1) != r) {
          const int to = s.rank_of(a.stage_index - 1);
          tick.push_back(Action::send_backward(a.microbatch, a.stage_index, to));
          sent[{r, to, 1}].push_back(tick.back());
        }
      }
      const bool any_recv = p > 1 && (step.recv_forward || step.recv_backward);
      if (tick.empty() && !any_recv) continue;
      if (p > 1 && step.recv_forward) slots[static_cast<std::size_t>(r)].push_back({ticks.size(), 0});
      if (p > 1 && step.recv_backward) slots[static_cast<std::size_t>(r)].push_back({ticks.size(), 1});
      ticks.push_back(std::move(tick));
    }
  }
  for (int r = 0; r < p; ++r) {
    for (const Slot& slot : slots[static_cast<std::size_t>(r)]) {
      const int from = slot.direction == 0 ? (r + p - 1) % p : (r + 1) % p;
      auto& queue = sent[{from, r, slot.direction}];
      TESSERA_EXPECTS(!queue.empty(), s.description(), ": internal error, rank ", r, " receives ",
                      slot.direction == 0 ? "an activation" : "a gradient", " from rank ", from,
                      " that is never sent");
      s.ticks[static_cast<std::size_t>(r)][slot.tick].push_back(queue.front().counterpart(from));
      queue.pop_front();
    }
  }
  for (const auto& [key, queue] : sent)
    TESSERA_EXPECTS(queue.empty(), s.description(), ": internal error, rank ", std::get<0>(key), " sends ",
                    to_string(queue.front()), " that rank ", std::get<1>(key), " never receives");
  // Canonical order inside a tick: compute, SEND_F, RECV_F, SEND_B, RECV_B (activations before
  // gradients, so two ranks that exchange both in one group list them in the same order).
  for (auto& ticks : s.ticks)
    for (Tick& t : ticks) {
      auto first_transfer = std::find_if(t.begin(), t.end(), [](const Action& a) { return a.is_transfer(); });
      std::stable_sort(first_transfer, t.end(), [](const Action& a, const Action& b) {
        return static_cast<int>(a.kind) < static_cast<int>(b.kind);
      });
    }
  return s;
}

/// The non-interleaved program of Megatron-LM's forward_backward_pipelining_without_interleaving
/// for rank r of p with m micro-batches and `warmup` warm-up forwards (warmup = m gives GPipe:
/// all forwards, then all backwards).
inline std::vector<Step> non_interleaved_program(int p, int m, int r, int warmup) {
  const bool first = r == 0, last = r == p - 1;
  const int remaining = m - warmup;
  std::vector<Step> out;
  for (int i = 0; i < warmup; ++i) {
    out.push_back({.compute = {}, .recv_forward = !first, .recv_backward = false});  // recv_forward
    out.push_back({.compute = {Action::forward(i, r)}, .recv_forward = false, .recv_backward = false});  // send_forward
  }
  if (remaining > 0) out.push_back({.compute = {}, .recv_forward = !first, .recv_backward = false});
  for (int i = 0; i < remaining; ++i) {
    // forward, then send_forward_recv_backward; backward, then send_backward_recv_forward.
    out.push_back({.compute = {Action::forward(warmup + i, r)}, .recv_forward = false, .recv_backward = !last});
    out.push_back({.compute = {Action::backward(i, r)}, .recv_forward = !first && i != remaining - 1,
                   .recv_backward = false});
  }
  for (int i = remaining; i < m; ++i) {
    out.push_back({.compute = {}, .recv_forward = false, .recv_backward = !last});  // recv_backward
    out.push_back({.compute = {Action::backward(i, r)}, .recv_forward = false, .recv_backward = false});
  }
  return out;
}

}  // namespace tessera::schedule::detail
