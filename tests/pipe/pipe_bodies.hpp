// Test bodies of the pipeline executor, written against tessera::Comm so that the same bodies run
// on thread ranks (test_pipe.cpp, assertions on the main thread after the join) and under
// mpirun (pipe_mpi_test.cpp, assertions in every process). A body returns what it measured on
// its rank; check_*() turns a report into doctest assertions.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/pipeline/pipeline_parallel.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/schedule/all.hpp"
#include "tessera/testing/compare.hpp"

namespace pipe_bodies {

using tessera::Comm;
using tessera::Parameter;
using tessera::Shape;
using tessera::Tensor;
using tessera::testing::WorstError;
using Tokens = Tensor<std::int32_t>;
using GPTPipe = tessera::PipelineParallel<float, Tokens, Tokens>;

// A tiny GPT: 6 blocks, so that pp = 4 with v = 2 (8 stages) has a layer per stage.
inline tessera::GPTConfig tiny_config() {
  return {.vocab_size = 40, .n_positions = 8, .n_layer = 6, .n_head = 2, .d_model = 16};
}
constexpr std::uint64_t seed = 7;
constexpr int seq_len = 8;
constexpr int steps = 5;
constexpr double lr = 0.1, momentum = 0.9;

// Batch `b` of `n` sequences: token and target ids from a fixed formula; every 5th target is
// ignored (-100), so the token count differs from micro-batch to micro-batch.
inline Tokens tokens(int n, int b = 0) {
  Tokens t(Shape{n, seq_len});
  for (int i = 0; i < n * seq_len; ++i) t.data()[i] = (i * 7 + b * 13 + 3) % 40;
  return t;
}
inline Tokens targets(int n, int b = 0) {
  Tokens t(Shape{n, seq_len});
  for (int i = 0; i < n * seq_len; ++i) t.data()[i] = (i + b) % 5 == 4 ? -100 : (i * 11 + b * 3 + 5) % 40;
  return t;
}

// Serial reference: GPT, cross-entropy mean over the whole batch, SGD with momentum;
// losses of every step and the parameters after `steps` steps, by name.
struct SerialRun {
  std::vector<double> losses;
  std::map<std::string, std::vector<float>> params;
  std::map<std::string, std::vector<float>> first_grads;  // after the first backward
};
inline SerialRun serial_run(int batch) {
  tessera::GPT<float> gpt(tiny_config(), seed);
  tessera::nn::CrossEntropy<float> ce;
  tessera::optim::SGD<float> opt(gpt.parameters(), {.lr = lr, .momentum = momentum});
  SerialRun out;
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    auto [logits, ctx] = gpt.forward(tokens(batch));
    auto [loss, lctx] = ce.forward(logits, targets(batch));
    gpt.backward(ce.backward(1.0f, lctx), ctx);
    if (s == 0)
      for (Parameter<float>& p : gpt.parameters())
        out.first_grads[p.name] = std::vector<float>(p.grad.data(), p.grad.data() + p.grad.numel());
    opt.step();
    out.losses.push_back(loss);
  }
  for (Parameter<float>& p : gpt.parameters())
    out.params[p.name] = std::vector<float>(p.value.data(), p.value.data() + p.value.numel());
  return out;
}
// The serial run of the usual batch of 8, computed once per process.
inline const SerialRun& serial_reference() {
  static const SerialRun run = serial_run(8);
  return run;
}

// The elements of a parameter's value or gradient, read-only.
inline std::span<const float> values_of(const Tensor<float>& t) { return std::span<const float>(t.span()); }

// max |a - b| / max |b| over a tensor of b.size() elements (fp32 round-off: about 1e-6 after 5
// steps); +infinity when either side holds a NaN or an infinity (tessera::testing::max_rel_error).
// An all-zero reference divides by 1e-30, so that any difference from it fails.
inline double rel_err(const float* a, const std::vector<float>& b) {
  const double e = tessera::testing::max_rel_error(std::span<const float>(a, b.size()), std::span<const float>(b));
  return std::ranges::any_of(b, [](float x) { return x != 0; }) ? e : e / 1e-30;
}

