// The parameter server on the threads backend: synchronous runs against the serial run and,
// bitwise, against a data-parallel step done by hand; stale-synchronous runs with a
// deliberately slow worker (the staleness bound, instrumented; convergence; s = 0 equals sync);
// termination; errors that name the numbers.
#include <doctest/doctest.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "ps/ps_bodies.hpp"
#include "tessera/parallel/parameter_server.hpp"
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
      CHECK(r.values == v0);
    }
  }
  CHECK(from_servers == v0);
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
  CHECK(ps == dp.front());
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
  CHECK(check_consistent(rs) == dp.front());
}

TEST_CASE("ParameterServer: async with staleness 0 and a slow worker equals sync bitwise") {
  Config sync{.num_servers = 2, .steps = 6, .slow_worker = 0, .slow_ms = 3};
  Config async = sync;
  async.mode = ParameterServerMode::async;
  const auto a = run_ps<float>(5, sync);
  const auto b = run_ps<float>(5, async);
  CHECK(check_consistent(a) == check_consistent(b));
  for (const auto& r : b) CHECK(r.stats.max_staleness == 0);
}

TEST_CASE("ParameterServer: SSP with one slow worker keeps every worker at most s steps ahead of the slowest, and reaches s") {
  for (int s : {0, 1, 2, 3}) {
    CAPTURE(s);
    std::vector<std::atomic<std::int64_t>> clocks(3);
    Config c{.num_servers = 1, .mode = ParameterServerMode::async, .staleness = s, .steps = 10, .opt = Opt::sgd_momentum,
             .slow_worker = 1, .slow_ms = 10, .clocks = clocks.data()};
    const auto rs = run_ps<float>(4, c);
    const RankResult<float>& server = rs[3];
    REQUIRE(server.server);
    // The server's own count of (pulling worker's clock - version it returned) and of
    // (clock - slowest running worker's clock) at every answered pull.
    CHECK(server.stats.max_staleness == s);
    CHECK(server.stats.max_clock_gap == s);
    CHECK(server.stats.steps == 10);
    CHECK(server.stats.pushes == 30);
    CHECK(server.stats.pulls == 30);
    // The fast workers run ahead up to the bound, and not beyond; the slow one (worker 1)
    // never sees values more than s steps old either.
    for (int w : {0, 2}) CHECK(rs[static_cast<std::size_t>(w)].stats.max_staleness == s);
    CHECK(rs[1].stats.max_staleness <= s);
    // Measured independently of the servers (shared clocks set before each push): the gap
    // between a worker's clock when its pull returned and the slowest clock.
    for (int w = 0; w < 3; ++w) CHECK(rs[static_cast<std::size_t>(w)].max_gap_seen <= s);
    if (s > 0) CHECK(std::max(rs[0].max_gap_seen, rs[2].max_gap_seen) >= 1);
  }
}

TEST_CASE("ParameterServer: SSP with staleness 2 and a slow worker converges on linear regression") {
  for (int servers : {1, 2}) {
    CAPTURE(servers);
    Regression r{.num_servers = servers, .staleness = 2, .slow_worker = 0, .slow_ms = 1};
    const auto rs = run_ranks(3 + servers, [&](Comm& w) { return regression_run<float>(w, r); });
    for (const auto& x : rs) {
      if (x.server) {
        CHECK(x.stats.steps == r.steps);
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
  CHECK(rs[0].values == rs[1].values);
}

TEST_CASE("ParameterServer: bad options fail on every rank naming the numbers") {
  auto message = [](int n, ParameterServerOptions o) {
    try {
      run_ranks(n, [&](Comm& w) {
        nn::Linear<float> lin(2, 2);
        ParameterServer<float> ps(w, lin.parameters(), o);
      });
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(message(3, {.num_servers = 3}).find("num_servers = 3 must lie in [1, world size - 1] = [1, 2]") !=
        std::string::npos);
  CHECK(message(3, {.num_servers = 0}).find("num_servers = 0") != std::string::npos);
  CHECK(message(3, {.num_servers = 1, .staleness = 2}).find("mode sync waits for every worker (staleness 0) but staleness = 2") !=
        std::string::npos);
  CHECK(message(2, {.num_servers = 1, .mode = ParameterServerMode::async, .staleness = -1})
            .find("staleness must be >= 0, got -1") != std::string::npos);
  // Options that differ between ranks.
  std::string msg;
  try {
    run_ranks(3, [](Comm& w) {
      nn::Linear<float> lin(2, 2);
      ParameterServer<float> ps(w, lin.parameters(),
                                {.num_servers = 1, .mode = ParameterServerMode::async, .staleness = w.rank() == 2 ? 1 : 2});
    });
  } catch (const Error& e) {
    msg = e.what();
  }
  CHECK(msg.find("rank 2 passes options {num_servers 1, mode async, staleness 1") != std::string::npos);
}

TEST_CASE("ParameterServer: parameter lists that differ between ranks fail on every rank naming both shapes, no hang") {
  std::vector<std::string> errors(3);
  try {
    run_ranks(3, [&](Comm& w) {
      nn::Linear<float> lin(2, w.rank() == 1 ? 3 : 2);
      try {
        ParameterServer<float> ps(w, lin.parameters(), {.num_servers = 1});
      } catch (const Error& e) {
        errors[static_cast<std::size_t>(w.rank())] = e.what();
      }
    });
  } catch (const Error&) {
  }
  for (const std::string& e : errors)
    CHECK(e.find("parameter 0 is \"weight\" of shape (2, 2) on rank 0 but \"weight\" of shape (2, 3) on rank 1") !=
          std::string::npos);
  std::string count_msg;
  try {
    run_ranks(2, [](Comm& w) {
      nn::Linear<float> lin(2, 2, {}, w.rank() == 0);  // rank 1 has no bias
      ParameterServer<float> ps(w, lin.parameters(), {.num_servers = 1});
    });
  } catch (const Error& e) {
    count_msg = e.what();
  }
  CHECK(count_msg.find("rank 1 passes 1 parameters but rank 0 passes 2") != std::string::npos);
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
