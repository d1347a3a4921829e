// The parameter server on the threads backend: synchronous runs against the serial run and,
// bitwise, against a data-parallel step done by hand; stale-synchronous runs with a
// deliberately slow worker (the staleness bound, measured by the workers themselves and reached;
// convergence; s = 0 equals data parallelism); termination; errors that name the numbers, on
// every rank.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "ps/ps_bodies.hpp"
#include "tessera/parallel/ps/parameter_server.hpp"
#include "tessera/testing/run_ranks.hpp"

using namespace tessera;
using namespace ps_bodies;
using testing::run_ranks;

namespace {

// Runs Config c on `world_size` thread ranks and returns every rank's result.
template <class T>
std::vector<RankResult<T>> run_ps(int world_size, const Config& c) {
  return run_ranks(world_size, [&](Comm& w) { return ps_run<T>(w, c); });
}

// Every worker holds the same values; the servers' shards, placed at their key ranges, are
// those values too (bitwise). Returns worker 0's values.
template <class T>
std::vector<T> check_consistent(const std::vector<RankResult<T>>& rs) {
  const std::vector<T>& v0 = rs.front().values;
  std::vector<T> from_servers(v0.size(), T(-12345));
  for (const RankResult<T>& r : rs) {
    if (r.server) {
      for (std::size_t i = 0; i < r.values.size(); ++i)
        from_servers[static_cast<std::size_t>(r.key_begin) + i] = r.values[i];
    } else {
      CHECK(bitwise_equal(r.values, v0));
    }
  }
  CHECK(bitwise_equal(from_servers, v0));
  return v0;
}

template <class T>
void check_sync_equivalence(int world_size, int num_servers, Opt opt) {
  CAPTURE(world_size);
  CAPTURE(num_servers);
  Config c{.num_servers = num_servers, .opt = opt};
  const int W = world_size - num_servers;
  const std::vector<T> ps = check_consistent(run_ps<T>(world_size, c));
  const std::vector<T> serial = serial_run<T>(c, W);
  const std::vector<T> initial = flatten(make_mlp<T>(c, 1000).parameters());
  REQUIRE(ps.size() == serial.size());
  CHECK(relative_error(ps, initial) > 1e-3);  // training moved the parameters
  CHECK(relative_error(ps, serial) < (sizeof(T) == 4 ? 2e-6 : 1e-13));
  // The data-parallel reference on W ranks: SUM all-reduce in rank order, then * (1 / N).
  const std::vector<std::vector<T>> dp = run_ranks(W, [&](Comm& w) { return dp_reference_run<T>(w, c); });
  CHECK(bitwise_equal(ps, dp.front()));
}

// Runs Regression r on `num_workers` workers and r.num_servers servers, with shared clocks.
std::vector<RegressionResult> run_regression(int num_workers, Regression r) {
  std::vector<std::atomic<std::int64_t>> clocks(static_cast<std::size_t>(num_workers));
  r.clocks = clocks.data();
  return run_ranks(num_workers + r.num_servers, [&](Comm& w) { return regression_run<float>(w, r); });
}

// The staleness bound s, as the workers saw it: every pull got from every server values at
// least 0 and at most s of the worker's own steps old (read off the version probe), never older
// than the pull before; every worker other than the slow one that runs more than s steps got
// values exactly s steps old from every server at least once (the bound is reached, so the
// server is not synchronous). The shared clocks agree: no worker's pull returned while it was
// more than s steps ahead of the slowest running worker, and a fast one was s ahead. The
// servers applied every step: their shards went through max(steps) global steps.
void check_bound(const std::vector<RegressionResult>& rs, const Regression& r, int num_workers) {
  const int s = r.staleness, S = r.num_servers;
  int last = 0;
  std::int64_t pushes = 0;
  for (int w = 0; w < num_workers; ++w) {
    last = std::max(last, steps_of(r, w));
    pushes += steps_of(r, w);
  }
  std::int64_t fast_gap = 0;
  bool any_fast = false;
  for (const RegressionResult& x : rs) {
    CAPTURE(x.server);
    CAPTURE(x.index);
    CHECK(x.error.empty());
    if (x.server) {
      REQUIRE(x.versions.size() == 1);
      CHECK(x.versions[0][0] == last);
      CHECK(x.stats.steps == last);
      CHECK(x.stats.pushes == pushes);
      CHECK(x.stats.pulls == pushes);
      continue;
    }
    const ObservedStaleness o = observed_staleness(x, S);
    REQUIRE(o.pulls == steps_of(r, x.index));
    CHECK(o.min >= 0);
    CHECK(o.monotone);
    CHECK(x.max_gap_seen <= s);
    const bool fast = x.index != r.slow_worker && steps_of(r, x.index) > s;
    for (int q = 0; q < S; ++q) {
      CAPTURE(q);
      const std::int64_t m = o.max[static_cast<std::size_t>(q)];
      CHECK(m <= s);          // never beyond the bound
      if (fast) CHECK(m == s);  // and reached
    }
    if (fast) {
      any_fast = true;
      fast_gap = std::max(fast_gap, x.max_gap_seen);
    }
  }
  if (any_fast) CHECK(fast_gap == s);
}

// Runs `body` on n thread ranks, each catching its own exception, and checks that every rank
// threw a tessera::Error of its own containing `expected`, the same message on every rank. A
// rank that only saw another rank fail (AbortedError, whose message quotes the first failure)
// or waited for one (TimeoutError) did not detect the problem itself, and fails the check.
template <class F>
void check_every_rank_fails(int n, F body, const std::string& expected) {
  CAPTURE(n);
  CAPTURE(expected);
  const threads::RunOptions quick{.timeout = std::chrono::seconds(5)};  // a rank left waiting fails fast
  const std::vector<std::string> ms = run_ranks(
      n,
      [&](Comm& w) -> std::string {
        try {
          body(w);
        } catch (const AbortedError& e) {
          return std::string("AbortedError (another rank failed): ") + e.what();
        } catch (const TimeoutError& e) {
          return std::string("TimeoutError (another rank did not come): ") + e.what();
        } catch (const Error& e) {
          return e.what();
        }
        return "no error";
      },
      quick);
  for (int r = 0; r < n; ++r) {
    const std::string& m = ms[static_cast<std::size_t>(r)];
    CAPTURE(r);
    CAPTURE(m);
    CHECK(m.rfind("AbortedError", 0) == std::string::npos);
    CHECK(m.rfind("TimeoutError", 0) == std::string::npos);
    CHECK(m.find(expected) != std::string::npos);
    CHECK(m == ms.front());
  }
}

}  // namespace

