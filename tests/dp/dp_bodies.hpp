#pragma once
// DataParallel test bodies, written once as functions of `tessera::Comm&` so that the same
// bodies run on the threads backend (test_dp.cpp, assertions on the main thread after the
// join) and under mpirun (test_dp_mpi.cpp, assertions on every rank). A body computes its own
// serial reference (the same model from the same seed on one rank, over the concatenated
// global batch) and returns numbers; it asserts nothing itself.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/sgd.hpp"
#include "tessera/parallel/data/data_parallel.hpp"
#include "tessera/parallel/data/zero_optimizer.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/instrumented_comm.hpp"

namespace dp_bodies {

using namespace tessera;

// ---------------------------------------------------------------------------------------------
// Helpers

// A hash of every parameter's bytes, in order: equal hashes <=> bitwise equal replicas.
inline std::int64_t hash_params(const ParameterList<float>& params) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const Parameter<float>& p : params) {
    const Tensor<float> v = p.value.contiguous();
    const auto* bytes = reinterpret_cast<const unsigned char*>(v.data());
    for (std::size_t i = 0; i < static_cast<std::size_t>(v.numel()) * sizeof(float); ++i) {
      h ^= bytes[i];
      h *= 0x100000001b3ull;
    }
  }
  return static_cast<std::int64_t>(h);
}

// Whether every parameter value is finite.
inline bool params_finite(const ParameterList<float>& params) {
  for (const Parameter<float>& p : params) {
    const Tensor<float> v = p.value.contiguous();
    if (!testing::all_finite(std::span<const float>(v.span()))) return false;
  }
  return true;
}

// Whether every rank of `c` holds bitwise the same parameters, all finite (replicas that are
// all NaN hash alike: a rank with a non-finite value sends -(rank + 1) instead of its hash, so
// that no two ranks agree, and answers false itself). Collective.
inline bool replicas_identical(Comm& c, const ParameterList<float>& params) {
  const bool finite = params_finite(params);
  const std::int64_t mine = finite ? hash_params(params) : -(static_cast<std::int64_t>(c.rank()) + 1);
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.size()));
  c.iall_gather(std::span<const std::int64_t>(&mine, 1), all).wait();
  return finite && std::all_of(all.begin(), all.end(), [&](std::int64_t h) { return h == all.front(); });
}

// ||a - b|| / ||b|| over one tensor (0 when both are 0); +infinity when either holds a NaN or
// an infinity, or the sizes differ (tessera::testing's rule: a non-finite error never passes).
inline double rel_diff(const Tensor<float>& a, const Tensor<float>& b) {
  const Tensor<float> ac = a.contiguous(), bc = b.contiguous();
  if (ac.numel() != bc.numel() || !testing::all_finite(std::span<const float>(ac.span())) ||
      !testing::all_finite(std::span<const float>(bc.span())))
    return testing::infinite_error;
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < ac.numel(); ++i) {
    const double d = static_cast<double>(ac.data()[i]) - bc.data()[i];
    num += d * d;
    den += static_cast<double>(bc.data()[i]) * bc.data()[i];
  }
  return testing::finite_or_infinite(den == 0 ? std::sqrt(num) : std::sqrt(num / den));
}

// The largest rel_diff over matching parameters' values (or grads); +infinity after a NaN
// (testing::WorstError; std::max drops it) or when the lists differ in length.
inline double max_rel_diff(const ParameterList<float>& a, const ParameterList<float>& b, bool grads = false) {
  if (a.size() != b.size()) return testing::infinite_error;
  testing::WorstError m;
  for (std::size_t i = 0; i < a.size(); ++i) m.add(grads ? rel_diff(a[i].grad, b[i].grad) : rel_diff(a[i].value, b[i].value));
  return m.value();
}

inline std::vector<float> flatten(const ParameterList<float>& params) {
  std::vector<float> out;
  for (const Parameter<float>& p : params) {
    const Tensor<float> v = p.value.contiguous();
    out.insert(out.end(), v.data(), v.data() + v.numel());
  }
  return out;
}

inline std::uint64_t mix(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---------------------------------------------------------------------------------------------
// The tiny GPT of the equivalence tests and its data

inline GPTConfig tiny_gpt() {
  return {.vocab_size = 13, .n_positions = 8, .n_layer = 2, .n_head = 2, .d_model = 8};
}
inline constexpr std::int64_t seq_len = 6;
inline constexpr std::uint64_t model_seed = 1234;

// Token sequences and next-token targets (some ignored, -100) of one micro-batch of one rank.
struct TokenBatch {
  Tensor<std::int32_t> tokens;   // (rows, T)
  Tensor<std::int32_t> targets;  // (rows, T)
  std::int64_t valid = 0;        // targets that are not ignored
};

inline TokenBatch token_batch(int step, int micro, int rank, std::int64_t rows, std::int64_t vocab = 13) {
  TokenBatch b{Tensor<std::int32_t>(Shape{rows, seq_len}), Tensor<std::int32_t>(Shape{rows, seq_len}), 0};
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t t = 0; t < seq_len; ++t) {
      const std::uint64_t h = mix((static_cast<std::uint64_t>(step) << 40) ^ (static_cast<std::uint64_t>(micro) << 32) ^
                                  (static_cast<std::uint64_t>(rank) << 24) ^ static_cast<std::uint64_t>(i * 64 + t));
      b.tokens(i, t) = static_cast<std::int32_t>(h % static_cast<std::uint64_t>(vocab));
      const bool ignored = (h >> 20) % 5 == 0;
      b.targets(i, t) = ignored ? -100 : static_cast<std::int32_t>((h >> 8) % static_cast<std::uint64_t>(vocab));
      b.valid += ignored ? 0 : 1;
    }
  }
  return b;
}