inline GPTPipe make_gpt_pipe(Comm& comm, tessera::PipelineOptions opts) {
  const auto cfg = tiny_config();
  const int stages = comm.size() * opts.virtual_stages;
  const tessera::StagePartition cut =
      tessera::StagePartition::even(tessera::gpt_pipeline_num_layers(cfg), stages, tessera::gpt_pipeline_layer_names(cfg));
  return GPTPipe(
      comm, [cfg, cut](int s) { return tessera::make_gpt_pipeline_stage<float>(cfg, seed, cut, s); },
      tessera::nn::CrossEntropy<float>({.ignore_index = -100, .reduction = tessera::nn::Reduction::sum}), opts);
}

// Exchanges the tied weight (values and gradients) between the first and the last stage's
// ranks and compares them bitwise. Collective over comm.
inline bool tied_copies_bitwise_equal(Comm& comm, GPTPipe& pipe) {
  const int first = pipe.rank_of(0), last = pipe.rank_of(pipe.num_stages() - 1);
  if (first == last) return true;
  std::vector<float> mine, theirs;
  if (comm.rank() == first || comm.rank() == last) {
    Parameter<float>& w = pipe.stage(comm.rank() == first ? 0 : pipe.num_stages() - 1).tied_parameters()[0];
    mine.assign(w.value.data(), w.value.data() + w.value.numel());
    mine.insert(mine.end(), w.grad.data(), w.grad.data() + w.grad.numel());
    theirs.resize(mine.size());
    const int peer = comm.rank() == first ? last : first;
    const tessera::P2POp ops[] = {tessera::P2POp::send(std::span<const float>(mine), peer, 7),
                                  tessera::P2POp::recv(std::span<float>(theirs), peer, 7)};
    comm.batch_send_recv(ops);
  }
  // Bitwise, and finite: two copies that are both NaN are not "equal".
  const int equal = tessera::testing::bitwise_equal_finite(std::span<const float>(mine), std::span<const float>(theirs)) ? 1 : 0;
  return comm.all_reduce_value(equal, tessera::ReduceOp::min) == 1;
}

// ---- equivalence with serial ----------------------------------------------------------------------
struct EquivReport {
  int rank = 0, pp = 0, m = 0;
  tessera::PipelineScheduleKind kind{};
  double max_param_err = 1, max_loss_err = 1, max_first_grad_err = 1;
  int params_checked = 0;  // on all ranks together, tied copies once
  int serial_params = 0;
  int peak = -1, expected_peak = -2;
  bool tied_bitwise = false;
  std::vector<std::int64_t> microbatch_sizes;
};

// 5 steps of the tiny GPT on the batch of 8, pipelined over comm (pp = comm.size()) with m
// micro-batches, against the serial run: parameters, losses, first gradients.
inline EquivReport gpt_equivalence_body(Comm& comm, tessera::PipelineScheduleKind kind, int m, int v = 1) {
  const SerialRun& ref = serial_reference();
  GPTPipe pipe = make_gpt_pipe(comm, {.schedule = kind, .virtual_stages = v});
  tessera::optim::SGD<float> opt(pipe.parameters(), {.lr = lr, .momentum = momentum});
  EquivReport r;
  r.rank = comm.rank();
  r.pp = comm.size();
  r.m = m;
  r.kind = kind;
  WorstError param_err, loss_err, first_grad_err;  // a NaN is +inf, not dropped
  const bool feeds = pipe.holds_stage(0), ends = pipe.holds_stage(pipe.num_stages() - 1);
  for (int s = 0; s < steps; ++s) {
    pipe.zero_grad();
    // Only the first stage's rank reads the tokens and only the last stage's the targets.
    const double loss = pipe.step(feeds ? tokens(8) : Tokens(), ends ? targets(8) : Tokens(), m);
    loss_err.add(loss - ref.losses[static_cast<std::size_t>(s)]);
    if (s == 0)
      for (Parameter<float>& p : pipe.parameters()) first_grad_err.add(rel_err(p.grad.data(), ref.first_grads.at(p.name)));
    opt.step();
  }
  int checked = 0;
  for (Parameter<float>& p : pipe.parameters()) {
    param_err.add(rel_err(p.value.data(), ref.params.at(p.name)));
    ++checked;
  }
  r.max_param_err = param_err.value();
  r.max_loss_err = loss_err.value();
  r.max_first_grad_err = first_grad_err.value();
  // The last stage's copy of wte is checked but counted once.
  if (ends && pipe.num_stages() > 1) checked -= static_cast<int>(pipe.stage(pipe.num_stages() - 1).tied_parameters().size());
  r.params_checked = comm.all_reduce_value(checked, tessera::ReduceOp::sum);
  r.serial_params = static_cast<int>(ref.params.size());
  r.peak = pipe.last_step().peak_in_flight;
  r.expected_peak = pipe.last_step().expected_peak_in_flight;
  r.microbatch_sizes = pipe.last_step().microbatch_sizes;
  r.tied_bitwise = tied_copies_bitwise_equal(comm, pipe);
  return r;
}