TEST_CASE("ParameterServer: 5 synchronous steps at world sizes 2, 3, 4 (1 to 3 servers) equal 5 serial steps on the global batch") {
  for (Opt opt : {Opt::adamw, Opt::sgd_momentum}) {
    CAPTURE(static_cast<int>(opt));
    for (auto [n, s] : {std::pair{2, 1}, {3, 1}, {3, 2}, {4, 1}, {4, 2}, {4, 3}}) {
      check_sync_equivalence<float>(n, s, opt);
      check_sync_equivalence<double>(n, s, opt);
    }
  }
}

TEST_CASE("ParameterServer: the layout splits 148 keys into contiguous ranges of 49, 49 and 50, parameters straddling servers") {
  nn::MLP<float> m(4);
  const ParameterServerLayout l(m.parameters(), 3);
  REQUIRE(l.num_keys() == 148);  // c_fc.weight 64, c_fc.bias 16, c_proj.weight 64, c_proj.bias 4
  CHECK(l.key_begin(0) == 0);
  CHECK(l.key_end(0) == 49);
  CHECK(l.key_end(1) == 98);
  CHECK(l.key_end(2) == 148);
  REQUIRE(l.pieces(0).size() == 1);  // c_fc.weight [0, 49)
  REQUIRE(l.pieces(1).size() == 3);  // c_fc.weight [49, 64), c_fc.bias, c_proj.weight [0, 18)
  CHECK(l.pieces(1)[0].name == "c_fc.weight");
  CHECK(l.pieces(1)[0].param_offset == 49);
  CHECK(l.pieces(1)[0].length == 15);
  CHECK(l.pieces(1)[1].name == "c_fc.bias");
  CHECK(l.pieces(1)[1].shard_offset == 15);
  CHECK(l.pieces(1)[2].name == "c_proj.weight");
  CHECK(l.pieces(1)[2].length == 18);
  REQUIRE(l.pieces(2).size() == 2);  // c_proj.weight [18, 64), c_proj.bias
  CHECK(l.pieces(2)[0].param_offset == 18);
  CHECK(l.pieces(2)[0].length == 46);
  CHECK(l.pieces(2)[1].length == 4);
  // Fewer keys than servers: some shards are empty, and a run still works.
  nn::Linear<float> tiny(1, 1);  // 2 keys
  const ParameterServerLayout t(tiny.parameters(), 3);
  CHECK(t.shard_size(0) == 0);
  CHECK(t.shard_size(1) == 1);
  CHECK(t.shard_size(2) == 1);
}

