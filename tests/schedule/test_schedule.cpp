// Pipeline schedules as data: the provided schedules against hand-written and independently
// computed action lists, the checker's acceptance and rejection messages, peak in-flight
// counts, simulated bubble ratios against the papers' formulas, the Chrome trace and SVG
// outputs, the Recorder, and a tiny executor that runs every schedule on the threads backend.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/schedule/all.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;
using namespace tessera::schedule;

namespace {

static_assert(ScheduleBuilder<GPipe> && ScheduleBuilder<OneFOneB> && ScheduleBuilder<InterleavedOneFOneB> &&
                  ScheduleBuilder<ZeroBubbleH1> && ScheduleBuilder<Schedule>,
              "every provided schedule and Schedule itself must model ScheduleBuilder");

Action F(int mb, int s) { return Action::forward(mb, s); }
Action B(int mb, int s) { return Action::backward(mb, s); }
Action SF(int mb, int s, int peer) { return Action::send_forward(mb, s, peer); }
Action RF(int mb, int s, int peer) { return Action::recv_forward(mb, s, peer); }
Action SB(int mb, int s, int peer) { return Action::send_backward(mb, s, peer); }
Action RB(int mb, int s, int peer) { return Action::recv_backward(mb, s, peer); }
Action I(int mb, int s) { return Action::backward_input(mb, s); }
Action W(int mb, int s) { return Action::backward_weight(mb, s); }

// Megatron-LM's non-interleaved loop (schedules.py), written out serially: the compute order of
// one rank as (kind, micro-batch).
std::vector<Action> megatron_1f1b_order(int p, int m, int r) {
  const int warmup = std::min(p - r - 1, m), remaining = m - warmup;
  std::vector<Action> out;
  for (int i = 0; i < warmup; ++i) out.push_back(F(i, r));
  for (int i = 0; i < remaining; ++i) {
    out.push_back(F(warmup + i, r));
    out.push_back(B(i, r));
  }
  for (int i = remaining; i < m; ++i) out.push_back(B(i, r));
  return out;
}

bool interleaved_options_valid(int p, int m, int group) {
  return group >= p && group <= m && (m % group == 0 || m % group >= p);
}

std::string check_error(const Schedule& s) {
  try {
    check(s);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("OneFOneB: p=4 m=8 ranks 0 and 3 equal Megatron's hand-written action lists, tick by tick") {
  const Schedule s = OneFOneB{.num_microbatches = 8}.build(4);
  REQUIRE(s.pp_size == 4);
  REQUIRE(s.ticks.size() == 4);
  // Rank 0 (first stage): 3 warm-up forwards, 5 steady F/B pairs, 3 cool-down backwards.
  const std::vector<Tick> rank0 = {
      {F(0, 0), SF(0, 0, 1)}, {F(1, 0), SF(1, 0, 1)}, {F(2, 0), SF(2, 0, 1)},
      {F(3, 0), SF(3, 0, 1), RB(0, 0, 1)}, {B(0, 0)},
      {F(4, 0), SF(4, 0, 1), RB(1, 0, 1)}, {B(1, 0)},
      {F(5, 0), SF(5, 0, 1), RB(2, 0, 1)}, {B(2, 0)},
      {F(6, 0), SF(6, 0, 1), RB(3, 0, 1)}, {B(3, 0)},
      {F(7, 0), SF(7, 0, 1), RB(4, 0, 1)}, {B(4, 0)},
      {RB(5, 0, 1)}, {B(5, 0)}, {RB(6, 0, 1)}, {B(6, 0)}, {RB(7, 0, 1)}, {B(7, 0)},
  };
  CHECK(s.ticks[0] == rank0);
  // Rank 3 (last stage): no warm-up; F then B (B's send fused with the next receive).
  std::vector<Tick> rank3 = {{RF(0, 3, 2)}};
  for (int i = 0; i < 8; ++i) {
    rank3.push_back({F(i, 3)});
    if (i < 7)
      rank3.push_back({B(i, 3), RF(i + 1, 3, 2), SB(i, 3, 2)});
    else
      rank3.push_back({B(i, 3), SB(i, 3, 2)});
  }
  CHECK(s.ticks[3] == rank3);
}

TEST_CASE("OneFOneB: every rank's compute order equals Megatron's warm-up/steady/cool-down loop for p 1..8, m 1..16") {
  for (int p = 1; p <= 8; ++p)
    for (int m = 1; m <= 16; ++m) {
      const Schedule s = OneFOneB{.num_microbatches = m}.build(p);
      for (int r = 0; r < p; ++r) {
        CAPTURE(p);
        CAPTURE(m);
        CAPTURE(r);
        REQUIRE(s.compute_order(r) == megatron_1f1b_order(p, m, r));
        CHECK(OneFOneB::num_warmup_microbatches(p, r, m) == std::min(p - r - 1, m));
      }
    }
}

TEST_CASE("GPipe: p=2 m=3 equals the hand-written action lists (all forwards, then all backwards)") {
  const Schedule s = GPipe{.num_microbatches = 3}.build(2);
  const std::vector<Tick> rank0 = {{F(0, 0), SF(0, 0, 1)}, {F(1, 0), SF(1, 0, 1)}, {F(2, 0), SF(2, 0, 1)},
                                   {RB(0, 0, 1)},          {B(0, 0)},              {RB(1, 0, 1)},
                                   {B(1, 0)},              {RB(2, 0, 1)},          {B(2, 0)}};
  const std::vector<Tick> rank1 = {{RF(0, 1, 0)}, {F(0, 1)}, {RF(1, 1, 0)}, {F(1, 1)}, {RF(2, 1, 0)}, {F(2, 1)},
                                   {B(0, 1), SB(0, 1, 0)}, {B(1, 1), SB(1, 1, 0)}, {B(2, 1), SB(2, 1, 0)}};
  CHECK(s.ticks[0] == rank0);
  CHECK(s.ticks[1] == rank1);
  CHECK(s.name == "GPipe");
}

TEST_CASE("InterleavedOneFOneB: p=2 v=2 m=4 runs forwards in Megatron's order 0 1 0 1 2 3 2 3 on every rank") {
  const InterleavedOneFOneB opts{.num_microbatches = 4, .virtual_stages = 2};
  const std::vector<ChunkStep> want = {{0, 0}, {1, 0}, {0, 1}, {1, 1}, {2, 0}, {3, 0}, {2, 1}, {3, 1}};
  CHECK(opts.forward_order(2) == want);
  const Schedule s = opts.build(2);
  CHECK(s.num_stages() == 4);
  for (int r = 0; r < 2; ++r) {
    std::vector<Action> fwd, bwd;
    for (const Action& a : s.compute_order(r)) (a.kind == ActionKind::forward ? fwd : bwd).push_back(a);
    REQUIRE(fwd.size() == 8);
    REQUIRE(bwd.size() == 8);
    for (std::size_t k = 0; k < 8; ++k) {
      CAPTURE(r);
      CAPTURE(k);
      CHECK(fwd[k] == F(want[k].microbatch, want[k].chunk * 2 + r));                // chunk c is stage c*p + r
      CHECK(bwd[k] == B(want[k].microbatch, (1 - want[k].chunk) * 2 + r));          // backwards: chunks reversed
      CHECK(s.chunk_of(fwd[k].stage_index) == want[k].chunk);
    }
  }
  // Warm-up (pp - rank - 1) * 2 + (v - 1) * group: rank 0 runs 4 forwards before its first
  // steady F+B tick, rank 1 runs 2.
  CHECK(opts.num_warmup_microbatches(2, 0) == 4);
  CHECK(opts.num_warmup_microbatches(2, 1) == 2);
  for (int r = 0; r < 2; ++r) {
    const auto order = s.compute_order(r);
    const auto first_b = std::find_if(order.begin(), order.end(), [](const Action& a) { return a.kind == ActionKind::backward; });
    CHECK(first_b - order.begin() == opts.num_warmup_microbatches(2, r) + 1);
  }
}

TEST_CASE("InterleavedOneFOneB: the PP2 N3 M5 VP2 table equals the example in Megatron's schedules.py") {
  const InterleavedOneFOneB opts{.num_microbatches = 5, .virtual_stages = 2, .microbatch_group_size = 3};
  std::vector<int> mbs, chunks;
  for (const ChunkStep& e : opts.forward_order(2)) {
    mbs.push_back(e.microbatch);
    chunks.push_back(e.chunk);
  }
  CHECK(mbs == std::vector<int>{0, 1, 2, 0, 1, 2, 3, 4, 3, 4});
  CHECK(chunks == std::vector<int>{0, 0, 0, 1, 1, 1, 0, 0, 1, 1});
  CHECK_NOTHROW(check(opts.build(2)));
}

TEST_CASE("InterleavedOneFOneB: options outside Megatron's constraints throw an Error naming the numbers") {
  // Default group = pp_size = 4 > m = 3.
  const InterleavedOneFOneB m3{.num_microbatches = 3, .virtual_stages = 2};
  const InterleavedOneFOneB g3{.num_microbatches = 8, .virtual_stages = 2, .microbatch_group_size = 3};
  const InterleavedOneFOneB m6{.num_microbatches = 6, .virtual_stages = 2};
  const InterleavedOneFOneB v0{.num_microbatches = 4, .virtual_stages = 0};
  const InterleavedOneFOneB g6{.num_microbatches = 10, .virtual_stages = 2, .microbatch_group_size = 6};
  CHECK_THROWS_WITH_AS(m3.build(4),
                       doctest::Contains("group size 4 (the default, pp_size) must lie in [pp_size, num_microbatches] = [4, 3]"),
                       Error);
  // Group smaller than pp_size.
  CHECK_THROWS_WITH_AS(g3.build(4),
                       doctest::Contains("group size 3 must lie in [pp_size, num_microbatches] = [4, 8]"), Error);
  // Remainder 2 of m = 6 by group 4 is neither 0 nor >= pp_size 4.
  CHECK_THROWS_WITH_AS(m6.build(4),
                       doctest::Contains("num_microbatches % group = 6 % 4 = 2 must be 0 or >= pp_size = 4"), Error);
  CHECK_THROWS_WITH_AS(v0.build(2),
                       doctest::Contains("virtual_stages must be >= 1, got 0"), Error);
  CHECK_THROWS_WITH_AS(OneFOneB{.num_microbatches = 0}.build(2), doctest::Contains("num_microbatches must be >= 1, got 0"),
                       Error);
  CHECK_THROWS_WITH_AS(GPipe{.num_microbatches = 2}.build(0), doctest::Contains("pp_size must be >= 1, got 0"), Error);
  // Remainder >= pp_size is accepted: m = 10, group 6, p = 4 leaves a last group of 4.
  CHECK_NOTHROW(check(g6.build(4)));
}

TEST_CASE("check: accepts GPipe, 1F1B and interleaved 1F1B for p 1..8, m 1..16, v 1..3 wherever the options are valid") {
  int accepted = 0, rejected_options = 0;
  for (int p = 1; p <= 8; ++p)
    for (int m = 1; m <= 16; ++m) {
      CAPTURE(p);
      CAPTURE(m);
      REQUIRE_NOTHROW(check(GPipe{.num_microbatches = m}, p));
      REQUIRE_NOTHROW(check(OneFOneB{.num_microbatches = m}, p));
      accepted += 2;
      for (int v = 1; v <= 3; ++v)
        for (int group : {0, p + 1, m}) {
          CAPTURE(v);
          CAPTURE(group);
          const InterleavedOneFOneB opts{.num_microbatches = m, .virtual_stages = v, .microbatch_group_size = group};
          if (interleaved_options_valid(p, m, opts.group_size(p))) {
            REQUIRE_NOTHROW(check(opts, p));
            ++accepted;
          } else {
            REQUIRE_THROWS_AS(opts.build(p), Error);
            ++rejected_options;
          }
        }
    }
  // Every p, m has GPipe and 1F1B; the interleaved grid has both valid and invalid points.
  CHECK(accepted > 256);
  CHECK(rejected_options > 0);
}

TEST_CASE("check: peak micro-batches in flight is min(p - rank, m) for 1F1B, m for GPipe, min(warmup + 1, m v) interleaved") {
  for (int p = 1; p <= 8; ++p)
    for (int m = 1; m <= 16; ++m) {
      const CheckReport one = check(OneFOneB{.num_microbatches = m}, p);
      const CheckReport gpipe = check(GPipe{.num_microbatches = m}, p);
      for (int r = 0; r < p; ++r) {
        CAPTURE(p);
        CAPTURE(m);
        CAPTURE(r);
        CHECK(one.peak_in_flight[static_cast<std::size_t>(r)] == std::min(p - r, m));
        CHECK(gpipe.peak_in_flight[static_cast<std::size_t>(r)] == m);
      }
      // Interleaved: Megatron-LM's warm-up (REFERENCE.md A.2), written out here rather than
      // taken from the library: (p - r - 1) * 2 + (v - 1) * group forwards, capped at m v; then
      // one more forward before the first backward.
      for (int v = 1; v <= 3; ++v)
        for (int group : {p, p + 1, m}) {
          if (!interleaved_options_valid(p, m, group)) continue;
          const CheckReport il =
              check(InterleavedOneFOneB{.num_microbatches = m, .virtual_stages = v, .microbatch_group_size = group}, p);
          for (int r = 0; r < p; ++r) {
            CAPTURE(p);
            CAPTURE(m);
            CAPTURE(v);
            CAPTURE(group);
            CAPTURE(r);
            const int warmup = std::min((p - r - 1) * 2 + (v - 1) * group, m * v);
            CHECK(il.peak_in_flight[static_cast<std::size_t>(r)] == std::min(warmup + 1, m * v));
          }
        }
    }
  // The numbers of REFERENCE.md C: 1F1B's first stage holds p micro-batches, GPipe's m.
  CHECK(check(OneFOneB{.num_microbatches = 8}, 4).max_peak_in_flight() == 4);
  CHECK(check(GPipe{.num_microbatches = 8}, 4).max_peak_in_flight() == 8);
  // Interleaved p = 4, v = 2, m = 8: rank 0 warms up with 3 * 2 + 1 * 4 = 10 forwards, then one more.
  CHECK(check(InterleavedOneFOneB{.num_microbatches = 8, .virtual_stages = 2}, 4).max_peak_in_flight() == 11);
}

TEST_CASE("check: two ranks that each receive before they send deadlock; the error names both stuck ranks and actions") {
  // Rank 0 waits for the gradient before it sends the activation; rank 1 needs the activation
  // before it can produce the gradient.
  const Schedule s{.name = "recv-first",
                   .pp_size = 2,
                   .num_microbatches = 1,
                   .ticks = {{{F(0, 0)}, {RB(0, 0, 1)}, {SF(0, 0, 1)}, {B(0, 0)}},
                             {{RF(0, 1, 0)}, {F(0, 1)}, {B(0, 1), SB(0, 1, 0)}}}};
  const std::string msg = check_error(s);
  CHECK(msg.find("schedule 'recv-first (p=2, m=1)' deadlocks") != std::string::npos);
  CHECK(msg.find("rank 0 is stuck at tick 1 waiting for RECV_B(mb=0, stage=0, from rank 1): rank 1 posts SEND_B "
                 "only at its tick 2 and is itself stuck at tick 0") != std::string::npos);
  CHECK(msg.find("rank 1 is stuck at tick 0 waiting for RECV_F(mb=0, stage=1, from rank 0): rank 0 posts SEND_F "
                 "only at its tick 2 and is itself stuck at tick 1") != std::string::npos);
  CHECK_THROWS_AS(simulate(s), Error);
  // The same actions with the exchange in one batched group (CASES.md C6) are fine.
  Schedule fixed = s;
  fixed.ticks[0] = {{F(0, 0), SF(0, 0, 1)}, {RB(0, 0, 1)}, {B(0, 0)}};
  CHECK_NOTHROW(check(fixed));
}

TEST_CASE("check: an incomplete schedule (a missing B) is rejected naming the rank and the action") {
  Schedule s = OneFOneB{.num_microbatches = 4}.build(2);
  for (Tick& t : s.ticks[1]) std::erase(t, B(3, 1));
  CHECK(check_error(s).find("is incomplete: rank 1 never runs B(mb=3, stage=1)") != std::string::npos);
  // A missing hand-off (both the SEND_F and the RECV_F gone) is named too.
  Schedule t = OneFOneB{.num_microbatches = 4}.build(2);
  for (Tick& k : t.ticks[0]) std::erase(k, SF(2, 0, 1));
  for (Tick& k : t.ticks[1]) std::erase(k, RF(2, 1, 0));
  CHECK(check_error(t).find("the activation of micro-batch 2 from stage 0 (rank 0) to stage 1 (rank 1) is never "
                            "transferred") != std::string::npos);
}

TEST_CASE("check: a RECV that is never sent and a SEND that is never received are rejected, naming both ranks") {
  Schedule s = OneFOneB{.num_microbatches = 4}.build(2);
  for (Tick& t : s.ticks[0]) std::erase(t, SF(2, 0, 1));
  const auto tick_of = [](const std::vector<Tick>& ticks, const Action& a) {
    for (std::size_t i = 0; i < ticks.size(); ++i)
      if (std::count(ticks[i].begin(), ticks[i].end(), a)) return static_cast<int>(i);
    return -1;
  };
  const int tick = tick_of(s.ticks[1], RF(2, 1, 0));
  REQUIRE(tick >= 0);
  CHECK(check_error(s).find(tessera::detail::str("rank 1 is stuck at tick ", tick,
                                        " waiting for RECV_F(mb=2, stage=1, from rank 0), which rank 0 never sends")) !=
        std::string::npos);

  Schedule u = OneFOneB{.num_microbatches = 4}.build(2);
  for (Tick& t : u.ticks[1]) std::erase(t, RF(2, 1, 0));
  CHECK(check_error(u).find(tessera::detail::str("rank 0 sends SEND_F(mb=2, stage=0, to rank 1) at tick ",
                                                 tick_of(u.ticks[0], SF(2, 0, 1)),
                                                 ", but rank 1 never receives it")) != std::string::npos);
}

TEST_CASE("check: duplicates, wrong peers, stages on the wrong rank and misordered ticks are rejected with the reason") {
  const Schedule base = OneFOneB{.num_microbatches = 2}.build(2);
  Schedule dup = base;
  dup.ticks[0].push_back({F(0, 0)});
  CHECK(check_error(dup).find("rank 0 does F(mb=0, stage=0) twice, at tick 0 and at tick 5") != std::string::npos);

  Schedule wrong_rank = base;
  wrong_rank.ticks[0].push_back({F(0, 1)});
  CHECK(check_error(wrong_rank).find("F(mb=0, stage=1) belongs to stage 1, which lives on rank 1") != std::string::npos);

  Schedule three = OneFOneB{.num_microbatches = 2}.build(3);
  three.ticks[0][0][1].peer = 2;  // SEND_F of stage 0 must go to rank 1
  CHECK(check_error(three).find("names peer rank 2 but stage 1 lives on rank 1") != std::string::npos);

  Schedule order = base;
  std::swap(order.ticks[0][0][0], order.ticks[0][0][1]);  // SEND_F listed before its F
  CHECK(check_error(order).find("is listed after a transfer") != std::string::npos);

  // Using an activation in the tick that receives it: the group runs after the compute.
  const Schedule same_tick{.name = "same-tick",
                           .pp_size = 2,
                           .num_microbatches = 1,
                           .ticks = {{{F(0, 0), SF(0, 0, 1)}, {RB(0, 0, 1)}, {B(0, 0)}},
                                     {{F(0, 1), RF(0, 1, 0)}, {B(0, 1), SB(0, 1, 0)}}}};
  CHECK(check_error(same_tick).find("rank 1 is stuck at tick 0: F(mb=0, stage=1) needs RECV_F(mb=0, stage=1, from "
                                    "rank 0), which rank 1 receives only at tick 0") != std::string::npos);

  // Two transfers between the same ranks received in the opposite order of sending.
  const Schedule crossed{.name = "crossed",
                         .pp_size = 2,
                         .num_microbatches = 2,
                         .ticks = {{{F(0, 0), F(1, 0), SF(0, 0, 1), SF(1, 0, 1)}, {RB(0, 0, 1), RB(1, 0, 1)},
                                    {B(0, 0), B(1, 0)}},
                                   {{RF(1, 1, 0), RF(0, 1, 0)}, {F(0, 1), F(1, 1), B(0, 1), B(1, 1), SB(0, 1, 0), SB(1, 1, 0)}}}};
  CHECK(check_error(crossed).find("rank 0 sends SEND_F(mb=0, stage=0, to rank 1) (tick 0) before SEND_F(mb=1, "
                                  "stage=0, to rank 1) (tick 0) to rank 1, but rank 1 posts the matching receives "
                                  "in the opposite order") != std::string::npos);

  Schedule short_ticks = base;
  short_ticks.ticks.pop_back();
  CHECK(check_error(short_ticks).find("ticks lists 1 ranks, expected pp_size = 2") != std::string::npos);
}

TEST_CASE("docs/schedules.md example: the hand-written 2-rank schedule passes, its deadlocking variant names both ranks") {
  Schedule mine{
      .name = "mine", .pp_size = 2, .num_microbatches = 2,
      .ticks = {
          // rank 0 holds stage 0
          {{Action::forward(0, 0), Action::send_forward(0, 0, 1)},
           {Action::forward(1, 0), Action::send_forward(1, 0, 1), Action::recv_backward(0, 0, 1)},
           {Action::backward(0, 0), Action::recv_backward(1, 0, 1)},
           {Action::backward(1, 0)}},
          // rank 1 holds stage 1 (the last): F and B back to back
          {{Action::recv_forward(0, 1, 0)},
           {Action::forward(0, 1), Action::backward(0, 1), Action::recv_forward(1, 1, 0), Action::send_backward(0, 1, 0)},
           {Action::forward(1, 1), Action::backward(1, 1), Action::send_backward(1, 1, 0)}}}};
  const CheckReport report = check(mine);
  CHECK(report.peak_in_flight == std::vector<int>{2, 1});
  CHECK(to_string(mine) == "mine (p=2, m=2)\n"
                           "rank 0: F0 SEND_F0 | F1 SEND_F1 RECV_B0 | B0 RECV_B1 | B1\n"
                           "rank 1: RECV_F0 | F0 B0 RECV_F1 SEND_B0 | F1 B1 SEND_B1\n");
  CHECK(bubble_stats(simulate(mine)).bubble_ratio == doctest::Approx(0.5));  // (p-1)/m

  Schedule broken = mine;  // rank 0 now waits for a gradient before it sends any activation
  broken.ticks[0] = {{Action::forward(0, 0)},
                     {Action::forward(1, 0), Action::recv_backward(0, 0, 1)},
                     {Action::send_forward(0, 0, 1), Action::send_forward(1, 0, 1)},
                     {Action::backward(0, 0), Action::recv_backward(1, 0, 1)},
                     {Action::backward(1, 0)}};
  CHECK(check_error(broken).starts_with(
      "schedule 'mine (p=2, m=2)' deadlocks: rank 0 is stuck at tick 1 waiting for RECV_B(mb=0, stage=0, from rank 1): "
      "rank 1 posts SEND_B only at its tick 1 and is itself stuck at tick 0; rank 1 is stuck at tick 0 waiting for "
      "RECV_F(mb=0, stage=1, from rank 0): rank 0 posts SEND_F only at its tick 2 and is itself stuck at tick 1"));
}

TEST_CASE("check: a hand-written schedule with its own stage placement (V shape) passes and simulates") {
  // Two ranks, two chunks each, V placement: stages 0 and 3 on rank 0, stages 1 and 2 on rank 1.
  // Stage 1 -> 2 is a local hand-off on rank 1; everything else crosses ranks.
  const Schedule v{.name = "V",
                   .pp_size = 2,
                   .num_microbatches = 1,
                   .virtual_stages = 2,
                   .ticks = {{{F(0, 0), SF(0, 0, 1)}, {RF(0, 3, 1)}, {F(0, 3), B(0, 3), SB(0, 3, 1)}, {RB(0, 0, 1)},
                              {B(0, 0)}},
                             {{RF(0, 1, 0)}, {F(0, 1), F(0, 2), SF(0, 2, 0)}, {RB(0, 2, 0)}, {B(0, 2), B(0, 1), SB(0, 1, 0)}}},
                   .stage_ranks = {0, 1, 1, 0}};
  const CheckReport rep = check(v);
  CHECK(rep.peak_in_flight == std::vector<int>{2, 2});
  CHECK(v.chunk_of(3) == 1);
  CHECK(v.chunk_of(2) == 1);
  const Timeline t = simulate(v, {.t_forward = 1.0, .t_backward = 2.0, .duration = {}, .transfer_duration = {}});
  CHECK(t.span() == doctest::Approx(12.0));  // the V is a straight chain: 4 F then 4 B
}

TEST_CASE("simulate: with t_B = 2 t_F the bubble ratio is (p-1)/m for GPipe and 1F1B and (p-1)/(v m) interleaved") {
  for (int p : {1, 2, 3, 4, 8})
    for (int m : {1, 2, 4, 8, 12, 16}) {
      CAPTURE(p);
      CAPTURE(m);
      for (const Schedule& s : {GPipe{.num_microbatches = m}.build(p), OneFOneB{.num_microbatches = m}.build(p)}) {
        const BubbleStats b = bubble_stats(simulate(s, {.t_forward = 1.0, .t_backward = 2.0, .duration = {}, .transfer_duration = {}}));
        CHECK(b.bubble_ratio == doctest::Approx(double(p - 1) / m));
        CHECK(b.span == doctest::Approx(3.0 * (m + p - 1)));  // (m + p - 1)(t_F + t_B)
        for (double f : b.bubble_fraction) CHECK(f == doctest::Approx(double(p - 1) / (m + p - 1)));
        CHECK(b.idle_fraction == doctest::Approx(b.bubble_ratio / (1 + b.bubble_ratio)));
      }
      for (int v : {2, 3}) {
        CAPTURE(v);
        if (!interleaved_options_valid(p, m, p)) continue;
        const Schedule s = InterleavedOneFOneB{.num_microbatches = m, .virtual_stages = v}.build(p);
        const BubbleStats b = bubble_stats(simulate(s, {.t_forward = 0.5, .t_backward = 1.0, .duration = {}, .transfer_duration = {}}));
        CHECK(b.bubble_ratio == doctest::Approx(double(p - 1) / (v * m)));
      }
    }
  // REFERENCE.md C worked example: p = 2, m = 8 idles 1/9 of the step; interleaved v = 2, 1/17.
  CHECK(bubble_stats(simulate(OneFOneB{.num_microbatches = 8}.build(2))).idle_fraction == doctest::Approx(1.0 / 9));
  const Schedule il = InterleavedOneFOneB{.num_microbatches = 8, .virtual_stages = 2}.build(2);
  CHECK(bubble_stats(simulate(il)).idle_fraction ==
        doctest::Approx(1.0 / 17));
}

TEST_CASE("simulate: with a transfer time d, one micro-batch through p stages takes p (t_F + t_B) + 2 (p - 1) d") {
  // One micro-batch is a chain: p forwards, p backwards, and a hand-off each way between each
  // pair of neighbouring stages, every hand-off on the critical path (written out, not taken
  // from the engine). Each transfer becomes one event on each side.
  for (int p : {1, 2, 3, 4, 7}) {
    CAPTURE(p);
    for (const Schedule& s : {GPipe{.num_microbatches = 1}.build(p), OneFOneB{.num_microbatches = 1}.build(p)}) {
      const Timeline t = simulate(s, {.t_forward = 1.0, .t_backward = 2.0, .duration = {},
                                      .transfer_duration = [](const Action&) { return 0.5; }});
      CHECK(t.span() == doctest::Approx(3.0 * p + 2 * (p - 1) * 0.5));
      const auto transfers = std::count_if(t.events.begin(), t.events.end(),
                                           [](const TimelineEvent& e) { return e.action.is_transfer(); });
      CHECK(transfers == 4 * (p - 1));
      for (const TimelineEvent& e : t.events)
        if (e.action.is_transfer()) CHECK(e.end - e.start == doctest::Approx(0.5));
      // The bubble counts transfers as idle: busy is still p (t_F + t_B) in all.
      const BubbleStats b = bubble_stats(t);
      double busy = 0;
      for (double x : b.busy) busy += x;
      CHECK(busy == doctest::Approx(3.0 * p));
    }
  }
  // Steady state of 1F1B, p = 2, m = 8: the first rank waits 2 d more per micro-batch than with
  // free transfers only where the chain crosses; the span grows, and never by less than 2 d.
  const Schedule s = OneFOneB{.num_microbatches = 8}.build(2);
  const double free_span = simulate(s).span();
  const double span = simulate(s, {.t_forward = 1.0, .t_backward = 2.0, .duration = {},
                                   .transfer_duration = [](const Action&) { return 0.25; }}).span();
  CHECK(span >= free_span + 0.5 - 1e-12);
  CHECK(span <= free_span + 0.5 * 8 * 2 + 1e-12);  // at most every hand-off exposed
  CHECK_THROWS_AS(simulate(s, {.t_forward = 1.0, .t_backward = 2.0, .duration = {},
                               .transfer_duration = [](const Action&) { return -1.0; }}),
                  Error);
}

TEST_CASE("chrome_trace: parses as JSON with one X event per F and B, pid 0, tid = rank, names F3/B3, chunk in args") {
  const Schedule s = InterleavedOneFOneB{.num_microbatches = 4, .virtual_stages = 2}.build(2);
  const Timeline t = simulate(s);
  const nlohmann::json doc = nlohmann::json::parse(chrome_trace(t).dump());
  int x = 0;
  std::set<std::tuple<int, std::string, int>> seen;  // (tid, name, chunk)
  for (const auto& e : doc.at("traceEvents")) {
    if (e.at("ph") != "X") continue;
    ++x;
    CHECK(e.at("pid") == 0);
    const int tid = e.at("tid").get<int>();
    const int stage = e.at("args").at("stage").get<int>();
    CHECK(tid == stage % 2);
    CHECK(e.at("args").at("chunk").get<int>() == stage / 2);
    CHECK(e.at("dur").get<double>() > 0);
    seen.insert({tid, e.at("name").get<std::string>(), e.at("args").at("chunk").get<int>()});
  }
  CHECK(x == 2 * 4 * 2 * 2);  // ranks x microbatches x chunks x {F, B}
  CHECK(seen.count({0, "F3", 1}) == 1);
  CHECK(seen.count({1, "B0", 0}) == 1);
}

namespace {
// Minimal well-formedness check: every tag opened is closed in order; returns the element count.
int xml_elements(const std::string& s) {
  std::vector<std::string> open;
  int count = 0;
  for (std::size_t i = s.find('<'); i != std::string::npos; i = s.find('<', i + 1)) {
    const std::size_t end = s.find('>', i);
    REQUIRE(end != std::string::npos);
    const std::string tag = s.substr(i + 1, end - i - 1);
    if (tag.starts_with("/")) {
      REQUIRE(!open.empty());
      REQUIRE(open.back() == tag.substr(1));
      open.pop_back();
    } else {
      ++count;
      if (!tag.ends_with("/")) open.push_back(tag.substr(0, tag.find(' ')));
    }
  }
  CHECK(open.empty());
  return count;
}
std::size_t occurrences(const std::string& s, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t i = s.find(what); i != std::string::npos; i = s.find(what, i + 1)) ++n;
  return n;
}
}  // namespace

TEST_CASE("to_svg: a well-formed standalone SVG with p*m F boxes and p*m B boxes (times v interleaved), a title and an axis") {
  for (const Schedule& s : {OneFOneB{.num_microbatches = 8}.build(4), GPipe{.num_microbatches = 3}.build(2),
                            InterleavedOneFOneB{.num_microbatches = 8, .virtual_stages = 2}.build(4)}) {
    CAPTURE(s.description());
    const std::string svg = to_svg(simulate(s), {.width = 960, .row_height = 28, .title = "", .time_unit = "t_F",
                                                 .time_scale = 1.0, .show_bubble = true});
    CHECK(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    CHECK(svg.ends_with("</svg>\n"));
    CHECK(xml_elements(svg) > 0);
    const std::size_t boxes = static_cast<std::size_t>(s.pp_size * s.num_microbatches * s.virtual_stages);
    CHECK(occurrences(svg, "<rect class=\"F\"") == boxes);
    CHECK(occurrences(svg, "<rect class=\"B\"") == boxes);
    CHECK(svg.find(s.description()) != std::string::npos);
    CHECK(svg.find("time (t_F)") != std::string::npos);
  }
  Timeline odd = simulate(GPipe{.num_microbatches = 1}.build(1));
  odd.title = "a <b> & \"c\"";
  CHECK(to_svg(odd).find("a &lt;b&gt; &amp; &quot;c&quot;") != std::string::npos);
  const SvgOptions narrow{.width = 10, .row_height = 28, .title = "", .time_unit = "", .time_scale = 1.0,
                          .show_bubble = true};
  CHECK_THROWS_AS(to_svg(odd, narrow), Error);
}

TEST_CASE("Action: a transfer and its counterpart share a tag, and no two transfers of a schedule share one") {
  const Schedule s = InterleavedOneFOneB{.num_microbatches = 8, .virtual_stages = 3}.build(4);
  std::map<int, std::set<std::pair<int, int>>> by_tag;  // tag -> {(rank, key)}
  for (int r = 0; r < 4; ++r)
    for (const Tick& t : s.ticks[static_cast<std::size_t>(r)])
      for (const Action& a : t) {
        if (a.is_compute()) continue;
        const int tag = a.transfer_tag(8);
        CHECK(tag >= 0);
        CHECK(a.counterpart(r).transfer_tag(8) == tag);
        by_tag[tag].insert({a.is_send() ? r : a.peer, a.is_send() ? a.peer : r});
      }
  for (const auto& [tag, pairs] : by_tag) CHECK(pairs.size() == 1);
  CHECK(by_tag.size() == static_cast<std::size_t>(2 * (4 * 3 - 1) * 8));  // each boundary, both directions
  CHECK(to_string(SF(2, 0, 1)) == "SEND_F(mb=2, stage=0, to rank 1)");
  CHECK(short_name(B(3, 1)) == "B3");
  CHECK_THROWS_AS(F(0, 0).transfer_tag(4), Error);
}

TEST_CASE("Recorder: events recorded on 3 thread ranks are gathered (all_gather) into one timeline on every rank") {
  const Schedule s = OneFOneB{.num_microbatches = 2}.build(3);
  const auto timelines = testing::run_ranks(3, [&](Comm& comm) {
    Recorder rec = Recorder::synchronized(comm, s);
    const int r = comm.rank();
    // Rank r records r + 1 events with times known to the test.
    for (int i = 0; i <= r; ++i) rec.record(F(i, r), r + i, r + i + 0.25);
    const int value = rec.time(B(0, r), [] { return 42; });
    if (value != 42) throw Error("Recorder::time did not return the function's result");
    return rec.gather(comm, "recorded");
  });
  for (const Timeline& t : timelines) {
    CHECK(t.num_ranks == 3);
    CHECK(t.title == "recorded");
    REQUIRE(t.events.size() == 1 + 2 + 3 + 3);
    for (int r = 0; r < 3; ++r) {
      const auto ev = t.of_rank(r);
      REQUIRE(ev.size() == static_cast<std::size_t>(r + 2));
      for (int i = 0; i <= r; ++i) {
        // of_rank sorts by start; the measured B started near 0, before the recorded F's
        // (which start at r + i >= 0), unless r + i == 0.
        const auto it = std::find_if(ev.begin(), ev.end(), [&](const TimelineEvent& e) { return e.action == F(i, r); });
        REQUIRE(it != ev.end());
        CHECK(it->start == r + i);
        CHECK(it->end == r + i + 0.25);
        CHECK(it->rank == r);
      }
      const auto b = std::find_if(ev.begin(), ev.end(), [&](const TimelineEvent& e) { return e.action == B(0, r); });
      REQUIRE(b != ev.end());
      CHECK(b->start >= 0.0);
      CHECK(b->end >= b->start);
    }
  }
  CHECK_THROWS_AS(Recorder(0).record(F(0, 0), 2.0, 1.0), Error);
}

namespace {
// A tiny executor: runs a schedule on the threads backend, each tick's transfers through one
// batch_isend_irecv. Stage s maps x -> 1.5 x + s + 1 forward and g -> 0.5 g + s backward, so
// the values that arrive prove every transfer carried the right micro-batch and stage.
struct RankResult {
  std::map<int, double> outputs;  // last stage: mb -> forward output
  std::map<int, double> grads;    // stage 0: mb -> input gradient
  Timeline timeline;
};

RankResult execute(const Schedule& s, Comm& comm) {
  const int r = comm.rank(), last = s.num_stages() - 1, m = s.num_microbatches;
  std::map<std::pair<int, int>, double> act, grad, recv_act, recv_grad;  // (stage, mb) -> value
  Recorder rec = Recorder::synchronized(comm, s);
  RankResult res;
  for (const Tick& tick : s.ticks[static_cast<std::size_t>(r)]) {
    std::vector<P2POp> ops;
    std::vector<std::pair<Action, double*>> recvs;
    std::vector<double> box(tick.size());
    for (std::size_t i = 0; i < tick.size(); ++i) {
      const Action& a = tick[i];
      const int st = a.stage_index, mb = a.microbatch;
      switch (a.kind) {
        case ActionKind::forward:
          rec.time(a, [&] {
            const double x = st == 0 ? mb + 1.0 : s.rank_of(st - 1) == r ? act.at({st - 1, mb}) : recv_act.at({st, mb});
            act[{st, mb}] = 1.5 * x + st + 1;
            if (st == last) res.outputs[mb] = act[{st, mb}];
          });
          break;
        case ActionKind::backward_weight:  // nothing to compute here: the weight has no value
          rec.time(a, [] {});
          break;
        case ActionKind::backward:
        case ActionKind::backward_input:
          rec.time(a, [&] {
            const double g = st == last ? act.at({st, mb}) : s.rank_of(st + 1) == r ? grad.at({st + 1, mb})
                                                                                      : recv_grad.at({st, mb});
            grad[{st, mb}] = 0.5 * g + st;
            if (st == 0) res.grads[mb] = grad[{st, mb}];
          });
          break;
        case ActionKind::send_forward:
          box[i] = act.at({st, mb});
          ops.push_back(P2POp::send(std::span<const double>(&box[i], 1), a.peer, a.transfer_tag(m)));
          break;
        case ActionKind::send_backward:
          box[i] = grad.at({st, mb});
          ops.push_back(P2POp::send(std::span<const double>(&box[i], 1), a.peer, a.transfer_tag(m)));
          break;
        default:
          ops.push_back(P2POp::recv(std::span<double>(&box[i], 1), a.peer, a.transfer_tag(m)));
          recvs.emplace_back(a, &box[i]);
      }
    }
    if (!ops.empty()) {
      const double t0 = rec.now();
      comm.batch_send_recv(ops);
      const double t1 = rec.now();
      for (const Action& a : tick)
        if (a.is_transfer()) rec.record(a, t0, t1);
    }
    for (const auto& [a, v] : recvs) (a.kind == ActionKind::recv_forward ? recv_act : recv_grad)[{a.stage_index, a.microbatch}] = *v;
  }
  res.timeline = rec.gather(comm, s.description());
  return res;
}
}  // namespace

TEST_CASE("executor sketch: GPipe, 1F1B and interleaved schedules run on thread ranks with batched groups and move the right values") {
  for (const Schedule& s : {GPipe{.num_microbatches = 3}.build(2), OneFOneB{.num_microbatches = 8}.build(4),
                            OneFOneB{.num_microbatches = 2}.build(3),
                            InterleavedOneFOneB{.num_microbatches = 4, .virtual_stages = 2}.build(2),
                            InterleavedOneFOneB{.num_microbatches = 6, .virtual_stages = 3}.build(3),
                            ZeroBubbleH1{.num_microbatches = 8}.build(4), ZeroBubbleH1{.num_microbatches = 3}.build(3)}) {
    CAPTURE(s.description());
    const auto results = testing::run_ranks(s.pp_size, [&](Comm& comm) { return execute(s, comm); });
    // Serial reference: the whole model on one micro-batch at a time.
    const int stages = s.num_stages();
    const RankResult& first = results[0];
    const RankResult& lastr = results[static_cast<std::size_t>(s.rank_of(stages - 1))];
    for (int mb = 0; mb < s.num_microbatches; ++mb) {
      double x = mb + 1.0;
      for (int st = 0; st < stages; ++st) x = 1.5 * x + st + 1;
      CHECK(lastr.outputs.at(mb) == x);
      double g = x;
      for (int st = stages - 1; st >= 0; --st) g = 0.5 * g + st;
      CHECK(first.grads.at(mb) == g);
    }
    // The gathered timeline holds every F and B once, and bubble_stats runs on measured data.
    const Timeline& t = results[0].timeline;
    CHECK(t.num_ranks == s.pp_size);
    const auto computes = std::count_if(t.events.begin(), t.events.end(),
                                        [](const TimelineEvent& e) { return e.action.is_compute(); });
    const int per_microbatch = s.name == "ZB-H1" ? 3 : 2;  // F and B, or F, I and W
    CHECK(computes == per_microbatch * stages * s.num_microbatches);
    const BubbleStats b = bubble_stats(t);
    CHECK(b.span > 0.0);
    CHECK(b.busy.size() == static_cast<std::size_t>(s.pp_size));
    const nlohmann::json doc = chrome_trace(t);
    CHECK(doc.at("traceEvents").size() == t.events.size() + 1 + 2 * static_cast<std::size_t>(s.pp_size));
  }
}

// ---- ZB-H1 (Qi et al., ICLR 2024) -------------------------------------------------------------

TEST_CASE("ZeroBubbleH1: p=4 m=8 compute orders of ranks 0 and 3 equal the hand-written H1 lists") {
  const Schedule s = ZeroBubbleH1{.num_microbatches = 8}.build(4);
  // Rank 0: 1F1B's 3 warm-up forwards, then F I W per micro-batch (no W deferred), then I W.
  const std::vector<Action> rank0{F(0, 0), F(1, 0), F(2, 0), F(3, 0), I(0, 0), W(0, 0), F(4, 0), I(1, 0), W(1, 0),
                                  F(5, 0), I(2, 0), W(2, 0), F(6, 0), I(3, 0), W(3, 0), F(7, 0), I(4, 0), W(4, 0),
                                  I(5, 0), W(5, 0), I(6, 0), W(6, 0), I(7, 0), W(7, 0)};
  // Rank 3 (last): no warm-up, F I pairs with its first 3 W deferred, then 4 W at the end.
  const std::vector<Action> rank3{F(0, 3), I(0, 3), F(1, 3), I(1, 3), F(2, 3), I(2, 3), F(3, 3), I(3, 3), W(0, 3),
                                  F(4, 3), I(4, 3), W(1, 3), F(5, 3), I(5, 3), W(2, 3), F(6, 3), I(6, 3), W(3, 3),
                                  F(7, 3), I(7, 3), W(4, 3), W(5, 3), W(6, 3), W(7, 3)};
  CHECK(s.compute_order(0) == rank0);
  CHECK(s.compute_order(3) == rank3);
  CHECK(s.name == "ZB-H1");
  CHECK(kind_name(ActionKind::backward_input) == std::string("I"));
  CHECK(kind_name(ActionKind::backward_weight) == std::string("W"));
  CHECK(to_string(W(2, 1)) == "W(mb=2, stage=1)");
  // The first stage sends F3's output only when stage 1 needs it (tick of its own, with the
  // receive of the first gradient), not right after F3.
  CHECK(s.ticks[0][3] == Tick{F(3, 0)});
  CHECK(s.ticks[0][4] == (Tick{SF(3, 0, 1), RB(0, 0, 1)}));
}

TEST_CASE("ZeroBubbleH1: the checker accepts it for p 1..8 and m 1..20; every rank holds at most min(p, m) micro-batches, 1F1B's peak") {
  for (int p = 1; p <= 8; ++p)
    for (int m = 1; m <= 20; ++m) {
      CAPTURE(p);
      CAPTURE(m);
      const Schedule s = ZeroBubbleH1{.num_microbatches = m}.build(p);
      CheckReport rep;
      REQUIRE_NOTHROW(rep = check(s));
      CHECK(rep.max_peak_in_flight() == check(OneFOneB{.num_microbatches = m}.build(p)).max_peak_in_flight());
      for (int r = 0; r < p; ++r) CHECK(rep.peak_in_flight[static_cast<std::size_t>(r)] <= std::min(p, m));
      if (m >= p)
        for (int r = 0; r < p; ++r) CHECK(rep.peak_in_flight[static_cast<std::size_t>(r)] == p);
      // Every (stage, micro-batch) has one F, one I and one W, no fused B.
      for (int r = 0; r < p; ++r) {
        const auto order = s.compute_order(r);
        CHECK(std::count_if(order.begin(), order.end(), [](const Action& a) { return a.kind == ActionKind::backward; }) == 0);
        CHECK(order.size() == static_cast<std::size_t>(3 * m));
      }
    }
  CHECK_THROWS_AS(ZeroBubbleH1{.num_microbatches = 0}.build(2), Error);
  CHECK_THROWS_AS(ZeroBubbleH1{.num_microbatches = 2}.build(0), Error);
}

TEST_CASE("ZeroBubbleH1: simulated with t_F = t_I = t_W its bubble ratio is the paper's (p-1)/(3m), a third of 1F1B's") {
  for (int p = 2; p <= 8; ++p)
    for (int m : {p, p + 1, 2 * p, 16}) {
      if (m < p) continue;
      CAPTURE(p);
      CAPTURE(m);
      const SimulateOptions equal{.t_forward = 1.0, .t_backward = 2.0, .t_backward_input = 1.0, .t_backward_weight = 1.0};
      const BubbleStats zb = bubble_stats(simulate(ZeroBubbleH1{.num_microbatches = m}.build(p), equal));
      const BubbleStats f1 = bubble_stats(simulate(OneFOneB{.num_microbatches = m}.build(p), equal));
      CHECK(zb.bubble_ratio == doctest::Approx(zero_bubble_h1_bubble_ratio(p, m)));
      CHECK(zb.bubble_ratio == doctest::Approx((p - 1.0) / (3.0 * m)));
      CHECK(f1.bubble_ratio == doctest::Approx(one_f_one_b_bubble_ratio(p, m)));
      CHECK(zb.span == doctest::Approx(3.0 * m + (p - 1)));  // m (t_F + t_I + t_W) + (p - 1)(t_F + t_I - t_W)
    }
  // With unequal times the schedule stays valid and below 1F1B's bubble, though not the formula.
  const SimulateOptions heavy_w{.t_forward = 1.0, .t_backward = 2.0, .t_backward_input = 1.0, .t_backward_weight = 0.5};
  CHECK(bubble_stats(simulate(ZeroBubbleH1{.num_microbatches = 8}.build(4), heavy_w)).bubble_ratio <
        bubble_stats(simulate(OneFOneB{.num_microbatches = 8}.build(4), {.t_forward = 1.0, .t_backward = 1.5})).bubble_ratio);
  CHECK(zero_bubble_h1_bubble_ratio(4, 8, 1.0, 1.0, 0.5) == doctest::Approx(3 * 1.5 / (8 * 2.5)));
  CHECK_THROWS_AS(zero_bubble_h1_bubble_ratio(4, 3), Error);  // m < p: the formula does not hold
  CHECK_THROWS_AS(zero_bubble_h1_bubble_ratio(4, 8, -1.0), Error);
}

TEST_CASE("check: broken split backwards are refused: a W before its I, a missing W, a W without I, B and I both") {
  const Schedule good = ZeroBubbleH1{.num_microbatches = 4}.build(2);
  REQUIRE_NOTHROW(check(good));
  auto find = [](const Schedule& s, int r, const Action& a) {
    for (std::size_t t = 0; t < s.ticks[static_cast<std::size_t>(r)].size(); ++t)
      for (std::size_t i = 0; i < s.ticks[static_cast<std::size_t>(r)][t].size(); ++i)
        if (s.ticks[static_cast<std::size_t>(r)][t][i] == a) return std::pair{t, i};
    FAIL("action not found");
    return std::pair<std::size_t, std::size_t>{0, 0};
  };
  {  // W(0) swapped with its I(0) on rank 1: W before its I.
    Schedule s = good;
    const auto [ti, ii] = find(s, 1, I(0, 1));
    const auto [tw, iw] = find(s, 1, W(0, 1));
    std::swap(s.ticks[1][ti][ii], s.ticks[1][tw][iw]);
    const std::string e = check_error(s);
    CAPTURE(e);
    CHECK(e.find("W(mb=0, stage=1) needs I(mb=0, stage=1), which rank 1 runs only at tick") != std::string::npos);
  }
  {  // A missing W: the weight gradient would be lost.
    Schedule s = good;
    for (Tick& t : s.ticks[0]) std::erase(t, W(3, 0));
    std::erase_if(s.ticks[0], [](const Tick& t) { return t.empty(); });
    const std::string e = check_error(s);
    CAPTURE(e);
    CHECK(e.find("is incomplete: rank 0 runs I(mb=3, stage=0) but never W(mb=3, stage=0)") != std::string::npos);
  }
  {  // A W without its I (the I turned into a W of another micro-batch is a duplicate; here the I is dropped and
     // its SEND_B kept, so the completeness check names the W first).
    Schedule s = good;
    for (Tick& t : s.ticks[0]) std::replace(t.begin(), t.end(), I(1, 0), B(1, 0));
    const std::string e = check_error(s);
    CAPTURE(e);
    CHECK(e.find("rank 0 runs both the fused B(mb=1, stage=0) and the split W(mb=1, stage=0)") != std::string::npos);
    for (Tick& t : s.ticks[0]) std::erase(t, B(1, 0));
    const std::string e2 = check_error(s);
    CAPTURE(e2);
    CHECK(e2.find("rank 0 runs W(mb=1, stage=0) but never I(mb=1, stage=0)") != std::string::npos);
  }
  {  // A SEND_B placed before the I that produces it.
    Schedule s = good;
    const auto [ti, ii] = find(s, 1, I(2, 1));
    (void)ii;
    const auto [ts, is] = find(s, 1, SB(2, 1, 0));
    (void)is;
    REQUIRE(ts >= ti);
    std::erase(s.ticks[1][ts], SB(2, 1, 0));
    s.ticks[1][ti - 1].push_back(SB(2, 1, 0));
    CHECK(check_error(s).find("SEND_B(mb=2, stage=1, to rank 0) needs I(mb=2, stage=1)") != std::string::npos);
  }
}

TEST_CASE("ZeroBubbleH1: drawn (class I and W boxes, a W legend) and traced (cat backward_input / backward_weight)") {
  const Schedule s = ZeroBubbleH1{.num_microbatches = 8}.build(4);
  const Timeline t = simulate(s);
  const std::string svg = to_svg(t, {.width = 960, .row_height = 28, .title = "", .time_unit = "t_F", .time_scale = 1.0,
                                     .show_bubble = true});
  CHECK(occurrences(svg, "<rect class=\"F\"") == 32);
  CHECK(occurrences(svg, "<rect class=\"I\"") == 32);
  CHECK(occurrences(svg, "<rect class=\"W\"") == 32);
  CHECK(occurrences(svg, "<rect class=\"B\"") == 0);
  CHECK(svg.find("weight grad (W)") != std::string::npos);
  CHECK(svg.find("ZB-H1 (p=4, m=8)") != std::string::npos);
  const nlohmann::json doc = chrome_trace(t);
  int inputs = 0, weights = 0;
  for (const auto& e : doc.at("traceEvents")) {
    const std::string cat = e.value("cat", ""), name = e.value("name", "");
    if (cat == "backward_input") {
      ++inputs;
      CHECK(name.starts_with("I"));
    }
    if (cat == "backward_weight") {
      ++weights;
      CHECK(name.starts_with("W"));
    }
  }
  CHECK(inputs == 32);
  CHECK(weights == 32);
}

// ---- walk_step: the device pipeline's bookkeeping, over every schedule ----------------------

namespace {

// A boundary buffer's content in the walk test: which stage and micro-batch wrote it, and
// whether it is an activation (F) or an input gradient (B).
struct Tag {
  int stage = -1, mb = -1;
  char kind = '?';
  bool operator==(const Tag&) const = default;
};

// Checks the data flow of walk_step on one rank: every compute reads the buffer its neighbour
// stage wrote (received or local), every send sends the buffer its stage wrote, every slot holds
// its forward's (stage, micro-batch) until the backward (or the W after an I).
struct TagExecutor {
  const Schedule& s;
  int rank;
  std::vector<std::vector<std::pair<int, int>>> slot_holds;  // [chunk][slot] -> (stage, mb), (-1, -1) free
  std::map<std::pair<int, int>, bool> input_done;            // (stage, mb) -> its I ran (split backward)
  int forwards = 0, backwards = 0, weights = 0;
  TagExecutor(const Schedule& sch, int r) : s(sch), rank(r) {
    for (int n : slots_needed(s, r)) slot_holds.emplace_back(static_cast<std::size_t>(n), std::pair{-1, -1});
  }
  Tag make(const Action&) { return Tag{}; }
  int slots(int c) const { return static_cast<int>(slot_holds[static_cast<std::size_t>(c)].size()); }
  std::pair<int, int>& hold(const Action& a, int slot) {
    return slot_holds[static_cast<std::size_t>(s.chunk_of(a.stage_index))][static_cast<std::size_t>(slot)];
  }
  void forward(const Action& a, int slot, const Tag* input, Tag* output) {
    ++forwards;
    CHECK(s.rank_of(a.stage_index) == rank);
    CHECK(hold(a, slot) == std::pair{-1, -1});
    hold(a, slot) = {a.stage_index, a.microbatch};
    if (a.stage_index == 0) {
      CHECK(input == nullptr);
    } else {
      REQUIRE(input != nullptr);
      CHECK(*input == Tag{a.stage_index - 1, a.microbatch, 'F'});
    }
    CHECK((output == nullptr) == (a.stage_index == s.num_stages() - 1));
    if (output != nullptr) *output = Tag{a.stage_index, a.microbatch, 'F'};
  }
  void backward(const Action& a, int slot, const Tag* grad_output, Tag* grad_input) {
    ++backwards;
    CHECK(hold(a, slot) == std::pair{a.stage_index, a.microbatch});
    if (a.stage_index == s.num_stages() - 1) {
      CHECK(grad_output == nullptr);
    } else {
      REQUIRE(grad_output != nullptr);
      CHECK(*grad_output == Tag{a.stage_index + 1, a.microbatch, 'B'});
    }
    CHECK((grad_input == nullptr) == (a.stage_index == 0));
    if (grad_input != nullptr) *grad_input = Tag{a.stage_index, a.microbatch, 'B'};
    if (a.kind == ActionKind::backward)
      hold(a, slot) = {-1, -1};
    else
      input_done[{a.stage_index, a.microbatch}] = true;
  }
  void backward_weight(const Action& a, int slot) {
    ++weights;
    CHECK(hold(a, slot) == std::pair{a.stage_index, a.microbatch});
    CHECK(input_done[{a.stage_index, a.microbatch}]);
    hold(a, slot) = {-1, -1};
  }
  void exchange(std::vector<WalkTransfer<Tag>>& group) {
    for (WalkTransfer<Tag>& t : group) {
      const Action& a = t.action;
      CHECK(t.peer == a.peer);
      if (t.is_send) {  // the stage's own output or input gradient
        CHECK(*t.buffer == Tag{a.stage_index, a.microbatch, a.kind == ActionKind::send_forward ? 'F' : 'B'});
      } else {  // what the matching send carries
        *t.buffer = a.kind == ActionKind::recv_forward ? Tag{a.stage_index - 1, a.microbatch, 'F'}
                                                       : Tag{a.stage_index + 1, a.microbatch, 'B'};
      }
    }
  }
};

}  // namespace

TEST_CASE("walk_step (the device pipeline's bookkeeping): every rank of GPipe, 1F1B, interleaved 1F1B and ZB-H1 at pp 1-4 reads each buffer its neighbour wrote, sends its own, holds each slot to its backward (or W), and ends with nothing left") {
  int walked = 0;
  for (int pp = 1; pp <= 4; ++pp)
    for (int m = 1; m <= 8; ++m) {
      std::vector<Schedule> all{GPipe{m}.build(pp), OneFOneB{m}.build(pp), ZeroBubbleH1{m}.build(pp)};
      for (int v : {2, 3})
        if (m % pp == 0 && m >= pp) all.push_back(InterleavedOneFOneB{m, v}.build(pp));
      for (const Schedule& s : all) {
        CAPTURE(s.description());
        (void)check(s);
        for (int r = 0; r < pp; ++r) {
          CAPTURE(r);
          TagExecutor ex(s, r);
          walk_step<Tag>(s, r, ex);
          const int per_rank = m * s.virtual_stages;
          CHECK(ex.forwards == per_rank);
          CHECK(ex.backwards == per_rank);
          CHECK(ex.weights == (splits_backward(s, r, 0) ? per_rank : 0));
          for (const auto& chunk : ex.slot_holds)
            for (const auto& h : chunk) CHECK(h == std::pair{-1, -1});
          ++walked;
        }
      }
    }
  CHECK(walked > 200);
  // 1F1B keeps at most pp - rank micro-batches in flight (Megatron's warm-up count + 1), GPipe all.
  CHECK(slots_needed(OneFOneB{8}.build(4), 0) == std::vector<int>{4});
  CHECK(slots_needed(OneFOneB{8}.build(4), 3) == std::vector<int>{1});
  CHECK(slots_needed(GPipe{8}.build(4), 2) == std::vector<int>{8});
  // The last backward of each chunk (where overlapped data parallelism starts reducing it): the
  // step's last micro-batch under 1F1B, GPipe and interleaving; none under a split backward. It
  // is each chunk's final B: no B of that chunk follows it, and the chunk runs all m of them.
  for (const Schedule& sch : {OneFOneB{8}.build(4), GPipe{4}.build(2), InterleavedOneFOneB{4, 2}.build(2),
                              ZeroBubbleH1{4}.build(2)}) {
    CAPTURE(sch.description());
    for (int r = 0; r < sch.pp_size; ++r) {
      const std::vector<int> last = last_backward_microbatch(sch, r);
      REQUIRE(static_cast<int>(last.size()) == sch.virtual_stages);
      for (int c = 0; c < sch.virtual_stages; ++c) {
        CAPTURE(r);
        CAPTURE(c);
        if (splits_backward(sch, r, c)) {  // ZB-H1
          CHECK(last[static_cast<std::size_t>(c)] == -1);
          continue;
        }
        CHECK(last[static_cast<std::size_t>(c)] == sch.num_microbatches - 1);
        int backwards = 0, after = 0;
        bool seen = false;
        for (const Action& a : sch.compute_order(r))
          if (a.kind == ActionKind::backward && sch.chunk_of(a.stage_index) == c) {
            ++backwards;
            if (seen) ++after;
            if (a.microbatch == last[static_cast<std::size_t>(c)]) seen = true;
          }
        CHECK(backwards == sch.num_microbatches);
        CHECK(after == 0);
      }
    }
  }
  // A schedule whose compute reads a buffer never received is refused, naming it.
  Schedule broken = OneFOneB{2}.build(2);
  auto& ticks = broken.ticks[1];
  for (auto& tick : ticks)
    std::erase_if(tick, [](const Action& a) { return a.kind == ActionKind::recv_forward && a.microbatch == 1; });
  TagExecutor ex(broken, 1);
  CHECK_THROWS_WITH_AS(walk_step<Tag>(broken, 1, ex),
                       doctest::Contains("F of stage 1, micro-batch 1 before its buffer was computed or received"), Error);
}