// The peak number of micro-batches in flight that the papers give for rank r.
inline int paper_peak(tessera::PipelineScheduleKind kind, int p, int m, int r, int v) {
  switch (kind) {
    case tessera::PipelineScheduleKind::gpipe: return m;
    case tessera::PipelineScheduleKind::one_f_one_b: return std::min(p - r, m);
    // ZB-H1: F to W in flight; every rank holds 1F1B's rank-0 peak, min(p, m) (Qi et al. 2024).
    case tessera::PipelineScheduleKind::zero_bubble_h1: return std::min(p, m);
    case tessera::PipelineScheduleKind::interleaved_one_f_one_b: break;
  }
  const tessera::schedule::InterleavedOneFOneB opts{.num_microbatches = m, .virtual_stages = v};
  return std::min(opts.num_warmup_microbatches(p, r) + 1, m * v);
}

inline void check_equivalence(const EquivReport& r, int v = 1) {
  CAPTURE(r.rank);
  CAPTURE(r.pp);
  CAPTURE(r.m);
  CAPTURE(static_cast<int>(r.kind));
  CHECK(r.max_param_err < 1e-5);
  CHECK(r.max_first_grad_err < 1e-5);
  CHECK(r.max_loss_err < 1e-5);
  CHECK(r.params_checked == r.serial_params);
  CHECK(r.peak == r.expected_peak);
  CHECK(r.peak == paper_peak(r.kind, r.pp, r.m, r.rank, v));
  CHECK(r.tied_bitwise);
  // torch.tensor_split sizes: 8 samples over m micro-batches.
  REQUIRE(r.microbatch_sizes.size() == static_cast<std::size_t>(r.m));
  for (int i = 0; i < r.m; ++i) CHECK(r.microbatch_sizes[static_cast<std::size_t>(i)] == 8 / r.m + (i < 8 % r.m ? 1 : 0));
}

// ---- ZB-H1 against 1F1B ----------------------------------------------------------------------------
struct ZbReport {
  bool losses_bitwise = false;  // every step's loss
  bool params_bitwise = false;  // every parameter after the steps, on every rank
  int i_events = 0, w_events = 0, b_events = 0;  // of the ZB-H1 run's last timeline, all ranks
};