TEST_CASE("ParameterServer: a server with an empty shard (2 keys over 3 servers) still trains like the serial run") {
  const auto rs = run_ranks(4, [](Comm& w) {
    nn::Linear<double> lin(1, 1, nn::LayerInit{.seed = 3, .std = 1.0});
    ParameterServer<double> ps(w, lin.parameters(), {.num_servers = 3});
    if (ps.is_server()) {
      optim::SGD<double> opt(ps.shard_parameters(), {.lr = 0.1});
      ps.serve(opt);
      return std::vector<double>{};
    }
    for (int t = 0; t < 3; ++t) {
      lin.parameters().zero_grad();
      lin.weight().grad.fill(2.0);  // SUM gradient of 2 samples
      lin.bias()->grad.fill(4.0);
      ps.step(lin, 2);
    }
    return flatten(lin.parameters());
  });
  nn::Linear<double> ref(1, 1, nn::LayerInit{.seed = 3, .std = 1.0});
  double w = ref.weight().value(0, 0), b = ref.bias()->value(0);
  for (int t = 0; t < 3; ++t) {  // mean gradients 2 / 2 = 1 and 4 / 2 = 2, lr 0.1
    w -= 0.1 * 1.0;
    b -= 0.1 * 2.0;
  }
  CHECK(rs[0] == std::vector<double>{w, b});
}

TEST_CASE("ParameterServer: every rank starts from world rank 0's values, whatever its own initialization") {
  const auto rs = run_ranks(3, [](Comm& w) {
    nn::MLP<float> m(4, nn::LayerInit{.seed = 100 + static_cast<std::uint64_t>(w.rank())});
    ParameterServer<float> ps(w, m.parameters(), {.num_servers = 1});
    std::vector<float> v = flatten(m.parameters());
    if (ps.is_server()) {
      optim::SGD<float> opt(ps.shard_parameters());
      ps.serve(opt);
    } else {
      ps.finish();
    }
    return v;
  });
  const std::vector<float> rank0 = flatten(nn::MLP<float>(4, nn::LayerInit{.seed = 100}).parameters());
  for (const auto& v : rs) CHECK(v == rank0);
}

TEST_CASE("ParameterServer: push, pull and wait by timestamp, the worker busy between pull and wait, equal data parallelism bitwise") {
  Config c{.num_servers = 2, .busy_ms = 2};
  const auto rs = run_ps<float>(5, c);
  for (const auto& r : rs) CHECK(r.error.empty());
  const std::vector<std::vector<float>> dp = run_ranks(3, [&](Comm& w) { return dp_reference_run<float>(w, c); });
  CHECK(bitwise_equal(check_consistent(rs), dp.front()));
}

TEST_CASE("ParameterServer: async with staleness 0 and a slow worker equals the data-parallel reference bitwise") {
  Config c{.num_servers = 2, .mode = ParameterServerMode::async, .staleness = 0, .steps = 6, .slow_worker = 0,
           .slow_ms = 3};
  const std::vector<float> ps = check_consistent(run_ps<float>(5, c));
  const std::vector<float> initial = flatten(make_mlp<float>(c, 1000).parameters());
  CHECK(relative_error(ps, initial) > 1e-3);  // training moved the parameters
  // The independent reference: SUM all-reduce in rank order over the 3 workers, then * (1 / N).
  const std::vector<std::vector<float>> dp = run_ranks(3, [&](Comm& w) { return dp_reference_run<float>(w, c); });
  CHECK(bitwise_equal(ps, dp.front()));
}

TEST_CASE("ParameterServer: SSP with one slow worker, measured on the workers: with 1 and 2 servers and s = 0 to 3 the "
          "others read values exactly s steps old, never older") {
  for (int servers : {1, 2})
    for (int s : {0, 1, 2, 3}) {
      CAPTURE(servers);
      CAPTURE(s);
      const Regression r{.steps = 10, .num_servers = servers, .staleness = s, .slow_worker = 1, .slow_ms = 15};
      check_bound(run_regression(3, r), r, 3);
    }
}