inline TokenBatch concat_batches(const std::vector<TokenBatch>& parts) {
  std::vector<Tensor<std::int32_t>> tok, tgt;
  std::int64_t valid = 0;
  for (const TokenBatch& p : parts) {
    tok.push_back(p.tokens);
    tgt.push_back(p.targets);
    valid += p.valid;
  }
  return {concat(tok, 0), concat(tgt, 0), valid};
}

// One plain (serial) optimizer or a ZeroOptimizer, behind one face.
struct AnyOptimizer {
  std::function<void()> step;
  std::function<void()> zero_grad;
  std::function<std::size_t()> state_bytes;
  std::function<void()> gather_full = [] {};   // ZeRO-3: the full values into the parameters
  std::function<void()> release_full = [] {};  // ZeRO-3: and freed again
};

template <class Opt, class Options>
AnyOptimizer plain_optimizer(const ParameterList<float>& params, const Options& o, std::function<void()> zero) {
  auto opt = std::make_shared<Opt>(params, o);
  return {[opt] { opt->step(); }, std::move(zero), [opt] { return opt->state_bytes(); }};
}

inline optim::SGDOptions sgd_options() { return {.lr = 0.5, .momentum = 0.9, .weight_decay = 0.01}; }
inline optim::AdamWOptions adamw_options() { return {.lr = 0.01, .weight_decay = 0.1}; }

// ---------------------------------------------------------------------------------------------
// Equivalence with serial training

struct EquivConfig {
  DataParallelOptions dp{};
  int accumulation = 1;    // micro-batches per step (no_sync on all but the last)
  bool unequal = false;    // rank r has 1 + r % 3 rows per micro-batch (else 2)
  bool zero = false;       // ZeroOptimizer instead of the plain optimizer
  bool zero2 = false;      // ... at ZeRO stage 2 (gradients sharded too)
  bool zero3 = false;      // ... at ZeRO stage 3 (parameters sharded too)
  bool adamw = false;      // AdamW instead of SGD with momentum
  int steps = 5;
};

struct EquivResult {
  double max_loss_rel = 0;             // over the steps, |loss - serial| / |serial|
  double max_param_rel = 0;            // after the last step, max over parameters
  bool identical_after_wrap = false;   // replicas bitwise equal right after construction
  bool identical_every_step = true;    // ... and after every step
  bool copied_wte = false;             // the tied wte keeps its own grad tensor
  bool alias_wte = false;              // ... which is its bucket's buffer
  std::size_t early_launches = 0;      // buckets launched during the last backward
  std::size_t num_buckets = 0;
  std::size_t state_bytes = 0;         // optimizer state on this rank
  std::vector<float> params;           // this rank's final parameters
};

inline std::int64_t rows_of(const EquivConfig& cfg, int rank) { return cfg.unequal ? 1 + rank % 3 : 2; }

