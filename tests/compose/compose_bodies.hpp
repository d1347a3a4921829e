#pragma once
// Bodies of the composition tests, backend-independent (each takes the world Comm): a model given
// once as a SequentialModelDescription, trained 20 steps through Hybrid at a (dp, pp, tp) layout,
// against its serial SequentialModel run -- losses, gradient norms and final parameters -- with
// each schedule, accumulation and ZeRO-1. Written for any description, so a user's model (the
// Llama-style example) and the library's own run through the same checks.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "tessera/mesh/mesh.hpp"
#include "tessera/nn/block.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/nn/embedding.hpp"
#include "tessera/nn/layer_norm.hpp"
#include "tessera/nn/linear.hpp"
#include "tessera/core/batch_position.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/parallel/hybrid/hybrid.hpp"
#include "tessera/parallel/hybrid/sequential_model.hpp"
#include "tessera/parallel/tensor/sharding.hpp"
#include "tessera/parallel/tensor/tensor_parallel_plan.hpp"
#include "tessera/parallel/tensor/vocab_parallel_cross_entropy.hpp"
#include "tessera/testing/compare.hpp"
#include "tp/tp_test_util.hpp"

namespace compose_test {

using namespace tessera;

// A head a user writes for the description below: final LayerNorm, then an untied output
// projection whose logits stay split over the vocabulary under tensor parallelism.
template <class T>
struct NormHead {
  nn::LayerNorm<T> ln;
  nn::Linear<T> out;  // [d, V]
  using Input = Tensor<T>;
  using tp_output = Shard<-1>;
  static constexpr auto tp_plan = tp::plan(tp::replicate(&NormHead::ln), tp::column(&NormHead::out));
  struct Context {
    typename nn::LayerNorm<T>::Context ln;
    typename nn::Linear<T>::Context out;
  };
  ForwardResult<Tensor<T>, Context> forward(const Tensor<T>& x) const {
    auto [h, c1] = ln.forward(x);
    auto [y, c2] = out.forward(h);
    return {std::move(y), Context{std::move(c1), std::move(c2)}};
  }
  Tensor<T> backward(const Tensor<T>& dy, const Context& ctx) { return ln.backward(out.backward(dy, ctx.out), ctx.ln); }
  ParameterList<T> parameters() {
    ParameterList<T> ps = ln.parameters();
    ps.append(out.parameters());
    return ps;
  }
};

// A small decoder described once: token embedding, GPT-2 blocks, NormHead.
struct TinyDecoder {
  using First = nn::Embedding<float>;
  using Block = nn::Block<float>;
  using Last = NormHead<float>;
  std::int64_t vocab = 64, d = 16, heads = 8;
  int n_blocks = 6;
  std::uint64_t seed = 11;
  nn::LayerInit init() const { return {.prefix = "", .seed = seed, .std = 0.02, .n_layer = n_blocks}; }
  int num_blocks() const { return n_blocks; }
  First first() const { return First(vocab, d, init().child("wte")); }
  Block block(int i) const { return Block(d, heads, init().child("h." + std::to_string(i))); }
  Last last() const { return Last{nn::LayerNorm<float>(d, init().child("ln_f")), nn::Linear<float>(d, vocab, init().child("head"))}; }
};

// The vocabulary of a description: its `vocab` or its config's vocab_size.
template <class D>
std::int64_t vocab_of(const D& d) {
  if constexpr (requires { d.vocab; })
    return d.vocab;
  else
    return d.config.vocab_size;
}

struct Setup {
  int steps = 20;
  std::int64_t batch = 16, T = 8;
  double lr = 3e-3, max_norm = 0.5;
  optim::AdamWOptions adamw() const { return {.lr = lr, .weight_decay = 0.01}; }
  // AdamW's groups as GPT recipes set them: no weight decay on biases and norm weights.
  optim::ParamGroupsOf<float, optim::AdamWOptions> groups(const ParameterList<float>& ps) const {
    return optim::weight_decay_groups(ps, adamw());
  }
};

// Step `step`'s global batch: rows of an arithmetic sequence mod vocab (a random start, stride
// 1, 2 or 3 by row), so the next token is learnable; tokens (B, T) and targets (B, T).
template <class D>
std::pair<Tensor<std::int32_t>, Tensor<std::int32_t>> batch_of(const D& d, const Setup& s, int step) {
  const Tensor<std::int32_t> start = tp_test::random_tokens(s.batch, 1, vocab_of(d), 2000 + step);
  Tensor<std::int32_t> seq = Tensor<std::int32_t>::empty(Shape{s.batch, s.T + 1});
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t t = 0; t <= s.T; ++t)
      seq.data()[b * (s.T + 1) + t] = static_cast<std::int32_t>((start.data()[b] + t * (1 + b % 3)) % vocab_of(d));
  return {seq.slice(1, 0, s.T).contiguous(), seq.slice(1, 1, s.T + 1).contiguous()};
}

