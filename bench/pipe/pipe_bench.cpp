// Pipeline benchmark, on the threads backend.
//
// 1. Bubble: synthetic stages whose forward sleeps t and backward 2t (sleeping ranks need no
//    core, so pp = 8 fits on 2 cores). For GPipe, 1F1B and interleaved 1F1B (v = 2, each chunk
//    t / 2 and t), pp in {2, 4, 8} and m in {4, 8, 16}, the measured bubble ratio -- idle time
//    over compute time, summed over ranks, from the recorded timeline (schedule::bubble_stats)
//    -- against the papers' (p - 1) / m and (p - 1) / (v m).
// 2. GPT: a real GPT trained with 1F1B on pp = 2 thread ranks against pp = 1 (one rank, the
//    same micro-batches): step time and speed-up, measured side by side in one run; and ZB-H1
//    against 1F1B at pp 2 and 4 (step times and their ratio, alternating, in one run).
//
// ZB-H1 (Qi et al., ICLR 2024) is in the bubble table with I and W each half the backward
// (t_F = t_I = t_W = t): formula (p-1)/(3m), and its measured ratio must also be below the
// 1F1B ratio measured in the same run. --zb-only runs just those rows and the GPT comparison.
//
// 3. Activation recomputation (none, selective, full): the bytes a 4-block stage of that GPT
//    keeps per micro-batch, measured (glibc's heap counters, one thread) against
//    nn::block_activation_bytes, and the step times of 1F1B and ZB-H1 at pp = 2 with each
//    (--recompute-only runs just this).
//
//   OPENBLAS_NUM_THREADS=1 build/bench/pipe/pipe_bench [--t-ms 20] [--steps 5] [--svg-dir docs/img]
//
// Scheduling delays of the machine (other processes waking late) add idle time that the
// formulas do not have; a larger t makes them matter less.
//
// With --svg-dir it writes the recorded timelines of 1F1B and interleaved 1F1B at pp = 4,
// m = 8 and of the GPT at pp = 2 as SVG pictures (and Chrome trace JSON next to them with
// --trace-dir).
//
// Checks: the bubble table's target is each measured ratio within 2 points of the formula; the
// GPT runs (same model, same data, same optimizer) must end with the same loss at pp = 1 and
// pp = 2, any m, within fp32 round-off (a pipeline that dropped a micro-batch or a gradient
// would run faster and train something else).
// Exit status: 0 when every check passes and every target is met, 1 when a bubble ratio missed
// its target, 2 when the GPT losses disagree (or are not finite).
#include <CLI/CLI.hpp>
#include <malloc.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <utility>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "tessera/models/gpt.hpp"
#include "tessera/parallel/pipeline/pipeline_parallel.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/tessera.hpp"
#include "tessera/testing/compare.hpp"

namespace {

using namespace tessera;
using Clock = std::chrono::steady_clock;

// A stage that sleeps: forward t_f, backward t_b; the activation passes through unchanged.
class SleepStage final : public PipelineStage<float, Tensor<float>> {
 public:
  SleepStage(std::chrono::microseconds t_f, std::chrono::microseconds t_b, bool first) : t_f_(t_f), t_b_(t_b), first_(first) {}
  StageOutput<float> forward_first(const Tensor<float>& x) override { return run(x); }
  StageOutput<float> forward(const Tensor<float>& x) override { return run(x); }
  Tensor<float> backward(const Tensor<float>& dy, StageContext&) override {
    std::this_thread::sleep_until(Clock::now() + t_b_);
    return first_ ? Tensor<float>() : dy;
  }
  // ZB-H1's split: the input gradient (I) and the weight gradient (W) take half the backward each.
  Tensor<float> backward_input(const Tensor<float>& dy, StageContext&, nn::WeightGradQueue&) override {
    std::this_thread::sleep_until(Clock::now() + t_b_ / 2);
    return first_ ? Tensor<float>() : dy;
  }
  void backward_weight(nn::WeightGradQueue&) override { std::this_thread::sleep_until(Clock::now() + t_b_ / 2); }
  Shape output_shape(const Shape& input) override { return input; }
  ParameterList<float> parameters() override { return {}; }
  std::string name() const override { return "sleep"; }