// Trains the tiny GPT for cfg.steps steps with DataParallel over `c` (every rank starting from
// its own seed) and, alongside, the serial model on the concatenated global batch; compares.
inline EquivResult equivalence_body(Comm& c, const EquivConfig& cfg) {
  const int world = c.size(), rank = c.rank();
  EquivResult res;
  GPT<float> serial(tiny_gpt(), model_seed);
  DataParallel dp(GPT<float>(tiny_gpt(), model_seed + 17 * static_cast<std::uint64_t>(rank)), c, cfg.dp);
  res.identical_after_wrap = replicas_identical(c, dp.parameters());
  res.num_buckets = dp.buckets().buckets().size();

  AnyOptimizer opt_dp, opt_serial;
  auto zero_dp = [&dp] { dp.zero_grad(); };
  auto zero_serial = [&serial] { serial.parameters().zero_grad(); };
  if (cfg.zero) {
    const ZeroStage stage = cfg.zero3 ? ZeroStage::parameters : cfg.zero2 ? ZeroStage::gradients : ZeroStage::optimizer;
    const std::vector<GradBuckets<float>*> sets{&dp.buckets()};
    if (cfg.adamw) {
      auto z = std::make_shared<ZeroOptimizer<optim::AdamW<float>>>(stage, sets, adamw_options());
      opt_dp = {[z] { z->step(); }, [z] { z->zero_grad(); }, [z] { return z->state_bytes(); },
                [z] { z->gather_full_parameters(); }, [z] { z->release_full_parameters(false); }};
    } else {
      auto z = std::make_shared<ZeroOptimizer<optim::SGD<float>>>(stage, sets, sgd_options());
      opt_dp = {[z] { z->step(); }, [z] { z->zero_grad(); }, [z] { return z->state_bytes(); },
                [z] { z->gather_full_parameters(); }, [z] { z->release_full_parameters(false); }};
    }
  } else {
    opt_dp = cfg.adamw ? plain_optimizer<optim::AdamW<float>>(dp.parameters(), adamw_options(), zero_dp)
                       : plain_optimizer<optim::SGD<float>>(dp.parameters(), sgd_options(), zero_dp);
  }
  opt_serial = cfg.adamw ? plain_optimizer<optim::AdamW<float>>(serial.parameters(), adamw_options(), zero_serial)
                         : plain_optimizer<optim::SGD<float>>(serial.parameters(), sgd_options(), zero_serial);

  nn::CrossEntropy<float> ce_sum({.reduction = nn::Reduction::sum});
  nn::CrossEntropy<float> ce_mean({.reduction = nn::Reduction::mean});
  const int k = cfg.accumulation;
  testing::WorstError loss_rel;  // |loss - serial| / |serial| over the steps; a NaN is +inf
  for (int step = 0; step < cfg.steps; ++step) {
    // This rank's micro-batches, and the global batch of the serial model.
    std::vector<TokenBatch> mine, global;
    for (int m = 0; m < k; ++m) mine.push_back(token_batch(step, m, rank, rows_of(cfg, rank)));
    for (int r = 0; r < world; ++r)
      for (int m = 0; m < k; ++m) global.push_back(token_batch(step, m, r, rows_of(cfg, r)));

    std::int64_t local_valid = 0;
    for (const TokenBatch& b : mine) local_valid += b.valid;
    const double scale = dp.loss_scale(local_valid);
    double local_loss = 0;
    for (int m = 0; m < k; ++m) {
      auto guard = dp.no_sync(m + 1 < k);
      auto [logits, ctx] = dp.forward(mine[static_cast<std::size_t>(m)].tokens);
      auto [loss, lctx] = ce_sum.forward(logits, mine[static_cast<std::size_t>(m)].targets);
      local_loss += static_cast<double>(loss) * scale;
      dp.backward(ce_sum.backward(static_cast<float>(scale), lctx), ctx);
    }
    res.early_launches = dp.buckets().early_launches();
    double loss = local_loss;
    c.iall_reduce(std::span<double>(&loss, 1)).wait();
    opt_dp.step();
    opt_dp.zero_grad();

    const TokenBatch all = concat_batches(global);
    auto [slogits, sctx] = serial.forward(all.tokens);
    auto [sloss, slctx] = ce_mean.forward(slogits, all.targets);
    serial.backward(ce_mean.backward(1.0f, slctx), sctx);
    opt_serial.step();
    opt_serial.zero_grad();

    loss_rel.add(testing::rel_error(loss, static_cast<double>(sloss)));
    opt_dp.gather_full();  // ZeRO-3 (nothing otherwise)
    res.identical_every_step = replicas_identical(c, dp.parameters()) && res.identical_every_step;
    opt_dp.release_full();
  }
  res.max_loss_rel = loss_rel.value();
  opt_dp.gather_full();
  res.max_param_rel = max_rel_diff(dp.parameters(), serial.parameters());
  for (const auto& s : dp.buckets().slots())
    if (s.param->name == "wte.weight") {
      res.copied_wte = s.copy;
      res.alias_wte = dp.buckets().buckets()[s.bucket].alias;
    }
  res.state_bytes = opt_dp.state_bytes();
  res.params = flatten(dp.parameters());
  opt_dp.release_full();
  return res;
}

// ---------------------------------------------------------------------------------------------
// C4: accumulation with unequal token counts

struct C4Result {
  double dp_vs_global_mean = 0;      // accumulated gradient vs the single batch's mean gradient
  double mean_of_means_vs_global = 0;  // the wrong answer (mean of micro-batch means) vs the same
  std::int64_t tokens[2] = {0, 0};   // valid targets of the two micro-batches
};

// Micro-batch `m` of 3 (m = 0) or 7 (m = 1) valid targets: 2 rows of 6 positions, the rest
// ignored.
inline TokenBatch c4_batch(int m, int rank) {
  TokenBatch b = token_batch(100, m, rank, 2);
  const std::int64_t want = m == 0 ? 3 : 7;
  b.valid = 0;
  for (std::int64_t i = 0; i < 2; ++i)
    for (std::int64_t t = 0; t < seq_len; ++t) {
      if (b.valid < want) {
        b.targets(i, t) = static_cast<std::int32_t>((i * seq_len + t + m) % 13);
        ++b.valid;
      } else {
        b.targets(i, t) = -100;
      }
    }
  return b;
}