// 5 steps of the tiny GPT with 1F1B and with ZB-H1 over the same ranks, from the same initial
// values and data: the split backward does each parameter's arithmetic in the same order, so
// losses and parameters are expected bitwise equal.
inline ZbReport zb_vs_1f1b_body(Comm& comm, int m) {
  GPTPipe a = make_gpt_pipe(comm, {.schedule = tessera::PipelineScheduleKind::one_f_one_b});
  GPTPipe b = make_gpt_pipe(comm, {.schedule = tessera::PipelineScheduleKind::zero_bubble_h1});
  tessera::optim::SGD<float> oa(a.parameters(), {.lr = lr, .momentum = momentum});
  tessera::optim::SGD<float> ob(b.parameters(), {.lr = lr, .momentum = momentum});
  const bool feeds = a.holds_stage(0), ends = a.holds_stage(a.num_stages() - 1);
  ZbReport r;
  int same_loss = 1;
  for (int s = 0; s < steps; ++s) {
    a.zero_grad();
    b.zero_grad();
    const float la = a.step(feeds ? tokens(8, s) : Tokens(), ends ? targets(8, s) : Tokens(), m);
    const float lb = b.step(feeds ? tokens(8, s) : Tokens(), ends ? targets(8, s) : Tokens(), m);
    same_loss &= tessera::testing::bitwise_equal_finite(std::span<const float>(&la, 1), std::span<const float>(&lb, 1));
    oa.step();
    ob.step();
  }
  int same = 1;
  for (std::size_t i = 0; i < a.parameters().size(); ++i)
    same &= tessera::testing::bitwise_equal_finite(values_of(a.parameters()[i].value), values_of(b.parameters()[i].value));
  r.losses_bitwise = comm.all_reduce_value(same_loss, tessera::ReduceOp::min) == 1;
  r.params_bitwise = comm.all_reduce_value(same, tessera::ReduceOp::min) == 1;
  const tessera::schedule::Timeline t = b.timeline();
  for (const auto& e : t.events) {
    r.i_events += e.action.kind == tessera::schedule::ActionKind::backward_input;
    r.w_events += e.action.kind == tessera::schedule::ActionKind::backward_weight;
    r.b_events += e.action.kind == tessera::schedule::ActionKind::backward;
  }
  return r;
}

// ---- activation recomputation ----------------------------------------------------------------------
struct RecomputeReport {
  bool losses_bitwise = false, params_bitwise = false;
  int recomputed = -1, expected_recomputed = -2;  // last step, this rank
  double recompute_seconds = -1;
};

// 3 steps of the tiny GPT (embedding dropout 0.1, so the rerun forward must draw the same
// masks) with `schedule` and no recomputation against the same with `rc`: losses and
// parameters bitwise.
inline RecomputeReport recompute_body(Comm& comm, tessera::PipelineScheduleKind kind, int m, int v,
                                      tessera::nn::Recompute rc) {
  auto cfg = tiny_config();
  cfg.embd_pdrop = 0.1;
  const int stages = comm.size() * v;
  const tessera::StagePartition cut =
      tessera::StagePartition::even(tessera::gpt_pipeline_num_layers(cfg), stages, tessera::gpt_pipeline_layer_names(cfg));
  auto make = [&](tessera::nn::Recompute r) {
    return GPTPipe(comm, [cfg, cut](int s) { return tessera::make_gpt_pipeline_stage<float>(cfg, seed, cut, s); },
                   tessera::nn::CrossEntropy<float>({.ignore_index = -100, .reduction = tessera::nn::Reduction::sum}),
                   {.schedule = kind, .virtual_stages = v, .recompute = r});
  };
  GPTPipe a = make(tessera::nn::Recompute::none), b = make(rc);
  tessera::optim::SGD<float> oa(a.parameters(), {.lr = lr, .momentum = momentum});
  tessera::optim::SGD<float> ob(b.parameters(), {.lr = lr, .momentum = momentum});
  const bool feeds = a.holds_stage(0), ends = a.holds_stage(a.num_stages() - 1);
  int same_loss = 1;
  for (int s = 0; s < 3; ++s) {
    a.zero_grad();
    b.zero_grad();
    const float la = a.step(feeds ? tokens(8, s) : Tokens(), ends ? targets(8, s) : Tokens(), m);
    const float lb = b.step(feeds ? tokens(8, s) : Tokens(), ends ? targets(8, s) : Tokens(), m);
    same_loss &= tessera::testing::bitwise_equal_finite(std::span<const float>(&la, 1), std::span<const float>(&lb, 1));
    oa.step();
    ob.step();
  }
  int same = 1;
  for (std::size_t i = 0; i < a.parameters().size(); ++i)
    same &= tessera::testing::bitwise_equal_finite(values_of(a.parameters()[i].value), values_of(b.parameters()[i].value));
  RecomputeReport r;
  r.losses_bitwise = comm.all_reduce_value(same_loss, tessera::ReduceOp::min) == 1;
  r.params_bitwise = comm.all_reduce_value(same, tessera::ReduceOp::min) == 1;
  r.recomputed = b.last_step().recomputed_forwards;
  r.expected_recomputed = rc == tessera::nn::Recompute::full ? v * m : 0;
  r.recompute_seconds = b.last_step().recompute_seconds;
  return r;
}