struct Reference {
  std::vector<double> losses, norms;
  std::map<std::string, Tensor<float>> params;
};

// The serial run: SequentialModel, mean cross-entropy, clip, AdamW (with weight-decay groups).
template <class D>
Reference serial_reference(const D& d, const Setup& s) {
  SequentialModel<D> model(d);
  ParameterList<float> ps = model.parameters();
  optim::AdamW<float> opt(s.groups(ps));
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  Reference r;
  for (int step = 0; step < s.steps; ++step) {
    auto [x, y] = batch_of(d, s, step);
    ps.zero_grad();
    // The whole batch of step `step` from row 0: the dropout masks every layout draws.
    const BatchPositionScope at(BatchPosition{.step = static_cast<std::uint64_t>(step), .first_row = 0});
    auto [logits, ctx] = model.forward(x);
    auto [loss, lctx] = ce.forward(logits, y);
    model.backward(ce.backward(1.0f, lctx), ctx);
    r.norms.push_back(optim::clip_grad_norm(ps, s.max_norm));
    opt.step();
    r.losses.push_back(static_cast<double>(loss));
  }
  for (Parameter<float>& p : ps) r.params.emplace(p.name, p.value.contiguous());
  return r;
}

struct Variant {
  MeshShape shape{};
  HybridOptions options{};
  bool zero1 = false;  // the optimizer sharded over dp (DistributedOptimizer)
  std::string describe() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "dp=%d pp=%d tp=%d sched=%d v=%d m=%d accum=%d%s", shape.dp, shape.pp, shape.tp,
                  static_cast<int>(options.schedule), options.virtual_stages, options.num_microbatches,
                  options.accumulation_steps, zero1 ? " zero1" : "");
    return buf;
  }
};

// Every (dp, pp, tp) with dp * pp * tp = world and pp * v <= layers, cycling through the
// schedules, accumulation and ZeRO-1.
inline std::vector<Variant> variants_for(int world, int layers) {
  std::vector<Variant> out;
  int k = 0;
  for (int dp = 1; dp <= world; ++dp)
    for (int pp = 1; pp <= world / dp; ++pp) {
      if (world % (dp * pp) != 0 || pp > layers) continue;
      Variant v;
      v.shape = MeshShape{.dp = dp, .pp = pp, .tp = world / (dp * pp)};
      const int rows = 16 / dp, kind = k % 3;
      v.options.schedule = kind == 0 ? PipelineScheduleKind::one_f_one_b
                           : kind == 1 ? PipelineScheduleKind::gpipe
                                       : PipelineScheduleKind::interleaved_one_f_one_b;
      if (kind == 2) {
        if (pp > 1 && 2 * pp <= layers)
          v.options.virtual_stages = 2;
        else
          v.options.schedule = PipelineScheduleKind::one_f_one_b;
      }
      v.options.accumulation_steps = (k % 2 == 1 && rows >= 4) ? 2 : 1;
      const int per_call = rows / v.options.accumulation_steps;
      v.options.num_microbatches = std::max(1, std::min(per_call, pp > 1 ? 2 * pp : 2));
      if (v.options.virtual_stages > 1) v.options.num_microbatches = std::max(pp, std::min(per_call / pp * pp, 2 * pp));
      v.zero1 = dp > 1 && k % 2 == 0;
      out.push_back(v);
      ++k;
    }
  return out;
}

