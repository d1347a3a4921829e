#pragma once
// The bodies of the tensor-parallel tests, written once as functions of the tp communicator
// (every rank of `tp` calls them), so they run on the threads backend (tests/tp/test_*.cpp, one
// thread per rank) and under mpirun (tests/tp/tp_mpi_test.cpp). Each body computes the serial
// reference itself, compares, and returns numbers that are the same on every rank; the callers
// assert on them.

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/nn/gelu.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/nn/mlp.hpp"
#include "tessera/nn/self_attention.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/tensor/column_parallel.hpp"
#include "tessera/parallel/tensor/dropout.hpp"
#include "tessera/parallel/tensor/mappings.hpp"
#include "tessera/parallel/tensor/row_parallel.hpp"
#include "tessera/parallel/tensor/tensor_parallel.hpp"
#include "tessera/parallel/tensor/vocab_parallel_cross_entropy.hpp"
#include "tessera/parallel/tensor/vocab_parallel_embedding.hpp"
#include "tessera/testing/compare.hpp"
#include "tessera/testing/instrumented_comm.hpp"
#include "tp_test_util.hpp"

namespace tp_bodies {

using namespace tessera;
using tp_test::GradReport;
using tp_test::rel_err;

// Every size divides by tp = 1, 2, 3 and 4: 12 heads of width 4, T = 12; the vocabulary (50)
// does not divide by 3 or 4, so the padding is exercised.
inline constexpr std::int64_t kB = 2, kT = 12, kD = 48, kHeads = 12, kVocab = 50;

// ---- a user-defined block (not from tessera::nn): y = x + down(drop(gelu(up(ln(x))))) -------

template <class T>
struct FeedForward {
  nn::LayerNorm<T> ln;
  nn::Linear<T> up;
  nn::GELU<T> act;
  Dropout<T> drop;
  nn::Linear<T> down;

  // The plan: ln replicated, up column-parallel, GELU and dropout on the hidden shard, down
  // row-parallel; the residual branch's pending sum is all-reduced (or reduce-scattered).
  static constexpr auto tp_plan =
      tp::plan(tp::residual(tp::replicate(&FeedForward::ln), tp::column(&FeedForward::up),
                            tp::elementwise(&FeedForward::act), tp::elementwise(&FeedForward::drop),
                            tp::row(&FeedForward::down)));

  FeedForward(std::int64_t d, std::int64_t hidden, std::uint64_t seed, double p = 0.0)
      : ln(d, {.prefix = "ff.ln"}),
        up(d, hidden, {.prefix = "ff.up", .seed = seed, .std = 0.3}),
        drop(p, {.prefix = "ff.drop", .seed = seed}),
        down(hidden, d, {.prefix = "ff.down", .seed = seed, .std = 0.3}) {}

  // The serial layer: the reference.
  using Input = Tensor<T>;
  struct Context {
    typename nn::LayerNorm<T>::Context ln;
    typename nn::Linear<T>::Context up;
    typename nn::GELU<T>::Context act;
    typename Dropout<T>::Context drop;
    typename nn::Linear<T>::Context down;
  };
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) {
    Context c;
    auto [a, c1] = ln.forward(x);
    auto [b, c2] = up.forward(a);
    auto [g, c3] = act.forward(b);
    auto [h, c4] = drop.forward(g);
    auto [y, c5] = down.forward(h);
    y.add_(x);
    return {std::move(y), Context{std::move(c1), std::move(c2), std::move(c3), std::move(c4), std::move(c5)}};
  }
  Tensor<T> backward(const Tensor<T>& dy, Context& c) {
    Tensor<T> dx = ln.backward(up.backward(act.backward(drop.backward(down.backward(dy, c.down), c.drop), c.act), c.up),
                               c.ln);
    dx.add_(dy);
    return dx;
  }
  ParameterList<T> parameters() {
    ParameterList<T> ps = ln.parameters();
    ps.append(up.parameters());
    ps.append(down.parameters());
    return ps;
  }
};

// ---- results -------------------------------------------------------------------------------

// Outputs and gradients of a tp layer against the serial layer.
struct Equivalence {
  double output = 0;    // relative error of the (gathered) output
  double input_grad = 0;  // of the (gathered) input gradient
  GradReport params;      // of every parameter gradient
};