// Every rank accumulates 2 micro-batches of 3 and 7 valid tokens (C4 with one rank; more ranks
// repeat the case on each). The reference is the serial gradient of the whole global batch
// with a mean over its tokens.
inline C4Result c4_body(Comm& c) {
  C4Result res;
  DataParallel dp(GPT<float>(tiny_gpt(), model_seed), c);
  GPT<float> serial(tiny_gpt(), model_seed);
  GPT<float> wrong(tiny_gpt(), model_seed);
  nn::CrossEntropy<float> ce_sum({.reduction = nn::Reduction::sum});
  nn::CrossEntropy<float> ce_mean({.reduction = nn::Reduction::mean});
  const TokenBatch b0 = c4_batch(0, c.rank()), b1 = c4_batch(1, c.rank());
  res.tokens[0] = b0.valid;
  res.tokens[1] = b1.valid;

  const double scale = dp.loss_scale(b0.valid + b1.valid);
  for (int m = 0; m < 2; ++m) {
    const TokenBatch& b = m == 0 ? b0 : b1;
    auto guard = dp.no_sync(m == 0);
    auto [logits, ctx] = dp.forward(b.tokens);
    auto [loss, lctx] = ce_sum.forward(logits, b.targets);
    dp.backward(ce_sum.backward(static_cast<float>(scale), lctx), ctx);
  }

  std::vector<TokenBatch> global, per_rank_means;
  for (int r = 0; r < c.size(); ++r) {
    global.push_back(c4_batch(0, r));
    global.push_back(c4_batch(1, r));
  }
  const TokenBatch all = concat_batches(global);
  auto [sl, sctx] = serial.forward(all.tokens);
  auto [sloss, slctx] = ce_mean.forward(sl, all.targets);
  serial.backward(ce_mean.backward(1.0f, slctx), sctx);

  // The wrong answer: the mean of the micro-batch means (each micro-batch's mean loss, the
  // micro-batches weighted equally).
  const int nmb = static_cast<int>(global.size());
  for (const TokenBatch& b : global) {
    auto [wl, wctx] = wrong.forward(b.tokens);
    auto [wloss, wlctx] = ce_mean.forward(wl, b.targets);
    wrong.backward(ce_mean.backward(1.0f / static_cast<float>(nmb), wlctx), wctx);
  }
  res.dp_vs_global_mean = max_rel_diff(dp.parameters(), serial.parameters(), true);
  res.mean_of_means_vs_global = max_rel_diff(wrong.parameters(), serial.parameters(), true);
  return res;
}

// ---------------------------------------------------------------------------------------------
// C1: ranks take different branches; a user layer that never calls the grad-ready hook

// Input of Branchy: a batch of type 0 (sub-network a) or 1 (sub-network b).
struct BranchBatch {
  Tensor<float> x;  // (rows, 4)
  int type = 0;
};

// A user-defined layer: y = gain * head(a(x)) or gain * head(b(x)), by the batch type. `gain`
// is a raw Parameter whose backward never calls mark_grad_ready (still correct, not overlapped).
class Branchy {
 public:
  using Input = BranchBatch;
  struct Context {
    int type = 0;
    nn::Linear<float>::Context branch, head;
    Tensor<float> h;  // head's output, before the gain
  };
  explicit Branchy(std::uint64_t seed)
      : a_(4, 6, {.prefix = "a", .seed = seed, .std = 0.5}),
        b_(4, 6, {.prefix = "b", .seed = seed, .std = 0.5}),
        head_(6, 3, {.prefix = "head", .seed = seed, .std = 0.5}),
        gain_("gain", Tensor<float>::full(Shape{3}, 1.5f)) {}

  ForwardResult<Tensor<float>, Context> forward(const BranchBatch& in) const {
    auto [h1, c1] = (in.type == 0 ? a_ : b_).forward(in.x);
    auto [h2, c2] = head_.forward(h1);
    Tensor<float> y = Tensor<float>::empty(h2.shape());
    for (std::int64_t i = 0; i < h2.size(0); ++i)
      for (std::int64_t j = 0; j < 3; ++j) y(i, j) = h2(i, j) * gain_.value(j);
    return {std::move(y), Context{in.type, std::move(c1), std::move(c2), h2}};
  }
  NoGrad backward(const Tensor<float>& dy, const Context& ctx) {
    Tensor<float> dh = Tensor<float>::empty(dy.shape());
    for (std::int64_t i = 0; i < dy.size(0); ++i)
      for (std::int64_t j = 0; j < 3; ++j) {
        gain_.grad(j) += dy(i, j) * ctx.h(i, j);
        dh(i, j) = dy(i, j) * gain_.value(j);
      }
    (ctx.type == 0 ? a_ : b_).backward(head_.backward(dh, ctx.head), ctx.branch);
    return {};
  }
  ParameterList<float> parameters() {
    ParameterList<float> ps = a_.parameters();
    ps.append(b_.parameters());
    ps.append(head_.parameters());
    ps.push_back(gain_);
    return ps;
  }

 private:
  nn::Linear<float> a_, b_, head_;
  Parameter<float> gain_;
};

inline BranchBatch branch_batch(int step, int rank, int type) {
  const std::int64_t rows = 2 + rank % 2;
  BranchBatch b{Tensor<float>(Shape{rows, 4}), type};
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < 4; ++j)
      b.x(i, j) = static_cast<float>(static_cast<double>(mix(static_cast<std::uint64_t>(step * 1000 + rank * 100 + i * 10 + j)) % 2001) / 1000.0 - 1.0);
  return b;
}

// Loss of one batch: sum over rows and outputs of (y - t)^2 / 2 with t = 0.3 * (j + 1); returns
// the loss and dy scaled by `scale`.
inline std::pair<double, Tensor<float>> square_loss(const Tensor<float>& y, double scale) {
  Tensor<float> dy = Tensor<float>::empty(y.shape());
  double loss = 0;
  for (std::int64_t i = 0; i < y.size(0); ++i)
    for (std::int64_t j = 0; j < y.size(1); ++j) {
      const double d = static_cast<double>(y(i, j)) - 0.3 * static_cast<double>(j + 1);
      loss += 0.5 * d * d;
      dy(i, j) = static_cast<float>(d * scale);
    }
  return {loss * scale, dy};
}