// ---- CASES.md C5: pipeline + accumulation -----------------------------------------------------------
struct C5Report {
  double max_grad_err = 1;            // 2 stages x 2 mb x 2 accumulation steps vs 1 stage x 4 mb
  double max_untied_grad_diff = 1;    // the same, tensors other than the tied weight (bitwise expected)
  double loss_diff = 1;               // accumulated loss vs the 1-stage loss
  double norm_8x2 = 0, norm_2x8 = -1, norm_serial = -2;
  bool tied_bitwise = false;
  bool final_after_second = false, not_final_after_first = true;
};

// Needs comm.size() == 2. The 1-stage reference runs on each rank's own communicator.
inline C5Report c5_body(Comm& comm) {
  C5Report r;
  Comm self = comm.split(comm.rank(), 0);
  GPTPipe one = make_gpt_pipe(self, {.schedule = tessera::PipelineScheduleKind::one_f_one_b});
  one.zero_grad();
  const double one_loss = one.step(tokens(8), targets(8), 4);

  GPTPipe two = make_gpt_pipe(comm, {.schedule = tessera::PipelineScheduleKind::one_f_one_b, .accumulation_steps = 2});
  two.zero_grad();
  two.step(tokens(8).slice(0, 0, 4), targets(8).slice(0, 0, 4), 2);
  r.not_final_after_first = !two.last_step().grads_final;
  two.step(tokens(8).slice(0, 4, 8), targets(8).slice(0, 4, 8), 2);
  r.final_after_second = two.last_step().grads_final;
  r.loss_diff = tessera::testing::finite_or_infinite(std::abs(two.accumulated_loss() - one_loss));
  WorstError grad_err, untied_grad_diff;
  for (Parameter<float>& p : two.parameters()) {
    const Parameter<float>& q = one.parameters().at(p.name);
    const std::vector<float> ref(q.grad.data(), q.grad.data() + q.grad.numel());
    grad_err.add(rel_err(p.grad.data(), ref));
    if (p.name != "wte.weight") untied_grad_diff.add(tessera::testing::max_abs_error(values_of(p.grad), values_of(q.grad)));
  }
  r.max_grad_err = grad_err.value();
  r.max_untied_grad_diff = untied_grad_diff.value();
  r.tied_bitwise = tied_copies_bitwise_equal(comm, two);

  // The same global batch of 16 as 8 micro-batches of 2 and as 2 of 8: the same gradient norm,
  // equal to the serial model's.
  for (int m : {8, 2}) {
    GPTPipe p = make_gpt_pipe(comm, {.schedule = tessera::PipelineScheduleKind::one_f_one_b});
    p.zero_grad();
    p.step(tokens(16, 1), targets(16, 1), m);
    (m == 8 ? r.norm_8x2 : r.norm_2x8) = p.grad_norm();
  }
  tessera::GPT<float> gpt(tiny_config(), seed);
  tessera::nn::CrossEntropy<float> ce;
  auto [logits, ctx] = gpt.forward(tokens(16, 1));
  auto [loss, lctx] = ce.forward(logits, targets(16, 1));
  gpt.backward(ce.backward(1.0f, lctx), ctx);
  double sq = 0;
  for (Parameter<float>& p : gpt.parameters())
    for (std::int64_t i = 0; i < p.grad.numel(); ++i) sq += static_cast<double>(p.grad.data()[i]) * p.grad.data()[i];
  r.norm_serial = std::sqrt(sq);
  return r;
}