// Collectives one rank issued.
struct Counts {
  std::size_t all_reduce = 0, all_reduce_elems = 0;
  std::size_t reduce_scatter = 0, reduce_scatter_elems = 0;
  std::size_t all_gather = 0, all_gather_elems = 0;
  std::size_t other = 0;  // broadcast, send, recv, barrier, split
};

inline Counts counts_of(const testing::CommCounters& c) {
  using K = testing::CallKind;
  return Counts{.all_reduce = c.calls(K::all_reduce),
                .all_reduce_elems = c.elements(K::all_reduce),
                .reduce_scatter = c.calls(K::reduce_scatter),
                .reduce_scatter_elems = c.elements(K::reduce_scatter),
                .all_gather = c.calls(K::all_gather),
                .all_gather_elems = c.elements(K::all_gather),
                .other = c.calls(K::broadcast) + c.calls(K::send) + c.calls(K::recv) + c.calls(K::barrier) +
                         c.calls(K::split)};
}

// This rank's positions of a (B, T, d) tensor under sequence parallelism, else all of it.
template <class L, class T>
Tensor<T> local_of(Comm& tp, const Tensor<T>& full) {
  if constexpr (std::same_as<L, Shard<1>>) return detail::tp::split_dim(full, 1, 1, tp.rank(), tp.size());
  else return full;
}
// The full (B, T, d) tensor from this rank's positions under sequence parallelism.
template <class L, class T>
Tensor<T> full_of(Comm& tp, const Tensor<T>& local) {
  if constexpr (std::same_as<L, Shard<1>>) return detail::tp::all_gather_dim(tp, local, 1);
  else return local;
}

// ---- bodies ----------------------------------------------------------------------------------

// The seven conjugate operators against their definitions; every rank's input differs (seeded
// by rank) where the operator combines ranks. Returns the largest absolute difference of values
// of order 1 (exactly 0 on the threads backend, which sums in rank order).
inline double mappings_body(Comm& tp) {
  const int r = tp.rank(), n = tp.size();
  const Shape s{2, 6 * n, 4 * n};
  auto rank_tensor = [&](int q) { return tp_test::random_tensor<double>(s, 100 + static_cast<std::uint64_t>(q)); };
  const Tensor<double> x = tp_test::random_tensor<double>(s, 7);
  const Tensor<double> bias = tp_test::random_tensor<double>(Shape{4 * n}, 8);
  Tensor<double> sum(s);
  for (int q = 0; q < n; ++q) sum.add_(rank_tensor(q));
  testing::WorstError err;  // a NaN is +inf, not dropped
  auto diff = [&](const Tensor<double>& a, const Tensor<double>& b) {
    if (a.shape() != b.shape()) {
      err.add(testing::infinite_error);
      return;
    }
    const Tensor<double> ac = a.contiguous(), bc = b.contiguous();
    err.add(testing::max_abs_error(tp_test::values_of(ac), tp_test::values_of(bc)));
  };
  auto slice = [&](const Tensor<double>& t, int dim) { return detail::tp::split_dim(t, dim, 1, r, n); };
  Tensor<double> sum_plus_bias = sum.clone();
  detail::tp::add_bias_rows(sum_plus_bias, bias);

  CopyToTensorModelParallelRegion<double> f(tp);
  diff(f.forward({x}).output.value, x);
  diff(f.backward({rank_tensor(r)}).value, sum);

  ReduceFromTensorModelParallelRegion<double> g(tp);
  diff(g.forward({rank_tensor(r).clone(), bias}).output.value, sum_plus_bias);
  diff(g.backward({x}).value, x);

  ScatterToTensorModelParallelRegion<double> sc(tp);
  diff(sc.forward({x}).output.value, slice(x, -1));
  diff(sc.backward({slice(x, -1)}).value, x);

  GatherFromTensorModelParallelRegion<double> ga(tp);
  diff(ga.forward({slice(x, -1)}).output.value, x);
  diff(ga.backward({x}).value, slice(x, -1));

  ScatterToSequenceParallelRegion<double> ssp(tp);
  diff(ssp.forward({x}).output.value, slice(x, 1));
  diff(ssp.backward({slice(x, 1)}).value, x);

  GatherFromSequenceParallelRegion<double> gsp(tp);
  diff(gsp.forward({slice(x, 1)}).output.value, x);
  diff(gsp.backward({rank_tensor(r)}).value, slice(sum, 1));

  ReduceScatterToSequenceParallelRegion<double> rs(tp);
  diff(rs.forward({rank_tensor(r), bias}).output.value, slice(sum_plus_bias, 1));
  diff(rs.backward({slice(x, 1)}).value, x);
  return tp.all_reduce_value(err.value(), ReduceOp::max);
}