struct C1Result {
  double first_grad_rel = 0;    // reduced gradient of step 0 vs the serial one
  double final_param_rel = 0;   // parameters after all steps vs serial
  bool identical_every_step = true;
  bool unused_branch_grad_was_zero_locally = true;  // before the reduction
};

// Rank r takes branch (r + step * alternate) % 2. With alternate = 0: rank 0 always a, rank 1
// always b (CASES C1). The serial model runs every rank's batch, each through its branch.
inline C1Result c1_body(Comm& c, int steps, bool alternate, const DataParallelOptions& o = {}) {
  C1Result res;
  const int world = c.size(), rank = c.rank();
  DataParallel dp(Branchy(7 + static_cast<std::uint64_t>(rank)), c, o);
  Branchy serial(7);
  optim::SGD<float> opt(dp.parameters(), sgd_options());
  optim::SGD<float> sopt(serial.parameters(), sgd_options());
  auto type_of = [&](int r, int step) { return (r + (alternate ? step : 0)) % 2; };
  for (int step = 0; step < steps; ++step) {
    const BranchBatch mine = branch_batch(step, rank, type_of(rank, step));
    const double scale = dp.loss_scale(mine.x.size(0));
    {
      // Check a zero local contribution of the branch not taken: run without sync first.
      auto guard = dp.no_sync();
      auto [y, ctx] = dp.forward(mine);
      auto [loss, dy] = square_loss(y, scale);
      dp.backward(dy, ctx);
      const std::string other = type_of(rank, step) == 0 ? "b.weight" : "a.weight";
      const Tensor<float> g = dp.parameters().at(other).grad.contiguous();
      for (std::int64_t i = 0; i < g.numel(); ++i)
        res.unused_branch_grad_was_zero_locally = res.unused_branch_grad_was_zero_locally && g.data()[i] == 0.0f;
    }
    dp.reduce_grads();  // the sync of this step's only micro-batch

    std::int64_t total = 0;
    for (int r = 0; r < world; ++r) total += branch_batch(step, r, type_of(r, step)).x.size(0);
    for (int r = 0; r < world; ++r) {
      const BranchBatch b = branch_batch(step, r, type_of(r, step));
      auto [y, ctx] = serial.forward(b);
      auto [loss, dy] = square_loss(y, 1.0 / static_cast<double>(total));
      serial.backward(dy, ctx);
    }
    if (step == 0) res.first_grad_rel = max_rel_diff(dp.parameters(), serial.parameters(), true);
    opt.step();
    dp.zero_grad();
    sopt.step();
    serial.parameters().zero_grad();
    res.identical_every_step = replicas_identical(c, dp.parameters()) && res.identical_every_step;
  }
  res.final_param_rel = max_rel_diff(dp.parameters(), serial.parameters());
  return res;
}

// The same as c1_body, but every micro-batch synced by backward itself (overlapped buckets,
// learned marks with a branch unused on some ranks).
inline C1Result c1_overlap_body(Comm& c, int steps, bool alternate, const DataParallelOptions& o) {
  C1Result res;
  const int world = c.size(), rank = c.rank();
  DataParallel dp(Branchy(7 + static_cast<std::uint64_t>(rank)), c, o);
  Branchy serial(7);
  optim::SGD<float> opt(dp.parameters(), sgd_options());
  optim::SGD<float> sopt(serial.parameters(), sgd_options());
  auto type_of = [&](int r, int step) { return (r + (alternate ? step : 0)) % 2; };
  for (int step = 0; step < steps; ++step) {
    const BranchBatch mine = branch_batch(step, rank, type_of(rank, step));
    const double scale = dp.loss_scale(mine.x.size(0));
    auto [y, ctx] = dp.forward(mine);
    auto [loss, dy] = square_loss(y, scale);
    dp.backward(dy, ctx);
    std::int64_t total = 0;
    for (int r = 0; r < world; ++r) total += branch_batch(step, r, type_of(r, step)).x.size(0);
    for (int r = 0; r < world; ++r) {
      const BranchBatch b = branch_batch(step, r, type_of(r, step));
      auto [sy, sctx] = serial.forward(b);
      auto [sloss, sdy] = square_loss(sy, 1.0 / static_cast<double>(total));
      serial.backward(sdy, sctx);
    }
    if (step == 0) res.first_grad_rel = max_rel_diff(dp.parameters(), serial.parameters(), true);
    opt.step();
    dp.zero_grad();
    sopt.step();
    serial.parameters().zero_grad();
    res.identical_every_step = replicas_identical(c, dp.parameters()) && res.identical_every_step;
  }
  res.final_param_rel = max_rel_diff(dp.parameters(), serial.parameters());
  return res;
}

// ---------------------------------------------------------------------------------------------
// C2: parameter lists differ between replicas

