// optim::NonfiniteCheck: a NaN or an infinity in the loss or in any gradient is found before
// the optimizer step, every rank agrees (also when only one rank holds it), the default stops
// with an Error naming the step and the first parameter, and skip counts the skipped steps.
// The gradients are laid out as the policies lay them out: dp replicas counted on one rank
// only, tp shards each counted.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tessera/optim/nonfinite_check.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;

namespace {

constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();
constexpr float inf_f = std::numeric_limits<float>::infinity();

// Three parameters "a" (2x3), "b" (4), "c" (3x2), each gradient filled from (seed, element).
struct Params {
  std::vector<Parameter<float>> owned;
  ParameterList<float> list;
  explicit Params(int seed) {
    owned.emplace_back("a", Tensor<float>(Shape{2, 3}));
    owned.emplace_back("b", Tensor<float>(Shape{4}));
    owned.emplace_back("c", Tensor<float>(Shape{3, 2}));
    for (std::size_t k = 0; k < owned.size(); ++k) {
      std::span<float> g = owned[k].grad.span();
      for (std::size_t i = 0; i < g.size(); ++i) g[i] = 0.25f * float(seed + 1) - 0.1f * float(i) + float(k);
      list.push_back(owned[k]);
    }
  }
};

// The sum of squares of every gradient of `p`, written out.
double squares(const Params& p) {
  double s = 0;
  for (const Parameter<float>& q : p.owned)
    for (float g : q.grad.span()) s += double(g) * g;
  return s;
}

std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const AbortedError& e) {
    return std::string("ABORTED: ") + e.what();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("NonfiniteCheck at 1 rank: finite gradients give the norm of a written-out sum of squares") {
  Params p(0);
  optim::NonfiniteCheck<float> check;
  const auto v = check.check(3, 2.5, optim::gradients_of(p.list), p.list);
  CHECK(v.finite);
  CHECK(testing::rel_error(v.grad_norm, std::sqrt(squares(p))) < 1e-15);
  CHECK(check.skipped_steps() == 0);
}

TEST_CASE("NonfiniteCheck at 1 rank: a NaN in the second parameter stops, naming the step, the parameter and the element") {
  Params p(0);
  p.owned[1].grad.span()[2] = nan_f;
  optim::NonfiniteCheck<float> check;
  const std::string m = message_of([&] { check.check(17, 2.5, optim::gradients_of(p.list), p.list); });
  INFO(m);
  CHECK(m.find("non-finite values at step 17") != std::string::npos);
  CHECK(m.find("the gradient of 'b' holds NaN at element 2") != std::string::npos);
  CHECK(m.find("the loss is 2.5") != std::string::npos);
  CHECK(m.find("(the first found, on this rank)") != std::string::npos);  // not "on rank 0 of this rank"
}

TEST_CASE("NonfiniteCheck at 1 rank: the first parameter in order is named when two hold infinities") {
  Params p(0);
  p.owned[2].grad.span()[0] = inf_f;
  p.owned[0].grad.span()[5] = -inf_f;
  optim::NonfiniteCheck<float> check;
  const std::string m = message_of([&] { check.check(0, 1.0, optim::gradients_of(p.list), p.list); });
  INFO(m);
  CHECK(m.find("the gradient of 'a' holds -inf at element 5") != std::string::npos);
}

TEST_CASE("NonfiniteCheck at 1 rank: an infinite loss with finite gradients stops, naming the loss") {
  Params p(0);
  optim::NonfiniteCheck<float> check;
  const std::string m =
      message_of([&] { check.check(4, std::numeric_limits<double>::infinity(), optim::gradients_of(p.list), p.list); });
  INFO(m);
  CHECK(m.find("non-finite values at step 4: the loss is inf") != std::string::npos);
  CHECK(m.find("every gradient element is finite") != std::string::npos);
  CHECK(m.find("the loss is inf on this rank and") != std::string::npos);
}

TEST_CASE("NonfiniteCheck at 1 rank: skip returns a step not to take and counts it, then goes on") {
  Params p(0);
  optim::NonfiniteCheck<float> check(optim::OnNonfinite::skip);
  p.owned[0].grad.span()[1] = nan_f;
  const auto v1 = check.check(5, 2.0, optim::gradients_of(p.list), p.list);
  CHECK_FALSE(v1.finite);
  CHECK(check.skipped_steps() == 1);
  CHECK(check.last_message().find("step 5") != std::string::npos);
  p.owned[0].grad.span()[1] = 0.5f;  // the next step's gradients are finite again
  const auto v2 = check.check(6, 2.0, optim::gradients_of(p.list), p.list);
  CHECK(v2.finite);
  CHECK(check.skipped_steps() == 1);
  CHECK(testing::rel_error(v2.grad_norm, std::sqrt(squares(p))) < 1e-15);
}

TEST_CASE("NonfiniteCheck at 1 rank: skip with max_consecutive_skips stops after that many steps skipped in a row") {
  Params p(0);
  optim::NonfiniteCheck<float> check(optim::OnNonfinite::skip, 2);
  auto step = [&](std::int64_t s, bool bad) {
    p.owned[0].grad.span()[1] = bad ? nan_f : 0.5f;
    return check.check(s, 2.0, optim::gradients_of(p.list), p.list);
  };
  CHECK_FALSE(step(1, true).finite);
  CHECK_FALSE(step(2, true).finite);
  CHECK(check.consecutive_skips() == 2);
  CHECK(step(3, false).finite);  // a finite step ends the run of skips
  CHECK(check.consecutive_skips() == 0);
  CHECK_FALSE(step(4, true).finite);
  CHECK_FALSE(step(5, true).finite);
  const std::string m = message_of([&] { step(6, true); });
  INFO(m);
  CHECK(m.find("non-finite values at step 6") != std::string::npos);
  CHECK(m.find("the 2 step(s) before it were skipped too") != std::string::npos);
  CHECK(m.find("max_consecutive_skips 2") != std::string::npos);
  CHECK(check.skipped_steps() == 4);
  CHECK_THROWS_WITH_AS(optim::NonfiniteCheck<float>(optim::OnNonfinite::skip, -1),
                       doctest::Contains("max_consecutive_skips -1 must be >= 0"), Error);
}

TEST_CASE("NonfiniteCheck at 1 rank: without parameters the message names the gradient piece") {
  Params p(0);
  p.owned[2].grad.span()[4] = nan_f;
  optim::NonfiniteCheck<float> check;
  const std::string m = message_of([&] { check.check(9, 1.0, optim::gradients_of(p.list)); });
  INFO(m);
  CHECK(m.find("the gradient of gradient piece 2 holds NaN at element 4") != std::string::npos);
}

// Data parallelism: every rank holds the same reduced gradients, counted on rank 0 only (as
// Hybrid counts dp replicas). A NaN that only rank `bad` holds, in pieces it does not count,
// must still stop every rank.
TEST_CASE("NonfiniteCheck, dp at 2, 3 and 4 ranks: a NaN on the last rank only stops every rank with one message") {
  for (int n : {2, 3, 4}) {
    CAPTURE(n);
    const int bad = n - 1;
    const auto msgs = testing::run_ranks(n, [&](Comm& world) {
      Params p(0);  // replicas: the same values everywhere
      if (world.rank() == bad) p.owned[1].grad.span()[3] = nan_f;
      optim::Gradients<float> g{{}, world};
      for (const Parameter<float>& q : p.owned) g.pieces.push_back({q.grad, world.rank() == 0});
      optim::NonfiniteCheck<float> check;
      return message_of([&] { check.check(11, 2.0, g, p.list); });
    });
    for (int r = 0; r < n; ++r) {
      INFO(msgs[static_cast<std::size_t>(r)]);
      CHECK(msgs[static_cast<std::size_t>(r)] == msgs[0]);
    }
    CHECK(msgs[0].find(tessera::detail::str("the gradient of 'b' holds NaN at element 3 (the first found, on rank ", bad,
                                            " of threads:world)")) != std::string::npos);
  }
}

TEST_CASE("NonfiniteCheck, dp at 3 ranks: finite replicas give the norm of one replica, every rank skips nothing") {
  const auto norms = testing::run_ranks(3, [&](Comm& world) {
    Params p(0);
    optim::Gradients<float> g{{}, world};
    for (const Parameter<float>& q : p.owned) g.pieces.push_back({q.grad, world.rank() == 0});
    optim::NonfiniteCheck<float> check(optim::OnNonfinite::skip);
    const auto v = check.check(0, 2.0, g, p.list);
    return v.finite && check.skipped_steps() == 0 ? v.grad_norm : -1.0;
  });
  const double ref = std::sqrt(squares(Params(0)));
  for (double x : norms) CHECK(testing::rel_error(x, ref) < 1e-15);
}

// Tensor parallelism: each rank holds its own shards (different values), each counted. An
// infinity on one rank only: with skip, every rank skips the same steps; the finite steps'
// norm is the norm of all shards together, computed here on one thread.
TEST_CASE("NonfiniteCheck, tp at 2, 3 and 7 ranks: an Inf on rank 1 only is skipped on every rank; finite steps give the serial norm") {
  for (int n : {2, 3, 7}) {
    CAPTURE(n);
    const auto out = testing::run_ranks(n, [&](Comm& world) {
      Params p(world.rank());  // this rank's shards
      optim::Gradients<float> g{{}, world};
      for (const Parameter<float>& q : p.owned) g.pieces.push_back({q.grad, true});
      optim::NonfiniteCheck<float> check(optim::OnNonfinite::skip);
      std::vector<double> r;
      for (int step = 0; step < 3; ++step) {
        p.owned[2].grad.span()[1] = (step == 1 && world.rank() == 1) ? inf_f : 0.5f;
        const auto v = check.check(step, 2.0, g, p.list);
        r.push_back(v.finite ? v.grad_norm : -1.0);
      }
      r.push_back(double(check.skipped_steps()));
      r.push_back(check.last_message().find("'c' holds +inf at element 1 (the first found, on rank 1") !=
                          std::string::npos
                      ? 1.0
                      : 0.0);
      return r;
    });
    double s = 0;
    for (int r = 0; r < n; ++r) {
      Params p(r);
      p.owned[2].grad.span()[1] = 0.5f;
      s += squares(p);
    }
    for (int r = 0; r < n; ++r) {
      const auto& o = out[static_cast<std::size_t>(r)];
      CAPTURE(r);
      CHECK(testing::rel_error(o[0], std::sqrt(s)) < 1e-14);
      CHECK(o[1] == -1.0);
      CHECK(testing::rel_error(o[2], std::sqrt(s)) < 1e-14);
      CHECK(o[3] == 1.0);
      CHECK(o[4] == 1.0);
    }
  }
}

TEST_CASE("NonfiniteCheck, tp at 4 ranks: stop throws the same Error on every rank, none an AbortedError") {
  const auto msgs = testing::run_ranks(4, [&](Comm& world) {
    Params p(world.rank());
    if (world.rank() == 2) p.owned[0].grad.span()[0] = nan_f;
    if (world.rank() == 3) p.owned[0].grad.span()[0] = inf_f;  // a later rank: not the one named
    optim::Gradients<float> g{{}, world};
    for (const Parameter<float>& q : p.owned) g.pieces.push_back({q.grad, true});
    optim::NonfiniteCheck<float> check;
    return message_of([&] { check.check(8, 3.0, g, p.list); });
  });
  for (const std::string& m : msgs) {
    INFO(m);
    CHECK(m == msgs[0]);
    CHECK(m.find("ABORTED") == std::string::npos);
    CHECK(m.find("step 8: the gradient of 'a' holds NaN at element 0 (the first found, on rank 2 of threads:world)") !=
          std::string::npos);
  }
}
