// Step time of compressed data parallelism over a bandwidth-limited link: dp 4 thread ranks of
// the main job's GPT (models/gpt.hpp; 6 layers, d_model 192, 6 heads, context 128 by default)
// in DataParallel over a ThrottledComm (comm/throttled_comm.hpp: each transfer takes
// latency x steps + bytes / bandwidth at least, ring volumes), for each dp communication policy
// (the fp32 all-reduce, bf16, PowerSGD rank 4, top-k 1%) and each link (unlimited, 10 Gb/s,
// 1 Gb/s), run side by side in one process, round-robin per round so machine noise hits all.
// Prints per (link, policy) the median step time of rank 0, the bytes rank 0 sent per step and
// the ratio to the uncompressed step on the same link; then, per compressor, the crossover
// bandwidth below which it pays off, from the alpha-beta model with the measured compute and
// compression time (unlimited link) and bytes: B* = 8 (bytes_none - bytes_c) / (t_c - t_none).
// Checks that every replica ends bitwise identical under every policy (exit 2 otherwise).
//
// Run: OPENBLAS_NUM_THREADS=1 build/bench/compress/compress_bench [--rows 2] [--steps 3] [--rounds 1]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/comm/thread/thread_communicator.hpp"
#include "tessera/comm/throttled_comm.hpp"
#include "tessera/data/text_dataset.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/data/compression/make_comm_hook.hpp"
#include "tessera/parallel/data/data_parallel.hpp"

using namespace tessera;