// ColumnParallel then RowParallel (nn::Linear d -> 2d -> d, with biases) against the two serial
// layers, in the three wirings: f / g; gather_output + scatter (input_is_parallel = false);
// sequence parallelism. Returns the largest relative error of outputs and gradients.
template <class T>
double column_row_body(Comm& tp) {
  const std::int64_t d = 12, h = 24;
  const Tensor<T> x = tp_test::random_tensor<T>(Shape{kB, kT, d}, 1), dy = tp_test::random_tensor<T>(Shape{kB, kT, d}, 2);
  auto make = [&] {
    std::pair<nn::Linear<T>, nn::Linear<T>> p{nn::Linear<T>(d, h, {.prefix = "up", .seed = 3, .std = 0.3}),
                                              nn::Linear<T>(h, d, {.prefix = "down", .seed = 3, .std = 0.3})};
    tp_test::randomize(p.first.parameters(), 4);
    tp_test::randomize(p.second.parameters(), 4);
    return p;
  };
  auto serial = make();
  auto r1 = serial.first.forward(x);
  auto r2 = serial.second.forward(r1.output);
  const Tensor<T> ys = r2.output;
  const Tensor<T> dxs = serial.first.backward(serial.second.backward(dy, r2.ctx), r1.ctx);
  ParameterList<T> sp = serial.first.parameters();
  sp.append(serial.second.parameters());

  testing::WorstError worst;  // a NaN is +inf, not dropped
  auto check = [&](auto& col, auto& row, auto x_in, auto dy_in, auto to_full) {
    auto [hh, c1] = col.forward(x_in);
    auto [y, c2] = row.forward(hh);
    const auto dx = col.backward(row.backward(dy_in, c2), c1);
    ParameterList<T> ps = col.parameters();
    ps.append(row.parameters());
    const GradReport g = tp_test::compare_params(tp, ps, sp);
    worst.add(rel_err(to_full(y.value), ys));
    worst.add(rel_err(to_full(dx.value), dxs));
    worst.add(g.max_rel);
    worst.add(g.replicated_equal ? 0.0 : 1.0);
  };
  auto same = [](const Tensor<T>& t) { return t; };
  {
    auto full = make();
    ColumnParallel<nn::Linear<T>> col(full.first, tp);
    RowParallel<nn::Linear<T>> row(full.second, tp);
    check(col, row, with_layout<Replicate>(x), with_layout<Replicate>(dy), same);
  }
  {
    auto full = make();
    ColumnParallel<nn::Linear<T>, ColumnParallelOptions{.gather_output = true}> col(full.first, tp);
    RowParallel<nn::Linear<T>, RowParallelOptions{.input_is_parallel = false}> row(full.second, tp);
    check(col, row, with_layout<Replicate>(x), with_layout<Replicate>(dy), same);
  }
  {
    auto full = make();
    ColumnParallel<nn::Linear<T>, ColumnParallelOptions{.sequence_parallel = true}> col(full.first, tp);
    RowParallel<nn::Linear<T>, RowParallelOptions{.sequence_parallel = true}> row(full.second, tp);
    check(col, row, with_layout<Shard<1>>(local_of<Shard<1>>(tp, x)), with_layout<Shard<1>>(local_of<Shard<1>>(tp, dy)),
          [&](const Tensor<T>& t) { return full_of<Shard<1>>(tp, t); });
  }
  return worst.value();
}