inline void check_c5(const C5Report& r) {
  CHECK(r.not_final_after_first);
  CHECK(r.final_after_second);
  CHECK(r.max_grad_err < 1e-6);
  // Same micro-batches, same order of accumulation, one division: bitwise equal but for the
  // tied weight, whose two copies are summed at the end instead of per micro-batch.
  CHECK(r.max_untied_grad_diff == 0.0);
  CHECK(r.loss_diff < 1e-6);
  CHECK(r.norm_8x2 == doctest::Approx(r.norm_2x8).epsilon(1e-6));
  CHECK(r.norm_8x2 == doctest::Approx(r.norm_serial).epsilon(1e-5));
  CHECK(r.tied_bitwise);
}

// ---- errors every rank reports alike -----------------------------------------------------------------
// Runs fn and returns the message of the tessera::Error it throws ("(no error)" otherwise).
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const tessera::Error& e) {
    return e.what();
  }
  return "(no error)";
}

struct ErrorReport {
  std::string too_few_samples, deadlock, targets_mismatch, wrong_chunks, v_without_interleaving;
};

// The 2-rank schedule of docs/schedules.md whose rank 0 waits for a gradient before it sends
// any activation.
inline tessera::schedule::Schedule deadlocking_schedule() {
  using tessera::schedule::Action;
  return {.name = "mine",
          .pp_size = 2,
          .num_microbatches = 2,
          .ticks = {{{Action::forward(0, 0)},
                     {Action::forward(1, 0), Action::recv_backward(0, 0, 1)},
                     {Action::send_forward(0, 0, 1), Action::send_forward(1, 0, 1)},
                     {Action::backward(0, 0), Action::recv_backward(1, 0, 1)},
                     {Action::backward(1, 0)}},
                    {{Action::recv_forward(0, 1, 0)},
                     {Action::forward(0, 1), Action::backward(0, 1), Action::recv_forward(1, 1, 0),
                      Action::send_backward(0, 1, 0)},
                     {Action::forward(1, 1), Action::backward(1, 1), Action::send_backward(1, 1, 0)}}}};
}

// Needs comm.size() == 2. Each error is thrown on every rank; the pipeline stays usable.
inline ErrorReport errors_body(Comm& comm) {
  ErrorReport r;
  GPTPipe pipe = make_gpt_pipe(comm, {.schedule = tessera::PipelineScheduleKind::one_f_one_b});
  r.too_few_samples = error_of([&] { pipe.step(tokens(3), targets(3), 4); });
  r.deadlock = error_of([&] { pipe.step(tokens(4), targets(4), deadlocking_schedule()); });
  r.targets_mismatch = error_of([&] { pipe.step(tokens(4), targets(6), 2); });
  r.wrong_chunks = error_of([&] {
    pipe.step(tokens(4), targets(4), tessera::schedule::InterleavedOneFOneB{.num_microbatches = 4, .virtual_stages = 2});
  });
  r.v_without_interleaving =
      error_of([&] { make_gpt_pipe(comm, {.schedule = tessera::PipelineScheduleKind::gpipe, .virtual_stages = 2}); });
  // Still usable after the errors: a correct step runs.
  pipe.zero_grad();
  pipe.step(tokens(4), targets(4), 2);
  return r;
}

inline void check_errors(const ErrorReport& r) {
  CHECK(r.too_few_samples.find("a batch of 3 samples cannot be split into 4 micro-batches") != std::string::npos);
  CHECK(r.deadlock.find("schedule 'mine (p=2, m=2)' deadlocks: rank 0 is stuck at tick 1 waiting for RECV_B(mb=0, "
                        "stage=0, from rank 1)") != std::string::npos);
  CHECK(r.targets_mismatch.find("the targets hold 6 samples but the inputs 4") != std::string::npos);
  CHECK(r.wrong_chunks.find("runs 2 model chunks per rank, but this pipeline holds 1 stages per rank") !=
        std::string::npos);
  CHECK(r.v_without_interleaving.find("virtual_stages = 2 needs the interleaved 1F1B schedule") != std::string::npos);
}

}  // namespace pipe_bodies