// A stack of Linear layers whose widths are given; parameters "l{i}.weight", "l{i}.bias".
class Stack {
 public:
  using Input = Tensor<float>;
  struct Context {
    std::vector<nn::Linear<float>::Context> ctx;
  };
  Stack(const std::vector<std::int64_t>& widths, std::uint64_t seed, bool last_bias = true) {
    for (std::size_t i = 0; i + 1 < widths.size(); ++i)
      layers_.emplace_back(widths[i], widths[i + 1],
                           nn::LayerInit{.prefix = "l" + std::to_string(i), .seed = seed, .std = 0.3},
                           last_bias || i + 2 < widths.size());
  }
  ForwardResult<Tensor<float>, Context> forward(const Tensor<float>& x) const {
    Context c;
    Tensor<float> h = x;
    for (const auto& l : layers_) {
      auto [y, lc] = l.forward(h);
      c.ctx.push_back(std::move(lc));
      h = std::move(y);
    }
    return {std::move(h), std::move(c)};
  }
  Tensor<float> backward(const Tensor<float>& dy, const Context& c) {
    Tensor<float> g = dy;
    for (std::size_t i = layers_.size(); i-- > 0;) {
      if (before_layer_backward) before_layer_backward(i);
      g = layers_[i].backward(g, c.ctx[i]);
    }
    return g;
  }
  ParameterList<float> parameters() {
    ParameterList<float> ps;
    for (auto& l : layers_) ps.append(l.parameters());
    return ps;
  }
  std::vector<nn::Linear<float>>& layers() { return layers_; }
  std::function<void(std::size_t)> before_layer_backward;  // called before layer i's backward

 private:
  std::vector<nn::Linear<float>> layers_;
};