namespace {

struct Link {
  std::string name;
  double gbit_s;  // <= 0: unlimited (no wrapper delay)
};

struct Row {
  double seconds = 0;        // median step time, rank 0
  double bytes = 0;          // bytes rank 0 sent per step
  bool identical = false;    // replicas bitwise equal at the end
};

std::uint64_t hash_params(const ParameterList<float>& params) {
  std::uint64_t h = 1469598103934665603ull;
  for (const Parameter<float>& p : params)
    for (float x : p.value.contiguous().span()) {
      std::uint32_t u;
      std::memcpy(&u, &x, 4);
      h = (h ^ u) * 1099511628211ull;
    }
  return h;
}

Row run_policy(const GPTConfig& cfg, const std::string& policy, const Link& link, double latency, int rows, int steps,
               int warmup) {
  auto results = threads::run(4, [&](Comm& world) {
    auto counters = std::make_shared<LinkCounters>();
    Comm dp = link.gbit_s > 0 ? throttled(world, LinkModel{.bandwidth_gbit_s = link.gbit_s, .latency_s = latency}, counters)
                              : throttled(world, LinkModel{.bandwidth_gbit_s = 1e12, .latency_s = 0}, counters);
    DataParallel model(GPT<float>(cfg, 7), dp);
    if (policy != "none") model.buckets().set_comm_hook(make_comm_hook<float>(policy));
    optim::AdamW<float> opt(model.parameters(), {.lr = 1e-3});
    nn::CrossEntropy<float> ce({.reduction = nn::Reduction::sum});
    std::vector<double> times;
    std::int64_t bytes0 = 0;
    for (int step = 0; step < warmup + steps; ++step) {
      if (step == warmup) bytes0 = counters->bytes_sent;
      Tensor<std::int32_t> x(Shape{rows, cfg.n_positions}), y(Shape{rows, cfg.n_positions});
      for (std::int64_t i = 0; i < x.numel(); ++i) {
        x.data()[i] = static_cast<std::int32_t>((i * 31 + step * 7 + world.rank() * 13) % cfg.vocab_size);
        y.data()[i] = static_cast<std::int32_t>((i * 17 + step * 3 + world.rank() * 5) % cfg.vocab_size);
      }
      world.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      const double scale = model.loss_scale(y.numel());
      auto [logits, ctx] = model.forward(x);
      auto [loss, lctx] = ce.forward(logits, y);
      model.backward(ce.backward(static_cast<float>(scale), lctx), ctx);
      opt.step();
      model.zero_grad();
      world.barrier();
      if (step >= warmup) times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    Row r;
    r.seconds = times[times.size() / 2];
    r.bytes = static_cast<double>(counters->bytes_sent - bytes0) / steps;
    const std::uint64_t h = hash_params(model.parameters());
    std::vector<std::int64_t> all(4);
    const auto mine = static_cast<std::int64_t>(h);
    world.all_gather(std::span<const std::int64_t>(&mine, 1), all);
    r.identical = std::all_of(all.begin(), all.end(), [&](std::int64_t v) { return v == all[0]; });
    return r;
  });
  return results[0];
}

}  // namespace

int main(int argc, char** argv) {
  int rows = 2, steps = 3, warmup = 1, rounds = 1, layers = 6, d_model = 192, heads = 6, context = 128;
  double latency = 20e-6;
  CLI::App app{"dp 4 step time per gradient compressor over a bandwidth-limited link"};
  app.add_option("--rows", rows, "sequences per rank per step")->check(CLI::Range(1, 1 << 20));
  app.add_option("--steps", steps, "timed steps per run")->check(CLI::Range(1, 1 << 20));
  app.add_option("--warmup", warmup, "untimed steps first")->check(CLI::Range(0, 1 << 20));
  app.add_option("--rounds", rounds, "rounds (the median over rounds is printed)")->check(CLI::Range(1, 100));
  app.add_option("--layers", layers)->check(CLI::Range(1, 1 << 10));
  app.add_option("--d-model", d_model)->check(CLI::Range(1, 1 << 16));
  app.add_option("--heads", heads)->check(CLI::Range(1, 1 << 10));
  app.add_option("--context", context)->check(CLI::Range(1, 1 << 16));
  app.add_option("--latency", latency, "link latency per message step, seconds");
  CLI11_PARSE(app, argc, argv);
  const GPTConfig cfg{.vocab_size = data::ByteTokenizer::vocab_size, .n_positions = context, .n_layer = layers,
                      .n_head = heads, .d_model = d_model};
  const std::vector<Link> links = {{"unlimited", 0}, {"10Gb/s", 10}, {"1Gb/s", 1}};
  const std::vector<std::string> policies = {"none", "bf16", "powersgd:4", "topk:0.01"};
  std::map<std::pair<std::string, std::string>, std::vector<Row>> rows_of;
  for (int round = 0; round < rounds; ++round)
    for (const Link& l : links)
      for (const std::string& p : policies) rows_of[{l.name, p}].push_back(run_policy(cfg, p, l, latency, rows, steps, warmup));
  bool ok = true;
  std::map<std::pair<std::string, std::string>, Row> med;
  for (auto& [key, v] : rows_of) {
    std::sort(v.begin(), v.end(), [](const Row& a, const Row& b) { return a.seconds < b.seconds; });
    med[key] = v[v.size() / 2];
    for (const Row& r : v) ok = ok && r.identical;
  }
  std::printf("GPT %d layers d_model %d context %d, dp 4, %d rows per rank, latency %.0f us; median of %d steps x %d rounds\n",
              layers, d_model, context, rows, latency * 1e6, steps, rounds);
  std::printf("%-10s %-11s %10s %12s %9s %10s\n", "link", "policy", "step_ms", "MB_sent/step", "vs_none", "identical");
  for (const Link& l : links)
    for (const std::string& p : policies) {
      const Row& r = med[{l.name, p}];
      std::printf("%-10s %-11s %10.1f %12.4f %9.3f %10s\n", l.name.c_str(), p.c_str(), r.seconds * 1e3, r.bytes / 1e6,
                  r.seconds / med[{l.name, "none"}].seconds, r.identical ? "yes" : "NO");
    }
  const Row& base = med[{"unlimited", "none"}];
  for (const std::string& p : policies) {
    if (p == "none") continue;
    const Row& r = med[{"unlimited", p}];
    const double extra = r.seconds - base.seconds, saved = base.bytes - r.bytes;
    if (extra <= 0)
      std::printf("crossover %-11s pays off at any bandwidth (no measurable overhead: %+.1f ms)\n", p.c_str(), extra * 1e3);
    else
      std::printf("crossover %-11s below %.3g Gb/s (overhead %.1f ms, saves %.3g MB per step)\n", p.c_str(),
                  8 * saved / extra / 1e9, extra * 1e3, saved / 1e6);
  }
  if (!ok) std::printf("check FAILED: replicas differ under some policy\n");
  return ok ? 0 : 2;
}