// VocabParallelEmbedding (vocabulary 50 padded to a multiple of tp) against nn::Embedding:
// the table built from the seed equals the serial one's rows, outputs and gradients equal.
template <class L>
double vocab_embedding_body(Comm& tp) {
  constexpr bool sp = std::same_as<L, Shard<1>>;
  nn::Embedding<double> serial(kVocab, 12, {.prefix = "wte", .seed = 9});
  VocabParallelEmbedding<double, VocabParallelEmbeddingOptions{.sequence_parallel = sp}> from_seed(
      kVocab, 12, tp, {.prefix = "wte", .seed = 9});
  testing::WorstError worst;  // a NaN is +inf, not dropped
  worst.add(tp_test::compare_params(tp, from_seed.parameters(), serial.parameters(), true).max_rel);
  tp_test::randomize(serial.parameters(), 3);
  VocabParallelEmbedding<double, VocabParallelEmbeddingOptions{.sequence_parallel = sp}> emb(serial, tp);
  const Tensor<std::int32_t> ids = tp_test::random_tokens(kB, kT, kVocab, 5);
  const Tensor<double> dy = tp_test::random_tensor<double>(Shape{kB, kT, 12}, 6);
  auto [ys, cs] = serial.forward(ids);
  serial.backward(dy, cs);
  auto [y, c] = emb.forward(ids);
  emb.backward(with_layout<L>(local_of<L>(tp, dy)), c);
  worst.add(rel_err(full_of<L>(tp, y.value), ys));
  // Padding rows never get a gradient.
  const std::int64_t rows = emb.weight().grad.size(0), real = emb.vocab_end() - emb.vocab_start();
  for (std::int64_t i = real * 12; i < rows * 12; ++i) worst.add(emb.weight().grad.data()[i]);
  worst.add(tp_test::compare_params(tp, emb.parameters(), serial.parameters()).max_rel);
  return worst.value();
}

// Vocab-parallel cross-entropy of fp64 logits (n rows over `vocab` entries, a few targets
// ignored): the loss and the gathered logit gradient. Padding columns hold 1e3, which must be
// masked.
struct LossResult {
  double loss = 0;
  Tensor<double> grad;  // (rows, vocab), gathered
};
inline LossResult vocab_cross_entropy_body(Comm& tp, std::int64_t vocab, std::int64_t rows, double smoothing,
                                           const Tensor<double>& logits, const Tensor<std::int32_t>& targets) {
  const std::int64_t vpad = VocabParallelEmbedding<double>::padded_vocab_size(vocab, tp.size());
  Tensor<double> padded = Tensor<double>::full(Shape{rows, vpad}, 1e3);
  padded.slice(1, 0, vocab).copy_from(logits);
  const Tensor<double> local = shard_of(padded, ParamLayout::shard(1), tp.rank(), tp.size());
  VocabParallelCrossEntropy<double> ce(tp, vocab, {.label_smoothing = smoothing});
  auto [loss, ctx] = ce.forward(with_layout<Shard<-1>>(local), targets);
  const auto dl = ce.backward(1.0, ctx);
  Tensor<double> full = detail::tp::all_gather_dim(tp, dl.value, -1);
  return {loss, full.slice(1, 0, vocab).contiguous()};
}

// A tensor-parallel layer built by its plan (nn::SelfAttention, nn::MLP, nn::Block or the user's
// FeedForward) against the serial layer: outputs, input gradients and every parameter gradient.
template <class Layer, class L, class Make>
Equivalence plan_equivalence_body(Comm& tp, Make make) {
  Layer serial = make();
  tp_test::randomize(serial.parameters(), 21);
  const Tensor<float> x = tp_test::random_tensor<float>(Shape{kB, kT, kD}, 1);
  const Tensor<float> dy = tp_test::random_tensor<float>(Shape{kB, kT, kD}, 2);
  auto [ys, cs] = serial.forward(x);
  const Tensor<float> dxs = serial.backward(dy, cs);

  Layer copy = make();
  tp_test::randomize(copy.parameters(), 21);
  TensorParallel<Layer, L> par(std::move(copy), tp);
  auto [y, c] = par.forward(with_layout<L>(local_of<L>(tp, x)));
  const auto dx = par.backward(with_layout<L>(local_of<L>(tp, dy)), c);
  return Equivalence{.output = rel_err(full_of<L>(tp, y.value), ys),
                     .input_grad = rel_err(full_of<L>(tp, dx.value), dxs),
                     .params = tp_test::compare_params(tp, par.parameters(), serial.parameters())};
}

inline nn::SelfAttention<float> make_attention() { return {kD, kHeads, {.prefix = "h.0.attn", .seed = 1}}; }
inline nn::MLP<float> make_mlp() { return nn::MLP<float>(kD, {.prefix = "h.0.mlp", .seed = 1}); }
inline nn::Block<float> make_block() { return {kD, kHeads, {.prefix = "h.0", .seed = 1}}; }
inline FeedForward<float> make_feed_forward() { return {kD, 2 * kD, 1}; }