// Builds a DataParallel of a Stack {4, 8, 3} whose last rank differs (variant 0: it leaves out
// the last bias; variant 1: its hidden width is 6) and returns the error message ("" if none).
inline std::string c2_body(Comm& c, int variant) {
  const bool odd = c.size() > 1 && c.rank() == c.size() - 1;
  std::vector<std::int64_t> widths = {4, 8, 3};
  bool last_bias = true;
  if (odd && variant == 0) last_bias = false;
  if (odd && variant == 1) widths = {4, 6, 3};
  try {
    DataParallel dp(Stack(widths, 3, last_bias), c);
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// C10: a value only some ranks know decides a branch

struct C10Result {
  double mean = 0;       // the validation loss every rank sees
  bool save = false;     // the decision taken from it
  double serial = 0;     // the serial mean over all ranks' samples
};

inline C10Result c10_body(Comm& c, double threshold) {
  DataParallel dp(Stack({4, 3}, 5), c);
  // Each rank's validation samples: a different number per rank, different losses.
  const std::int64_t n = 1 + c.rank() * 2;
  double sum = 0, all_sum = 0;
  std::int64_t all_n = 0;
  for (int r = 0; r < c.size(); ++r)
    for (std::int64_t i = 0; i < 1 + r * 2; ++i) {
      const double v = 0.25 * r + 0.01 * static_cast<double>(i);
      if (r == c.rank()) sum += v;
      all_sum += v;
      ++all_n;
    }
  C10Result res;
  res.mean = dp.global_mean(sum, n);
  res.save = res.mean < threshold;
  res.serial = all_sum / static_cast<double>(all_n);
  return res;
}

// ---------------------------------------------------------------------------------------------
// Ranks whose data runs out early

struct UnevenResult {
  std::int64_t steps_run = 0;
  double param_rel = 0;
  bool identical = true;
};

inline Tensor<float> stack_input(int step, int rank, std::int64_t rows, std::int64_t cols = 4) {
  Tensor<float> x(Shape{rows, cols});
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j)
      x(i, j) = static_cast<float>(static_cast<double>(mix(static_cast<std::uint64_t>(step * 977 + rank * 131 + i * 7 + j)) % 2001) / 1000.0 - 1.0);
  return x;
}

// Rank r has `steps_of(r)` = 3 - r % 3... batches: with `join`, every rank runs until no rank has
// data and a rank without data joins with zero contribution; without, all run the agreed
// minimum. The serial reference steps over the union of the batches present at each step.
inline UnevenResult uneven_body(Comm& c, bool join) {
  auto steps_of = [](int r) { return 3 - r % 3; };
  auto rows_of_r = [](int r) { return std::int64_t{1} + r % 2; };
  const int rank = c.rank();
  DataParallel dp(Stack({4, 5, 3}, 11 + static_cast<std::uint64_t>(rank)), c);
  Stack serial({4, 5, 3}, 11);
  optim::SGD<float> opt(dp.parameters(), sgd_options());
  optim::SGD<float> sopt(serial.parameters(), sgd_options());
  UnevenResult res;
  const std::int64_t agreed = join ? -1 : dp.agree_num_steps(steps_of(rank));
  for (int step = 0;; ++step) {
    const bool has = step < steps_of(rank);
    if (join ? !dp.any_rank_has_data(has) : step >= agreed) break;
    const double scale = dp.loss_scale(has ? rows_of_r(rank) : 0);
    if (has) {
      auto [y, ctx] = dp.forward(stack_input(step, rank, rows_of_r(rank)));
      auto [loss, dy] = square_loss(y, scale);
      dp.backward(dy, ctx);
    } else {
      dp.reduce_grads();
    }
    opt.step();
    dp.zero_grad();
    std::int64_t total = 0;
    for (int r = 0; r < c.size(); ++r)
      if (step < steps_of(r)) total += rows_of_r(r);
    for (int r = 0; r < c.size(); ++r) {
      if (step >= steps_of(r)) continue;
      auto [y, ctx] = serial.forward(stack_input(step, r, rows_of_r(r)));
      auto [loss, dy] = square_loss(y, 1.0 / static_cast<double>(total));
      serial.backward(dy, ctx);
    }
    sopt.step();
    serial.parameters().zero_grad();
    res.identical = replicas_identical(c, dp.parameters()) && res.identical;
    ++res.steps_run;
  }
  res.param_rel = max_rel_diff(dp.parameters(), serial.parameters());
  return res;
}

// ---------------------------------------------------------------------------------------------
// Which collectives a step issues, and when buckets start

struct CountResult {
  std::vector<std::size_t> all_reduce_after_micro;  // all_reduce calls after each micro-batch
  std::size_t buckets = 0;
  std::size_t distinct_params = 0;
  std::size_t reduce_scatter = 0, all_gather = 0;     // per ZeRO step
  std::size_t launched_when_first_layer_starts = 0;  // in step 2
  std::size_t early_launches = 0;                    // in step 2
};

// A 4-layer Stack over an instrumented communicator: counts the collectives of a step with
// `k` micro-batches, and observes (from the bottom layer's backward) how many buckets were
// launched before it runs.
inline CountResult count_body(Comm& c, const DataParallelOptions& o, int k, bool zero) {
  auto counters = std::make_shared<testing::CommCounters>();
  Comm ic = testing::instrument(c, counters);
  CountResult res;
  DataParallel dp(Stack({6, 6, 6, 6, 6}, 21), ic, o);
  res.buckets = dp.buckets().buckets().size();
  res.distinct_params = dp.buckets().slots().size();
  std::optional<ZeroOptimizer<optim::SGD<float>>> zopt;
  std::optional<optim::SGD<float>> opt;
  if (zero)
    zopt.emplace(dp, sgd_options());
  else
    opt.emplace(dp.parameters(), sgd_options());
  // Probe: the bottom Linear's backward runs last; count the buckets started before it.
  std::size_t launched_at_start = 0;
  GradBuckets<float>& buckets = dp.buckets();
  dp.module().before_layer_backward = [&](std::size_t i) {
    if (i == 0) launched_at_start = buckets.launched();
  };
  for (int step = 0; step < 2; ++step) {
    counters->reset();
    const double scale = dp.loss_scale(2 * k);
    res.all_reduce_after_micro.clear();
    for (int m = 0; m < k; ++m) {
      auto guard = dp.no_sync(m + 1 < k);
      auto [y, ctx] = dp.forward(stack_input(step * 10 + m, c.rank(), 2, 6));
      auto [loss, dy] = square_loss(y, scale);
      dp.backward(dy, ctx);
      res.all_reduce_after_micro.push_back(counters->calls(testing::CallKind::all_reduce));
    }
    if (zero) {
      zopt->step();
      zopt->zero_grad();
      res.reduce_scatter = counters->calls(testing::CallKind::reduce_scatter);
      res.all_gather = counters->calls(testing::CallKind::all_gather);
    } else {
      opt->step();
      dp.zero_grad();
    }
    res.early_launches = dp.buckets().early_launches();
    res.launched_when_first_layer_starts = launched_at_start;
  }
  return res;
}

// ---------------------------------------------------------------------------------------------
// A parameter used more often than in the first backward

// y = lin(lin(...lin(x))) with `times` uses of the one Linear (weight sharing by reuse).
class Reuse {
 public:
  using Input = Tensor<float>;
  struct Context {
    std::vector<nn::Linear<float>::Context> ctx;
  };
  explicit Reuse(std::uint64_t seed) : lin_(3, 3, {.prefix = "lin", .seed = seed, .std = 0.4}) {}
  ForwardResult<Tensor<float>, Context> forward(const Tensor<float>& x) const {
    Context c;
    Tensor<float> h = x;
    for (int i = 0; i < times; ++i) {
      auto [y, lc] = lin_.forward(h);
      c.ctx.push_back(std::move(lc));
      h = std::move(y);
    }
    return {std::move(h), std::move(c)};
  }
  Tensor<float> backward(const Tensor<float>& dy, const Context& c) {
    Tensor<float> g = dy;
    for (std::size_t i = c.ctx.size(); i-- > 0;) g = lin_.backward(g, c.ctx[i]);
    return g;
  }
  ParameterList<float> parameters() { return lin_.parameters(); }
  int times = 1;

 private:
  nn::Linear<float> lin_;
};

struct ReuseResult {
  std::string error;     // the error of the step whose use grew ("" when none)
  double param_rel = 0;  // vs serial, when no error
};

// Step s uses the Linear uses[s] times.
inline ReuseResult reuse_body(Comm& c, const std::vector<int>& uses, const DataParallelOptions& o) {
  ReuseResult res;
  DataParallel dp(Reuse(3 + static_cast<std::uint64_t>(c.rank())), c, o);
  Reuse serial(3);
  optim::SGD<float> opt(dp.parameters(), sgd_options());
  optim::SGD<float> sopt(serial.parameters(), sgd_options());
  for (std::size_t step = 0; step < uses.size(); ++step) {
    dp.module().times = serial.times = uses[step];
    const Tensor<float> x = stack_input(static_cast<int>(step), c.rank(), 2, 3);
    const double scale = dp.loss_scale(2);
    try {
      auto [y, ctx] = dp.forward(x);
      auto [loss, dy] = square_loss(y, scale);
      dp.backward(dy, ctx);
    } catch (const Error& e) {
      res.error = e.what();
      return res;
    }
    opt.step();
    dp.zero_grad();
    const std::int64_t total = 2 * c.size();
    for (int r = 0; r < c.size(); ++r) {
      auto [y, ctx] = serial.forward(stack_input(static_cast<int>(step), r, 2, 3));
      auto [loss, dy] = square_loss(y, 1.0 / static_cast<double>(total));
      serial.backward(dy, ctx);
    }
    sopt.step();
    serial.parameters().zero_grad();
  }
  res.param_rel = max_rel_diff(dp.parameters(), serial.parameters());
  return res;
}

// ---------------------------------------------------------------------------------------------
// A tie the library is not told about

// A toy language model whose head shares the embedding's tensors through the plain
// Parameter(name, value, grad, layout) constructor (not Parameter::tied): DataParallel finds
// the sharer in the first backward and keeps the gradient whole.
class UndeclaredTie {
 public:
  using Input = Tensor<std::int32_t>;
  struct Context {
    nn::Embedding<float>::Context emb;
    Tensor<float> h;  // (N, d)
  };
  explicit UndeclaredTie(std::uint64_t seed)
      : emb_(13, 4, {.prefix = "emb", .seed = seed, .std = 0.5}),
        head_(emb_.weight().name, emb_.weight().value, emb_.weight().grad, emb_.weight().layout) {}
  ForwardResult<Tensor<float>, Context> forward(const Tensor<std::int32_t>& ids) const {
    auto [h, ce] = emb_.forward(ids);  // (B, T, d)
    const Tensor<float> hf = h.reshape(Shape{h.numel() / 4, 4});
    Tensor<float> logits(Shape{hf.size(0), 13});
    for (std::int64_t i = 0; i < hf.size(0); ++i)
      for (std::int64_t v = 0; v < 13; ++v) {
        float s = 0;
        for (std::int64_t j = 0; j < 4; ++j) s += hf(i, j) * head_.value(v, j);
        logits(i, v) = s;
      }
    return {logits.reshape(ids.shape().rank() == 2 ? Shape{ids.size(0), ids.size(1), 13} : Shape{hf.size(0), 13}),
            Context{std::move(ce), hf}};
  }
  NoGrad backward(const Tensor<float>& dlogits, const Context& c) {
    const Tensor<float> g = dlogits.contiguous().reshape(Shape{c.h.size(0), 13});
    Tensor<float> dh(Shape{c.h.size(0), 4});
    for (std::int64_t i = 0; i < g.size(0); ++i)
      for (std::int64_t v = 0; v < 13; ++v)
        for (std::int64_t j = 0; j < 4; ++j) {
          head_.grad(v, j) += g(i, v) * c.h(i, j);
          dh(i, j) += g(i, v) * head_.value(v, j);
        }
    head_.mark_grad_ready();  // a hook on the head's own Parameter object: nobody listens
    Index dims = c.emb.ids.shape().dims();
    dims[static_cast<std::size_t>(c.emb.ids.rank())] = 4;
    return emb_.backward(dh.reshape(Shape::from(dims, c.emb.ids.rank() + 1)), c.emb);
  }
  ParameterList<float> parameters() { return emb_.parameters(); }

 private:
  nn::Embedding<float> emb_;
  Parameter<float> head_;
};

struct TieResult {
  double param_rel = 0;
  bool copied = false;
  bool identical = true;
};

inline TieResult undeclared_tie_body(Comm& c, int steps) {
  TieResult res;
  DataParallel dp(UndeclaredTie(5 + static_cast<std::uint64_t>(c.rank())), c,
                  {.bucket_size = 0, .first_bucket_size = 0});
  UndeclaredTie serial(5);
  optim::SGD<float> opt(dp.parameters(), sgd_options());
  optim::SGD<float> sopt(serial.parameters(), sgd_options());
  nn::CrossEntropy<float> ce_sum({.reduction = nn::Reduction::sum});
  for (int step = 0; step < steps; ++step) {
    const TokenBatch b = token_batch(step, 0, c.rank(), 2);
    const double scale = dp.loss_scale(b.valid);
    auto [y, ctx] = dp.forward(b.tokens);
    auto [loss, lctx] = ce_sum.forward(y, b.targets);
    dp.backward(ce_sum.backward(static_cast<float>(scale), lctx), ctx);
    opt.step();
    dp.zero_grad();
    std::vector<TokenBatch> all;
    for (int r = 0; r < c.size(); ++r) all.push_back(token_batch(step, 0, r, 2));
    const TokenBatch g = concat_batches(all);
    auto [sy, sctx] = serial.forward(g.tokens);
    auto [sloss, slctx] = ce_sum.forward(sy, g.targets);
    serial.backward(ce_sum.backward(1.0f / static_cast<float>(g.valid), slctx), sctx);
    sopt.step();
    serial.parameters().zero_grad();
    res.identical = replicas_identical(c, dp.parameters()) && res.identical;
  }
  res.param_rel = max_rel_diff(dp.parameters(), serial.parameters());
  res.copied = dp.buckets().slots().front().copy;
  return res;
}

}  // namespace dp_bodies
