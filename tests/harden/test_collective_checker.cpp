// CollectiveChecker (comm/collective_checker.hpp): ranks that run a tensor-parallel layer a
// data-dependent number of times issue collectives of one signature in different orders.
// The threads backend pairs them silently (wrong values, no error); with the checker on, every
// rank throws the same MismatchError at the first divergence, naming both call sites.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "tessera/comm/collective_checker.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/parallel/tensor/row_parallel.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;

namespace {

// A 4 -> 3 linear layer with fixed values, and a (5, 4) input.
nn::Linear<float> full_layer() {
  Tensor<float> w(Shape{4, 3}), b(Shape{3});
  for (std::int64_t i = 0; i < 4; ++i)
    for (std::int64_t j = 0; j < 3; ++j) w(i, j) = 0.1f * float(i + 1) - 0.2f * float(j);
  for (std::int64_t j = 0; j < 3; ++j) b(j) = 0.5f * float(j);
  return nn::Linear<float>("p", w, b);
}
Tensor<float> input() {
  Tensor<float> x(Shape{5, 4});
  for (std::int64_t r = 0; r < 5; ++r)
    for (std::int64_t c = 0; c < 4; ++c) x(r, c) = 0.3f * float(r) - 0.25f * float(c) + 1.0f;
  return x;
}

// The message of the Error `fn` throws ("" if none).
std::string error_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// An environment variable set for a test case (set(nullptr): unset) and restored at its end.
class ScopedEnv {
 public:
  explicit ScopedEnv(const char* name) : name_(name) {
    const char* v = std::getenv(name);
    had_ = v != nullptr;
    if (had_) old_ = v;
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  ~ScopedEnv() { set(had_ ? old_.c_str() : nullptr); }
  void set(const char* v) const {
    if (v) ::setenv(name_, v, 1); else ::unsetenv(name_);
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

std::atomic<int> final_all_reduce_line{0};  // written by every rank, the same value

// Two steps; in step s this rank runs the row-parallel layer iters[s] times (a data-dependent
// loop: in a real program the count comes from its own data) and accumulates the outputs, then
// all-reduces the accumulator: a collective of the layer's own signature (15 floats, sum).
std::vector<float> body(Comm& tp, const std::vector<std::vector<int>>& iters) {
  nn::Linear<float> full = full_layer();
  RowParallel<nn::Linear<float>> row(full, tp);
  const std::int64_t w = 4 / tp.size(), c0 = w * tp.rank();
  const Tensor<float> x = input().slice(1, c0, c0 + w).contiguous();
  std::vector<float> out;
  for (int step = 0; step < 2; ++step) {
    Tensor<float> acc(Shape{5, 3});
    for (int i = 0; i < iters[static_cast<std::size_t>(tp.rank())][static_cast<std::size_t>(step)]; ++i)
      acc.add_(row.forward(with_layout<Shard<-1>>(x)).output.value);
    final_all_reduce_line = __LINE__ + 1;
    tp.all_reduce(acc.span());
    out.insert(out.end(), acc.span().begin(), acc.span().end());
  }
  return out;
}

// The same written out on one thread: the serial layer's output, times the iterations summed
// over the ranks.
std::vector<float> serial(const std::vector<std::vector<int>>& iters) {
  nn::Linear<float> full = full_layer();
  const Tensor<float> y = full.forward(input()).output;
  std::vector<float> out;
  for (int step = 0; step < 2; ++step) {
    int k = 0;
    for (const auto& r : iters) k += r[static_cast<std::size_t>(step)];
    for (float v : y.span()) out.push_back(float(k) * v);
  }
  return out;
}

std::string message_of(const std::function<std::vector<float>()>& fn) {
  try {
    fn();
  } catch (const MismatchError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("OTHER: ") + e.what();
  }
  return "(no error)";
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  return testing::max_rel_error(std::span<const float>(a), std::span<const float>(b));
}
bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return testing::bitwise_equal_finite(std::span<const float>(a), std::span<const float>(b));
}

const std::vector<std::vector<int>> diverging = {{3, 2}, {2, 3}};  // 7 collectives on each rank
const std::vector<std::vector<int>> agreeing = {{2, 3}, {2, 3}};

}  // namespace

TEST_CASE("Without the checker, ranks looping 3+2 and 2+3 times through a RowParallel layer pair their collectives silently and compute wrong values") {
  const auto out = testing::run_ranks(2, [](Comm& tp) { return body(tp, diverging); },
                                      threads::RunOptions{.check_collectives = false});
  // Step 0 should hold (3 + 2) serial outputs on both ranks; each rank holds something else.
  const std::vector<float> ref = serial(diverging);
  for (const auto& o : out) CHECK(rel(o, ref) > 0.1);
}

TEST_CASE("CollectiveChecker: agreeing ranks get the serial values, bitwise the same as without the checker, at tp 1, 2 and 4") {
  for (int tp : {1, 2, 4}) {
    CAPTURE(tp);
    const std::vector<std::vector<int>> iters(static_cast<std::size_t>(tp), std::vector<int>{2, 3});
    const auto on = testing::run_ranks(tp, [&](Comm& c) { return body(c, iters); }, threads::RunOptions{.check_collectives = true});
    const auto off = testing::run_ranks(tp, [&](Comm& c) { return body(c, iters); }, threads::RunOptions{.check_collectives = false});
    const std::vector<float> ref = serial(iters);
    for (int r = 0; r < tp; ++r) {
      CHECK(rel(on[static_cast<std::size_t>(r)], ref) < 1e-5);
      CHECK(same(on[static_cast<std::size_t>(r)], off[static_cast<std::size_t>(r)]));
    }
  }
}

TEST_CASE("CollectiveChecker: the data-dependent loop fails on every rank at the first divergence, naming both call sites") {
  const auto msgs = testing::run_ranks(2, [](Comm& tp) { return message_of([&] { return body(tp, diverging); }); },
                                       threads::RunOptions{.check_collectives = true});
  const std::string test_site = "test_collective_checker.cpp:" + std::to_string(final_all_reduce_line.load()) + " (body)";
  for (const std::string& m : msgs) {
    INFO(m);
    CHECK(m == msgs[0]);
    // Collectives 1 and 2 are the layer's on both ranks; the third is rank 0's layer call and
    // rank 1's final all-reduce. The layer's site is RowParallelLinear's own line, not the
    // shared tp helper's (all_reduce_sum passes its caller's SourceLocation on).
    CHECK(m.find("collective mismatch on threads:world at its collective #3: rank 0 called all_reduce(float32, "
                 "count=15, sum) at tessera/parallel/tensor/row_parallel.hpp:") != std::string::npos);
    CHECK(m.find("sharding.hpp") == std::string::npos);
    CHECK(m.find("but rank 1 called all_reduce(float32, count=15, sum) at ") != std::string::npos);
    CHECK(m.find("/harden/" + test_site + " (the ranks issued different sequences") != std::string::npos);
  }
}

TEST_CASE("CollectiveChecker: split communicators are checked too (the tp axis of a dp 2 x tp 2 mesh, one dp replica diverging)") {
  const auto msgs = testing::run_ranks(4, [](Comm& world) {
    Mesh mesh(world, MeshShape{.dp = 2, .tp = 2});
    // dp replica 1's tp ranks disagree; replica 0's agree and finish.
    const std::vector<std::vector<int>> iters = mesh.coord().dp == 1 ? diverging : agreeing;
    return message_of([&] { return body(mesh.tp(), iters); });
  }, threads::RunOptions{.check_collectives = true});
  CHECK(msgs[0] == "(no error)");
  CHECK(msgs[1] == "(no error)");
  for (int r : {2, 3}) {
    INFO(msgs[static_cast<std::size_t>(r)]);
    CHECK(msgs[static_cast<std::size_t>(r)].find("collective mismatch on threads:world/tp[pp=0,dp=1] at its collective #3") !=
          std::string::npos);
  }
}

TEST_CASE("CollectiveChecker: different calls (barrier against broadcast) are named with their call sites") {
  std::atomic<int> barrier_line{0}, broadcast_line{0};
  const auto msgs = testing::run_ranks(3, [&](Comm& world) {
    return message_of([&] {
      std::vector<float> v(4, 1.0f);
      world.all_reduce(v);
      if (world.rank() == 2) {
        barrier_line = __LINE__ + 1;
        world.barrier();
      } else {
        broadcast_line = __LINE__ + 1;
        world.broadcast(v, 1);
      }
      return v;
    });
  }, threads::RunOptions{.check_collectives = true});
  for (const std::string& m : msgs) {
    INFO(m);
    CHECK(m == msgs[0]);
    CHECK(m.find("at its collective #2: rank 0 called broadcast(float32, count=4, root=1) at ") != std::string::npos);
    CHECK(m.find("harden/test_collective_checker.cpp:" + std::to_string(broadcast_line.load()) + " (operator()) but rank 2") !=
          std::string::npos);
    CHECK(m.find("but rank 2 called barrier() at ") != std::string::npos);
    CHECK(m.find("harden/test_collective_checker.cpp:" + std::to_string(barrier_line.load()) + " (operator()) (the ranks") !=
          std::string::npos);
  }
}

TEST_CASE("CollectiveChecker from the environment: TESSERA_DEBUG_COLLECTIVES=detail turns it on in threads::run") {
  // Run by meson a second time with the variable set (test 'collective_checker_env'); this
  // case is excluded from the plain run.
  const char* v = std::getenv("TESSERA_DEBUG_COLLECTIVES");
  REQUIRE(v != nullptr);
  CHECK(threads::RunOptions{}.check_collectives);
  const auto msgs = testing::run_ranks(2, [](Comm& tp) { return message_of([&] { return body(tp, diverging); }); });
  for (const std::string& m : msgs) CHECK(m.find("at its collective #3") != std::string::npos);
}

TEST_CASE("TESSERA_DEBUG_COLLECTIVES: each setting is read as documented, and a value that is not one is refused naming it") {
  const ScopedEnv env("TESSERA_DEBUG_COLLECTIVES");
  const auto with = [&](const char* v) { env.set(v); };
  with(nullptr);
  CHECK(collective_debug_from_environment() == CollectiveDebug::off);
  with("");
  CHECK(collective_debug_from_environment() == CollectiveDebug::off);
  with("0");
  CHECK(collective_debug_from_environment() == CollectiveDebug::off);
  CHECK_FALSE(collective_checks_from_environment());
  with("1");
  CHECK(collective_debug_from_environment() == CollectiveDebug::signatures);
  CHECK_FALSE(collective_checks_from_environment());
  with("detail");
  CHECK(collective_checks_from_environment());
  CHECK(threads::RunOptions{}.check_collectives);
  with("DETAIL");
  CHECK(collective_checks_from_environment());
  for (const char* bad : {"detial", "yes", "2", " detail"}) {
    with(bad);
    const std::string msg = error_message([] { static_cast<void>(collective_debug_from_environment()); });
    CHECK_MESSAGE(msg.find(std::string("'") + bad + "'") != std::string::npos, msg);
    CHECK(msg.find("detail") != std::string::npos);
    CHECK_THROWS_AS(static_cast<void>(threads::RunOptions{}), Error);
  }
}

TEST_CASE("TESSERA_TIMEOUT: seconds from 0.001 to 1e8 are read, unset or empty is 60 s, and anything else is refused naming it") {
  const ScopedEnv env("TESSERA_TIMEOUT");
  const auto with = [&](const char* v) { env.set(v); };
  with(nullptr);
  CHECK(default_timeout() == std::chrono::seconds(60));
  with("");
  CHECK(default_timeout() == std::chrono::seconds(60));
  with("2.5");
  CHECK(default_timeout() == std::chrono::milliseconds(2500));
  CHECK(threads::RunOptions{}.timeout == std::chrono::milliseconds(2500));
  with("0.001");
  CHECK(default_timeout() == std::chrono::milliseconds(1));
  with("1e8");
  CHECK(default_timeout() == std::chrono::milliseconds(100000000000LL));
  // Before session 18 each of these left 60 s (or read "10abc" as 10) without a word.
  for (const char* bad : {"abc", "10abc", "0", "-1", "nan", "inf", "1e9", "0.0001", " "}) {
    with(bad);
    const std::string msg = error_message([] { static_cast<void>(default_timeout()); });
    CHECK_MESSAGE(msg.find(std::string("TESSERA_TIMEOUT='") + bad + "'") != std::string::npos, bad, ": ", msg);
    CHECK_THROWS_AS(static_cast<void>(threads::RunOptions{}), Error);
  }
}