// The collectives one forward + backward of TensorParallel<Layer, L> issues on this rank.
template <class Layer, class L, class Make>
Counts plan_counts_body(Comm& tp, Make make) {
  auto counters = std::make_shared<testing::CommCounters>();
  TensorParallel<Layer, L> par(make(), testing::instrument(tp, counters));
  const Tensor<float> x = local_of<L>(tp, tp_test::random_tensor<float>(Shape{kB, kT, kD}, 1));
  counters->reset();
  auto [y, c] = par.forward(with_layout<L>(x));
  par.backward(y, c);
  return counts_of(*counters);
}

// The dropout of the user's block inside the tensor-parallel region (p = 0.5): the hidden masks
// differ between tp ranks (own streams), while the block's output is the same on every rank.
inline std::pair<bool, bool> user_block_dropout_body(Comm& tp) {
  TensorParallel<FeedForward<float>> par(FeedForward<float>(kD, 2 * kD, 1, 0.5), tp);
  const Tensor<float> x = tp_test::random_tensor<float>(Shape{kB, kT, kD}, 1);
  auto [y, c] = par.forward(with_layout<Replicate>(x));
  // The dropout context is the fourth step's of the branch: residual -> ln, up, act, drop.
  const Tensor<float>& mask = c.head.tail.tail.tail.head.mask;  // (B, T, hidden / tp)
  const bool masks_differ = tp.size() == 1 || !tp_test::same_on_every_rank(tp, mask.contiguous());
  return {masks_differ, tp_test::same_on_every_rank(tp, y.value)};
}

// TensorParallelGPT against GPT (same seed, weights randomized through the serial model
// and loaded as shards): logits, loss, every gradient; then `steps` AdamW steps on new batches,
// checking the loss each step, the replicated parameters bitwise equal on every tp rank after
// each step, and the parameters at the end.
struct GPTReport {
  double logits = 0, loss = 0;
  GradReport grads;
  double train_loss = 0;    // largest relative loss difference over the steps
  double train_params = 0;  // relative error of the parameters after the last step
  std::string train_worst;  // the parameter with that error
  bool replicated_equal = true;
};

inline GPTConfig tiny_gpt() {
  return GPTConfig{.vocab_size = kVocab, .n_positions = 16, .n_layer = 2, .n_head = kHeads, .d_model = kD};
}

template <class L>
GPTReport gpt_body(Comm& tp, int steps) {
  const GPTConfig cfg = tiny_gpt();
  GPT<float> serial(cfg, 11);
  tp_test::randomize(serial.parameters(), 31, 0.2);
  TensorParallelGPT<float, L> model(GPTDescription<float>(cfg, 11), tp);
  tp_test::load_shards(model.parameters(), serial.parameters(), tp);
  nn::CrossEntropy<float> ce_serial;
  VocabParallelCrossEntropy<float> ce(tp, cfg.vocab_size);

  GPTReport rep;
  auto step = [&](std::uint64_t batch, bool compare) {
    const Tensor<std::int32_t> tokens = tp_test::random_tokens(kB, kT, kVocab, 1000 + batch);
    const Tensor<std::int32_t> targets = tp_test::random_tokens(kB, kT, kVocab, 2000 + batch);
    auto [ls, cls] = serial.forward(tokens);
    auto [loss_s, cs] = ce_serial.forward(ls, targets);
    serial.backward(ce_serial.backward(1.0f, cs), cls);
    auto [lt, clt] = model.forward(tokens);
    auto [loss_t, ct] = ce.forward(lt, targets);
    model.backward(ce.backward(1.0f, ct), clt);
    const double dl = testing::rel_error(static_cast<double>(loss_t), static_cast<double>(loss_s));
    if (compare) {
      const Tensor<float> full = detail::tp::all_gather_dim(tp, lt.value, -1).slice(-1, 0, kVocab).contiguous();
      rep.logits = rel_err(full, ls);
      rep.loss = dl;
      rep.grads = tp_test::compare_params(tp, model.parameters(), serial.parameters());
    }
    return dl;
  };
  optim::AdamW<float> opt_s(serial.parameters(), {.lr = 1e-3, .eps = 1e-6});
  optim::AdamW<float> opt_t(model.parameters(), {.lr = 1e-3, .eps = 1e-6});
  testing::WorstError train_loss;  // a NaN is +inf, not dropped
  for (int s = 0; s < std::max(steps, 1); ++s) {
    opt_s.zero_grad();
    opt_t.zero_grad();
    train_loss.add(step(static_cast<std::uint64_t>(s), s == 0));
    rep.train_loss = train_loss.value();
    if (steps == 0) break;
    opt_s.step();
    opt_t.step();
    for (Parameter<float>& p : model.parameters())
      if (!p.layout.is_shard() && !tp_test::same_on_every_rank(tp, p.value)) rep.replicated_equal = false;
  }
  const GradReport final_values = tp_test::compare_params(tp, model.parameters(), serial.parameters(), true);
  rep.train_params = final_values.max_rel;
  rep.train_worst = final_values.worst;
  return rep;
}