TEST_CASE("ParameterServer: SSP with workers that finish early, measured on the workers: the bound holds and is "
          "reached") {
  struct Case {
    int servers;
    std::vector<int> steps;
  };
  // A fast worker stops after 3 steps; the slow worker stops after 4 (the fast ones then run
  // on without it); both with 1 and 2 servers.
  for (const Case& k : {Case{1, {10, 10, 3}}, Case{2, {10, 10, 3}}, Case{1, {10, 4, 10}}, Case{2, {10, 4, 10}}}) {
    CAPTURE(k.servers);
    CAPTURE(k.steps[1]);
    const Regression r{.steps = 10, .num_servers = k.servers, .staleness = 2, .slow_worker = 1, .slow_ms = 15,
                       .worker_steps = k.steps};
    check_bound(run_regression(3, r), r, 3);
  }
}

TEST_CASE("ParameterServer: SSP with staleness 2 and a slow worker reads stale values and still converges on linear "
          "regression") {
  for (int servers : {1, 2}) {
    CAPTURE(servers);
    const Regression r{.num_servers = servers, .staleness = 2, .slow_worker = 0, .slow_ms = 2};
    const auto rs = run_regression(3, r);
    check_bound(rs, r, 3);  // stale reads happened: the bound was reached
    for (const auto& x : rs) {
      if (x.server) {
        CHECK(x.stats.max_staleness <= 2);
        continue;
      }
      CHECK(x.initial_loss > 1.0);
      CHECK(x.final_loss < 1e-4);
      CHECK(x.stats.max_staleness <= 2);
    }
  }
}

TEST_CASE("ParameterServer: workers that stop early send done; later steps average over the workers still pushing") {
  Config c{.num_servers = 2, .steps = 5, .worker_steps = {5, 3, 4}};
  const auto rs = run_ps<double>(5, c);
  for (const auto& r : rs)
    if (r.server) CHECK(r.stats.steps == 5);
  CHECK(relative_error(rs[0].values, serial_run<double>(c, 3)) < 1e-13);
  // Workers 1 and 2 stopped with the values of their last pull.
  CHECK(rs[1].values != rs[0].values);
}

TEST_CASE("ParameterServer: a worker's destructor sends done, so the servers return without finish()") {
  Config c{.num_servers = 1, .steps = 2, .explicit_finish = false};
  const auto rs = run_ps<float>(3, c);
  CHECK(rs[2].stats.steps == 2);
  CHECK(bitwise_equal(rs[0].values, rs[1].values));
}

TEST_CASE("ParameterServer: bad options fail on every rank naming the numbers") {
  auto bad = [](ParameterServerOptions o) {
    return [o](Comm& w) {
      nn::Linear<float> lin(2, 2);
      ParameterServer<float> ps(w, lin.parameters(), o);
    };
  };
  check_every_rank_fails(3, bad({.num_servers = 3}), "num_servers = 3 must lie in [1, world size - 1] = [1, 2]");
  check_every_rank_fails(3, bad({.num_servers = 0}), "num_servers = 0");
  check_every_rank_fails(3, bad({.num_servers = 1, .staleness = 2}),
                         "mode sync waits for every worker (staleness 0) but staleness = 2");
  check_every_rank_fails(2, bad({.num_servers = 1, .mode = ParameterServerMode::async, .staleness = -1}),
                         "staleness must be >= 0, got -1");
  // Options that differ between ranks: only rank 2's differ, every rank must say so.
  check_every_rank_fails(
      3,
      [](Comm& w) {
        nn::Linear<float> lin(2, 2);
        ParameterServer<float> ps(w, lin.parameters(),
                                  {.num_servers = 1, .mode = ParameterServerMode::async, .staleness = w.rank() == 2 ? 1 : 2});
      },
      "rank 2 passes options {num_servers 1, mode async, staleness 1");
}

TEST_CASE("ParameterServer: parameter lists that differ between ranks fail on every rank naming both shapes, no hang") {
  check_every_rank_fails(
      3,
      [](Comm& w) {
        nn::Linear<float> lin(2, w.rank() == 1 ? 3 : 2);
        ParameterServer<float> ps(w, lin.parameters(), {.num_servers = 1});
      },
      "parameter 0 is \"weight\" of shape (2, 2) on rank 0 but \"weight\" of shape (2, 3) on rank 1");
  check_every_rank_fails(
      2,
      [](Comm& w) {
        nn::Linear<float> lin(2, 2, {}, w.rank() == 0);  // rank 1 has no bias
        ParameterServer<float> ps(w, lin.parameters(), {.num_servers = 1});
      },
      "rank 1 passes 1 parameters but rank 0 passes 2");
}