 private:
  StageOutput<float> run(const Tensor<float>& x) {
    std::this_thread::sleep_until(Clock::now() + t_f_);
    return {x.clone(), StageContext::hold(0)};
  }
  std::chrono::microseconds t_f_, t_b_;
  bool first_;
};

// loss = sum of the outputs.
struct SumLoss {
  struct Context {
    Shape shape;
  };
  ForwardResult<float, Context> forward(const Tensor<float>& y, const Tensor<float>&) const {
    double s = 0;
    for (std::int64_t i = 0; i < y.numel(); ++i) s += y.data()[i];
    return {static_cast<float>(s), Context{y.shape()}};
  }
  Tensor<float> backward(float dloss, const Context& c) const { return Tensor<float>::full(c.shape, dloss); }
  std::int64_t count_valid(const Tensor<float>& t) const { return t.numel(); }
};

const char* kind_name(PipelineScheduleKind k) {
  switch (k) {
    case PipelineScheduleKind::gpipe: return "GPipe";
    case PipelineScheduleKind::one_f_one_b: return "1F1B";
    case PipelineScheduleKind::interleaved_one_f_one_b: return "interleaved 1F1B (v=2)";
    case PipelineScheduleKind::zero_bubble_h1: return "ZB-H1";
  }
  return "?";
}

struct Options {
  double t_ms = 20.0;
  int steps = 5;
  std::string svg_dir, trace_dir;
  bool zb_only = false;  // only ZB-H1 and 1F1B in the bubble table, only the ZB-H1 vs 1F1B GPT rows
};

void save(const schedule::Timeline& t, const Options& o, const std::string& stem, const std::string& unit) {
  if (!o.svg_dir.empty())
    schedule::write_svg(t, o.svg_dir + "/" + stem + ".svg",
                        {.width = 960, .row_height = 28, .title = t.title + " -- measured", .time_unit = unit,
                         .time_scale = unit == "ms" ? 1e3 : 1.0, .show_bubble = true});
  if (!o.trace_dir.empty()) schedule::write_chrome_trace(t, o.trace_dir + "/" + stem + ".json");
}

// The median over `steps` measured steps (after one warm-up step) of the bubble ratio.
double measure_bubble(int pp, PipelineScheduleKind kind, int m, const Options& o, bool picture) {
  const int v = kind == PipelineScheduleKind::interleaved_one_f_one_b ? 2 : 1;
  const auto t_f = std::chrono::microseconds(static_cast<long>(o.t_ms * 1000 / v));
  const auto results = threads::run(pp, [&](Comm& comm) {
    PipelineParallel<float, Tensor<float>, Tensor<float>> pipe(
        comm, [&](int s) { return std::make_unique<SleepStage>(t_f, 2 * t_f, s == 0); }, SumLoss{},
        {.schedule = kind, .virtual_stages = v});
    const Tensor<float> x = Tensor<float>::full(Shape{m, 4}, 1.0f);
    std::vector<double> ratios;
    for (int step = 0; step <= o.steps; ++step) {
      pipe.zero_grad();
      pipe.step(x, x, m);
      const schedule::Timeline t = pipe.timeline();
      if (step == 0) continue;
      ratios.push_back(schedule::bubble_stats(t).bubble_ratio);
      if (picture && step == o.steps && comm.rank() == 0)
        save(t, o,
             kind == PipelineScheduleKind::one_f_one_b      ? "pipeline_1f1b_p4_m8_measured"
             : kind == PipelineScheduleKind::zero_bubble_h1 ? "pipeline_zb_h1_p4_m8_measured"
                                                            : "pipeline_interleaved_p4_v2_m8_measured",
             "ms");
    }
    std::sort(ratios.begin(), ratios.end());
    return ratios[ratios.size() / 2];
  });
  return results[0];
}

// Prints the table; returns how many measured ratios are more than 2 points off the formula.
int bubble_table(const Options& o) {
  std::printf("## Bubble: measured vs (p-1)/m, (p-1)/(v m) and ZB-H1's (p-1)(t_F+t_B-t_W)/(m (t_F+t_B+t_W)); forward %.1f ms, "
              "backward %.1f ms per stage (ZB-H1: I %.1f ms + W %.1f ms)\n\n",
              o.t_ms, 2 * o.t_ms, o.t_ms, o.t_ms);
  std::printf("| schedule | pp | m | measured bubble ratio | formula | difference (points) | within 2 points |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  int failures = 0;
  std::map<std::pair<int, int>, double> one_f_one_b;  // (pp, m) -> measured, for ZB-H1's comparison
  std::vector<std::string> zb_vs;
  const std::vector<PipelineScheduleKind> kinds =
      o.zb_only ? std::vector<PipelineScheduleKind>{PipelineScheduleKind::one_f_one_b, PipelineScheduleKind::zero_bubble_h1}
                : std::vector<PipelineScheduleKind>{PipelineScheduleKind::gpipe, PipelineScheduleKind::one_f_one_b,
                                                    PipelineScheduleKind::interleaved_one_f_one_b,
                                                    PipelineScheduleKind::zero_bubble_h1};
  for (auto kind : kinds)
    for (int pp : {2, 4, 8})
      for (int m : {4, 8, 16}) {
        const bool zb = kind == PipelineScheduleKind::zero_bubble_h1;
        if (zb && m < pp) {
          std::printf("| %s | %d | %d | -- | -- | -- | (m < pp: the formula needs m >= pp) |\n", kind_name(kind), pp, m);
          continue;
        }
        const bool il = kind == PipelineScheduleKind::interleaved_one_f_one_b;
        if (il && !(m >= pp && (m % pp == 0 || m % pp >= pp))) {
          std::printf("| %s | %d | %d | -- | -- | -- | (m < pp: not a valid interleaved schedule) |\n", kind_name(kind), pp, m);
          continue;
        }
        const double formula = zb ? schedule::zero_bubble_h1_bubble_ratio(pp, m, 1.0, 1.0, 1.0)
                                  : (pp - 1.0) / ((il ? 2.0 : 1.0) * m);
        const bool picture = pp == 4 && m == 8 && kind != PipelineScheduleKind::gpipe;
        const double got = measure_bubble(pp, kind, m, o, picture);
        const double diff = 100.0 * (got - formula);
        bool ok = std::abs(diff) <= 2.0;
        if (kind == PipelineScheduleKind::one_f_one_b) one_f_one_b[{pp, m}] = got;
        if (zb) {
          const double ref = one_f_one_b.at({pp, m});
          const bool below = got < ref;
          ok = ok && below;
          char line[200];
          std::snprintf(line, sizeof line, "| %d | %d | %.4f | %.4f | %.2f | %s |", pp, m, got, ref, got > 0 ? ref / got : 0.0,
                        below ? "yes" : "NO");
          zb_vs.push_back(line);
        }
        failures += !ok;
        std::printf("| %s | %d | %d | %.4f | %.4f | %+.2f | %s |\n", kind_name(kind), pp, m, got, formula, diff,
                    ok ? "yes" : "NO");
        std::fflush(stdout);
      }
  std::printf("\n%d of the measured ratios are more than 2 points off the formula, or (ZB-H1) not below 1F1B's "
              "(target: 0).\n\n", failures);
  if (!zb_vs.empty()) {
    std::printf("ZB-H1 against 1F1B, measured in this run:\n\n| pp | m | ZB-H1 bubble | 1F1B bubble | 1F1B / ZB-H1 | ZB-H1 below |\n"
                "|---|---|---|---|---|---|\n");
    for (const std::string& l : zb_vs) std::printf("%s\n", l.c_str());
    std::printf("\n");
  }
  return failures;
}

// ---- GPT: pp = 2 against pp = 1 ------------------------------------------------------------------
struct GPTResult {
  double step_ms = 0, bubble = 0;
  double loss = 0;
  std::string report;  // schedule::to_string of the last step's bubble
};

const GPTConfig bench_gpt{.vocab_size = 1024, .n_positions = 64, .n_layer = 8, .n_head = 4, .d_model = 128};
constexpr int bench_batch = 16, bench_seq = 64;

Tensor<std::int32_t> bench_ids(int salt) {
  Tensor<std::int32_t> t(Shape{bench_batch, bench_seq});
  for (std::int64_t i = 0; i < t.numel(); ++i)
    t.data()[i] = static_cast<std::int32_t>((i * (salt == 0 ? 7 : 11) + 3 + 2 * salt) % bench_gpt.vocab_size);
  return t;
}

// The same training step without the pipeline: GPT, mean cross-entropy, AdamW.
double serial_gpt_ms(const Options& o) {
  GPT<float> gpt(bench_gpt, 1);
  nn::CrossEntropy<float> ce;
  optim::AdamW<float> opt(gpt.parameters(), {.lr = 1e-3});
  const Tensor<std::int32_t> tokens = bench_ids(0), targets = bench_ids(1);
  std::vector<double> times;
  for (int step = 0; step <= o.steps; ++step) {
    const auto t0 = Clock::now();
    opt.zero_grad();
    auto [logits, ctx] = gpt.forward(tokens);
    auto [loss, lctx] = ce.forward(logits, targets);
    gpt.backward(ce.backward(1.0f, lctx), ctx);
    opt.step();
    if (step > 0) times.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

GPTResult run_gpt(int pp, int m, PipelineScheduleKind kind, const Options& o, bool picture) {
  const GPTConfig cfg = bench_gpt;
  const int seq = bench_seq;
  // FLOP-like cost per layer and token: the embedding is a lookup, a block 12 d^2 + 2 T d
  // multiply-adds (GEMMs and attention), the head V d.
  const double d = static_cast<double>(cfg.d_model);
  std::vector<double> costs{d};
  for (int i = 0; i < cfg.n_layer; ++i) costs.push_back(12 * d * d + 2.0 * seq * d);
  costs.push_back(static_cast<double>(cfg.vocab_size) * d);
  const StagePartition cut = StagePartition::balanced(costs, pp, gpt_pipeline_layer_names(cfg));
  const Tensor<std::int32_t> tokens = bench_ids(0), targets = bench_ids(1);
  const auto results = threads::run(pp, [&](Comm& comm) {
    PipelineParallel<float, Tensor<std::int32_t>> pipe(
        comm, [&](int s) { return make_gpt_pipeline_stage<float>(cfg, 1, cut, s); },
        nn::CrossEntropy<float>({.reduction = nn::Reduction::sum}), {.schedule = kind});
    optim::AdamW<float> opt(pipe.parameters(), {.lr = 1e-3});
    std::vector<double> times, bubbles;
    double loss = 0;
    std::string report;
    for (int step = 0; step <= o.steps; ++step) {
      comm.barrier();
      const auto t0 = Clock::now();
      pipe.zero_grad();
      loss = pipe.step(tokens, targets, m);
      opt.step();
      comm.barrier();
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      const schedule::Timeline t = pipe.timeline();
      if (step == 0) continue;
      times.push_back(ms);
      bubbles.push_back(schedule::bubble_stats(t).bubble_ratio);
      report = schedule::to_string(schedule::bubble_stats(t));
      if (picture && step == o.steps && comm.rank() == 0) save(t, o, "pipeline_gpt_1f1b_p2_m8_measured", "ms");
    }
    std::sort(times.begin(), times.end());
    std::sort(bubbles.begin(), bubbles.end());
    return GPTResult{times[times.size() / 2], bubbles[bubbles.size() / 2], loss, report};
  });
  if (pp > 1 && picture)
    std::printf("pp = %d, m = %d, cut by cost:\n%s\nbubble of the last step:\n%s\n", pp, m, cut.to_string().c_str(),
                results[0].report.c_str());
  return results[0];
}

// Prints the table; returns whether every pipelined run ended with pp = 1, m = 1's loss.
// ZB-H1 against 1F1B on the pipelined GPT: step times side by side, alternating the two
// schedules `rounds` times (the machine's load drifts), and their ratio.
void gpt_zb_table(const Options& o) {
  std::printf("## GPT (d_model 128, 8 blocks, 4 heads, vocab 1024, seq 64, batch 16): ZB-H1 against 1F1B, AdamW step included\n\n");
  std::printf("| pp | m | 1F1B step (ms) | ZB-H1 step (ms) | 1F1B / ZB-H1 | 1F1B bubble | ZB-H1 bubble | losses equal |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (int pp : {2, 4})
    for (int m : {8, 16}) {
      std::vector<double> a, b, ba, bb;
      double la = 0, lb = 0;
      for (int round = 0; round < 3; ++round) {
        const GPTResult x = run_gpt(pp, m, PipelineScheduleKind::one_f_one_b, o, false);
        const GPTResult y = run_gpt(pp, m, PipelineScheduleKind::zero_bubble_h1, o, false);
        a.push_back(x.step_ms);
        b.push_back(y.step_ms);
        ba.push_back(x.bubble);
        bb.push_back(y.bubble);
        la = x.loss;
        lb = y.loss;
      }
      auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
      };
      std::printf("| %d | %d | %.1f | %.1f | %.3f | %.4f | %.4f | %s |\n", pp, m, median(a), median(b), median(a) / median(b),
                  median(ba), median(bb), la == lb ? "bitwise" : "NO");
      std::fflush(stdout);
    }
  std::printf("\n");
}

// Bytes the heap holds for this thread now (glibc: small blocks and mmapped ones), after
// emptying this thread's cache of freed tensor storage.
std::int64_t heap_in_use() {
  detail::StorageCache::release();
  const struct mallinfo2 mi = mallinfo2();
  return static_cast<std::int64_t>(mi.uordblks + mi.hblkhd);
}

// Activation recomputation on the bench GPT: the bytes one micro-batch keeps in a stage of 4
// blocks (measured on one thread, against nn::block_activation_bytes), and the step time of
// 1F1B and ZB-H1 at pp = 2, m = 8 with none / selective / full (the extra compute).
void recompute_table(const Options& o) {
  const GPTConfig cfg = bench_gpt;
  const std::int64_t b = bench_batch / 8, s = bench_seq, h = cfg.d_model, a = cfg.n_head;
  const StagePartition cut = StagePartition::from_cuts(gpt_pipeline_num_layers(cfg), {1, 5});
  auto stage = make_gpt_pipeline_stage<float>(cfg, 1, cut, 1);  // h.0 - h.3
  Tensor<float> x0 = Tensor<float>::empty(Shape{b, s, h});
  fill_normal(x0, 3, "x", 1.0);
  std::printf("## Activation recomputation: GPT above, micro-batch of %lld sequences (m = 8), a stage of 4 blocks\n\n",
              static_cast<long long>(b));
  std::printf("| recompute | kept per micro-batch, measured (bytes) | Korthikanti et al. for our fp32 layers (bytes) | "
              "difference |\n|---|---|---|---|\n");
  for (nn::Recompute rc : {nn::Recompute::none, nn::Recompute::selective, nn::Recompute::full}) {
    stage->forward(x0.clone());
    const std::int64_t before = heap_in_use();
    StageContext ctx;
    {
      Tensor<float> x = x0.clone();
      const nn::SelectiveRecompute selective(rc == nn::Recompute::selective);
      StageOutput<float> out = stage->forward(x);
      ctx = rc == nn::Recompute::full ? StageContext::hold(x) : std::move(out.ctx);
    }
    const std::int64_t got = heap_in_use() - before;
    const std::int64_t formula =
        rc == nn::Recompute::full ? b * s * h * 4 : 4 * nn::block_activation_bytes(b, s, h, a, rc);
    std::printf("| %s | %lld | %lld | %+.2f%% |\n", nn::to_string(rc), static_cast<long long>(got),
                static_cast<long long>(formula), 100.0 * (double(got) - double(formula)) / double(formula));
  }
  std::printf("\n| schedule | recompute | step (ms) | vs none | rerun forwards per rank | their ms (rank 0) | losses equal none |\n"
              "|---|---|---|---|---|---|---|\n");
  const Tensor<std::int32_t> tokens = bench_ids(0), targets = bench_ids(1);
  const StagePartition two = gpt_balanced_partition(cfg, 2);
  for (auto kind : {PipelineScheduleKind::one_f_one_b, PipelineScheduleKind::zero_bubble_h1}) {
    double base_ms = 0, base_loss = 0;
    for (nn::Recompute rc : {nn::Recompute::none, nn::Recompute::selective, nn::Recompute::full}) {
      const auto results = threads::run(2, [&](Comm& comm) {
        PipelineParallel<float, Tensor<std::int32_t>> pipe(
            comm, [&](int st) { return make_gpt_pipeline_stage<float>(cfg, 1, two, st); },
            nn::CrossEntropy<float>({.reduction = nn::Reduction::sum}), {.schedule = kind, .recompute = rc});
        std::vector<double> times;
        double loss = 0;
        for (int step = 0; step <= o.steps; ++step) {
          comm.barrier();
          const auto t0 = Clock::now();
          pipe.zero_grad();
          loss = pipe.step(tokens, targets, 8);
          comm.barrier();
          if (step > 0) times.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        }
        std::sort(times.begin(), times.end());
        return std::tuple{times[times.size() / 2], loss, pipe.last_step().recomputed_forwards,
                          1e3 * pipe.last_step().recompute_seconds};
      });
      const auto& [ms, loss, reruns, rerun_ms] = results[0];
      if (rc == nn::Recompute::none) {
        base_ms = ms;
        base_loss = loss;
      }
      std::printf("| %s | %s | %.1f | %.2f | %d | %.1f | %s |\n", kind_name(kind), nn::to_string(rc), ms, ms / base_ms,
                  reruns, rerun_ms, loss == base_loss ? "bitwise" : "NO");
      std::fflush(stdout);
    }
  }
  std::printf("\n");
}

bool gpt_table(const Options& o) {
  std::printf("## GPT (d_model 128, 8 blocks, 4 heads, vocab 1024, seq 64, batch 16), 1F1B, AdamW step included\n\n");
  const double serial = serial_gpt_ms(o);
  const GPTResult one_1 = run_gpt(1, 1, PipelineScheduleKind::one_f_one_b, o, false);
  const GPTResult one_8 = run_gpt(1, 8, PipelineScheduleKind::one_f_one_b, o, false);
  const GPTResult two_8 = run_gpt(2, 8, PipelineScheduleKind::one_f_one_b, o, true);
  const GPTResult two_16 = run_gpt(2, 16, PipelineScheduleKind::one_f_one_b, o, false);
  std::printf("| run | ranks | m | step time (ms) | speed-up vs pp = 1, same m | measured bubble ratio | loss |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  std::printf("| GPT, no pipeline | 1 | 1 | %.1f | -- | -- | -- |\n", serial);
  std::printf("| pp = 1 | 1 | 1 | %.1f | -- | -- | %.5f |\n", one_1.step_ms, one_1.loss);
  std::printf("| pp = 1 | 1 | 8 | %.1f | 1.00 | -- | %.5f |\n", one_8.step_ms, one_8.loss);
  std::printf("| pp = 2 | 2 | 8 | %.1f | %.2f | %.4f | %.5f |\n", two_8.step_ms, one_8.step_ms / two_8.step_ms, two_8.bubble,
              two_8.loss);
  std::printf("| pp = 2 | 2 | 16 | %.1f | %.2f (vs pp = 1, m = 8) | %.4f | %.5f |\n", two_16.step_ms,
              one_8.step_ms / two_16.step_ms, two_16.bubble, two_16.loss);
  // The check: the last step's loss of every run against pp = 1, m = 1's.
  constexpr double tolerance = 1e-4;  // fp32 round-off of other micro-batch sums, after the steps
  testing::WorstError worst;
  for (const GPTResult* r : {&one_8, &two_8, &two_16}) worst.add(testing::rel_error(r->loss, one_1.loss));
  const bool ok = worst.value() <= tolerance;
  std::printf("\ncheck: the last loss of every run against pp = 1, m = 1's: worst relative difference %.2e "
              "(tolerance %.0e): %s\n",
              worst.value(), tolerance, ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool skip_bubble = false, skip_gpt = false, recompute_only = false;
  CLI::App app{"Pipeline bubble and GPT step time on the threads backend"};
  app.add_option("--t-ms", o.t_ms, "forward time of a synthetic stage in ms (backward: twice)");
  app.add_option("--steps", o.steps, "measured steps per configuration (after one warm-up step)");
  app.add_option("--svg-dir", o.svg_dir, "write the pictures of recorded timelines into this folder");
  app.add_option("--trace-dir", o.trace_dir, "write Chrome trace JSON of the same timelines into this folder");
  app.add_flag("--skip-bubble", skip_bubble, "skip the synthetic bubble table");
  app.add_flag("--skip-gpt", skip_gpt, "skip the GPT step times");
  app.add_flag("--recompute-only", recompute_only, "only the activation recomputation tables (bytes kept, step times)");
  app.add_flag("--zb-only", o.zb_only, "only 1F1B and ZB-H1: their bubble rows and the GPT's ZB-H1 vs 1F1B step times");
  CLI11_PARSE(app, argc, argv);
  if (o.steps < 1) o.steps = 1;
  const char* blas = std::getenv("OPENBLAS_NUM_THREADS");
  if (!blas || std::string(blas) != "1")
    std::printf("note: OPENBLAS_NUM_THREADS is not 1; ranks will compete for the cores in the GPT runs\n\n");
  if (recompute_only) {
    recompute_table(o);
    return 0;
  }
  const int bubble_misses = skip_bubble ? 0 : bubble_table(o);
  if (!skip_gpt) gpt_zb_table(o);
  if (!skip_gpt) recompute_table(o);
  const bool gpt_ok = skip_gpt || o.zb_only ? true : gpt_table(o);
  if (!gpt_ok) return 2;
  return bubble_misses > 0 ? 1 : 0;
}