// What fn() threw on this rank: its message, "aborted by a peer" for an AbortedError (another
// rank's failure reached this one), "" when it did not throw.
template <class F>
std::string own_error(F&& fn) {
  try {
    fn();
  } catch (const AbortedError&) {
    return "aborted by a peer";
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

struct Outcome {
  double worst_loss = 0, worst_norm = 0, worst_param = 0;
  std::string worst_param_name;
  int params_checked = 0;
  bool copies_equal = true;
};

// The Hybrid model of description `d` at layout `v` (stages cut evenly); Layout Shard<1>:
// sequence parallelism inside and between the stages.
template <class Layout = Replicate, class D>
Hybrid<float> make_hybrid(Mesh& mesh, const D& d, const Variant& v, const Setup& = {}) {
  const int layers = d.num_blocks() + 2;
  const StagePartition cut = StagePartition::even(layers, v.shape.pp * v.options.virtual_stages, sequential_layer_names(d));
  return Hybrid<float>(
      mesh, sequential_stages<Layout>(d, cut),
      [v = vocab_of(d)](Comm tp) {
        return sequential_loss<D>(VocabParallelCrossEntropy<float>(tp, v, {.reduction = nn::Reduction::sum}));
      },
      v.options);
}

// Runs `v` on this rank of `world` and compares every step with `ref`. Collective over world.
template <class Layout = Replicate, class D>
Outcome run_variant(Comm& world, const D& d, const Setup& s, const Variant& v, const Reference& ref) {
  Mesh mesh(world, v.shape);
  Hybrid<float> model = make_hybrid<Layout>(mesh, d, v, s);
  DistributedOptimizer<optim::AdamW<float>> opt(model, s.groups(model.parameters()), v.zero1);
  const int dp = v.shape.dp, a = v.options.accumulation_steps;
  const std::int64_t rows = s.batch / dp, r0 = mesh.coord().dp * rows, chunk = rows / a;
  testing::WorstError loss_err, norm_err, param_err;
  Outcome o;
  for (int step = 0; step < s.steps; ++step) {
    auto [x, y] = batch_of(d, s, step);
    model.zero_grad();
    for (int k = 0; k < a; ++k) {
      const std::int64_t lo = r0 + k * chunk;
      model.forward_backward(x.slice(0, lo, lo + chunk).contiguous(), y.slice(0, lo, lo + chunk).contiguous());
    }
    const double norm = optim::clip_grad_norm(model.gradients(), s.max_norm);
    opt.step();
    const std::size_t i = static_cast<std::size_t>(step);
    loss_err.add(testing::rel_error(model.accumulated_loss(), ref.losses[i]));
    norm_err.add(testing::rel_error(norm, ref.norms[i]));
  }
  const int tp = v.shape.tp, tr = mesh.coord().tp;
  for (const Parameter<float>& p : model.parameters()) {
    Tensor<float> full = ref.params.at(p.name);
    if (p.layout.is_shard() && p.layout.dim == 0) full = tp_test::pad_rows(full, p.value.size(0) * tp);
    const Tensor<float> want = p.layout.is_shard() ? shard_of(full, p.layout, tr, tp) : full;
    const double e = testing::norm_rel_error(p.value, want);
    if (!(e <= param_err.value())) o.worst_param_name = p.name;
    param_err.add(e);
    ++o.params_checked;
    if (!tp_test::same_on_every_rank(mesh.dp(), p.value)) o.copies_equal = false;
  }
  o.worst_loss = loss_err.value();
  o.worst_norm = norm_err.value();
  o.worst_param = param_err.value();
  return o;
}

}  // namespace compose_test