// The collectives of one training step (forward, loss, backward) of TensorParallelGPT.
template <class L>
Counts gpt_counts_body(Comm& tp) {
  auto counters = std::make_shared<testing::CommCounters>();
  Comm counted = testing::instrument(tp, counters);
  TensorParallelGPT<float, L> model(GPTDescription<float>(tiny_gpt(), 11), counted);
  VocabParallelCrossEntropy<float> ce(counted, kVocab);
  const Tensor<std::int32_t> tokens = tp_test::random_tokens(kB, kT, kVocab, 1);
  counters->reset();
  auto [logits, c] = model.forward(tokens);
  auto [loss, cl] = ce.forward(logits, tokens);
  model.backward(ce.backward(1.0f, cl), c);
  return counts_of(*counters);
}

// TensorParallelGPT built from the seed holds exactly the slices of GPT's parameters (bit
// for bit), c_attn's as its heads' q, k and v columns (Shard(1, blocks=3)). Returns the largest
// relative error (exact: 0) and whether the layouts are as documented.
inline std::pair<double, bool> gpt_init_body(Comm& tp) {
  const GPTConfig cfg = tiny_gpt();
  GPT<float> serial(cfg, 5);
  TensorParallelGPT<float> model(GPTDescription<float>(cfg, 5), tp);
  const ParameterList<float> ps = model.parameters();
  bool layouts = ps.size() == serial.parameters().size() &&
                 ps.at("h.0.attn.c_attn.weight").layout == ParamLayout::shard(1, 3) &&
                 ps.at("h.0.attn.c_attn.bias").layout == ParamLayout::shard(0, 3) &&
                 ps.at("h.0.attn.c_proj.weight").layout == ParamLayout::shard(0) &&
                 ps.at("h.0.attn.c_proj.bias").layout == ParamLayout::replicate() &&
                 ps.at("h.1.mlp.c_fc.weight").layout == ParamLayout::shard(1) &&
                 ps.at("h.1.mlp.c_proj.weight").layout == ParamLayout::shard(0) &&
                 // Shard(0) of the padded table, with the unpadded extent when tp does not divide
                 // the vocabulary (checkpoints hold the [vocab_size, d] table).
                 ps.at("wte.weight").layout == (cfg.vocab_size % tp.size() == 0
                                                    ? ParamLayout::shard(0)
                                                    : ParamLayout::padded_shard(0, cfg.vocab_size)) &&
                 ps.at("ln_f.weight").layout == ParamLayout::replicate();
  // Rank r's c_attn columns are q, k, v of heads [r H / tp, (r + 1) H / tp).
  const Tensor<float>& local = ps.at("h.0.attn.c_attn.weight").value;
  const Tensor<float>& full = serial.parameters().at("h.0.attn.c_attn.weight").value;
  const std::int64_t w = kD / tp.size();
  for (std::int64_t part = 0; part < 3; ++part)
    layouts = layouts && tp_test::bitwise_equal(local.slice(1, part * w, (part + 1) * w).contiguous(),
                                                full.slice(1, part * kD + tp.rank() * w, part * kD + (tp.rank() + 1) * w)
                                                    .contiguous());
  return {tp_test::compare_params(tp, ps, serial.parameters(), true).max_rel, tp.all_reduce_value(layouts ? 1 : 0, ReduceOp::min) == 1};
}

}  // namespace tp_bodies