TEST_CASE("ParameterServer: pushing or pulling another parameter list, a negative count or a bad timestamp names the numbers") {
  const auto rs = run_ranks(2, [](Comm& w) {
    nn::Linear<float> lin(2, 3);
    ParameterServer<float> ps(w, lin.parameters(), {.num_servers = 1});
    std::vector<std::string> errs;
    auto record = [&](auto&& f) {
      try {
        f();
        errs.push_back("no error");
      } catch (const Error& e) {
        errs.push_back(e.what());
      }
    };
    if (ps.is_server()) {
      record([&] { ps.push(lin.parameters(), 1); });
      optim::SGD<float> opt(ps.shard_parameters());
      ps.serve(opt);
      record([&] { ps.serve(opt); });
      return errs;
    }
    nn::Linear<float> other(3, 3);
    nn::Linear<float> no_bias(2, 3, {}, false);
    record([&] { ps.push(other.parameters(), 1); });
    record([&] { ps.pull(no_bias.parameters()); });
    record([&] { ps.push(lin.parameters(), -1); });
    record([&] { ps.wait(0); });
    record([&] { ps.shard_parameters(); });
    ps.finish();
    record([&] { ps.push(lin.parameters(), 1); });
    return errs;
  });
  const auto& wk = rs[0];
  CHECK(wk[0].find("ParameterServer::push: parameter 0 (\"weight\") has 9 values and 9 gradient elements, shape (3, 3), "
                   "but the parameter server was built with \"weight\" of shape (2, 3) (6 elements)") != std::string::npos);
  CHECK(wk[1].find("ParameterServer::pull: the list has 1 parameters but the parameter server was built with 2") !=
        std::string::npos);
  CHECK(wk[2].find("passes count -1") != std::string::npos);
  CHECK(wk[3].find("timestamp 0, which was never issued") != std::string::npos);
  CHECK(wk[4].find("rank 0 is a worker; only servers (ranks 1 to 1) serve") != std::string::npos);
  CHECK(wk[5].find("worker 0 has already called finish()") != std::string::npos);
  const auto& sv = rs[1];
  CHECK(sv[0].find("ParameterServer::push: rank 1 is server 0; only workers (ranks 0 to 0)") != std::string::npos);
  CHECK(sv[1].find("has already served") != std::string::npos);
}

TEST_CASE("ParameterServer: a step whose counts sum to 0 fails on the server naming the step, and no rank hangs") {
  std::string msg;
  try {
    run_ranks(3, [](Comm& w) {
      nn::Linear<float> lin(2, 2);
      ParameterServer<float> ps(w, lin.parameters(), {.num_servers = 1});
      if (ps.is_server()) {
        optim::SGD<float> opt(ps.shard_parameters());
        ps.serve(opt);
      } else {
        ps.step(lin, 0);
      }
    });
  } catch (const Error& e) {
    msg = e.what();
  }
  CHECK(msg.find("step 1 on server 0 has a total sample count of 0") != std::string::npos);
}

TEST_CASE("ParameterServer: a server that hears nothing for the timeout names the workers it waits for") {
  std::string msg;
  try {
    run_ranks(
        3,
        [](Comm& w) {
          nn::Linear<float> lin(2, 2);
          ParameterServer<float> ps(w, lin.parameters(), {.num_servers = 1});
          if (ps.is_server()) {
            optim::SGD<float> opt(ps.shard_parameters());
            ps.serve(opt);
          } else if (w.rank() == 0) {
            ps.finish();
          } else {
            std::this_thread::sleep_for(std::chrono::milliseconds(600));  // never pushes in time
            throw Error("worker 1 gave up");
          }
        },
        threads::RunOptions{.timeout = std::chrono::milliseconds(200)});
  } catch (const Error& e) {
    msg = e.what();
  }
  CHECK(msg.find("received nothing for") != std::string::npos);
  CHECK(msg.find("waiting for worker 1 (rank 1) at clock 0") != std::string::npos);
}
