#pragma once
// Bodies of the Hybrid tests, backend-independent (each takes the world Comm): 20 steps of the
// reference GPT at a (dp, pp, tp) layout against the single-rank run -- losses, gradient norms
// and final parameters -- with each schedule, gradient accumulation and ZeRO-1.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "tessera/checkpoint/checkpoint.hpp"
#include "tessera/checkpoint/hybrid_state.hpp"
#include "tessera/mesh/mesh.hpp"
#include "tessera/nn/cross_entropy.hpp"
#include "tessera/models/gpt.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/optim/clip_grad_norm.hpp"
#include "tessera/optim/param_group.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/testing/compare.hpp"
#include "tp/tp_test_util.hpp"

namespace hybrid_test {

using namespace tessera;

// The model and the run every layout trains. vocab 50 is not divisible by tp = 4 or 8, so
// the padded vocabulary is exercised; n_layer 6 gives 8 pipeline layers (pp up to 8); 8
// heads (tp up to 8).
struct Setup {
  GPTConfig config{.vocab_size = 50, .n_positions = 8, .n_layer = 6, .n_head = 8, .d_model = 16};
  std::uint64_t seed = 7;
  int steps = 20;
  std::int64_t batch = 16;  // global sequences per step
  std::int64_t T = 8;
  double lr = 3e-3;
  double max_norm = 0.5;  // low enough that clipping acts
  optim::AdamWOptions adamw() const { return {.lr = lr, .weight_decay = 0.01}; }
  // AdamW's groups as GPT recipes set them: no weight decay on biases and norm weights.
  optim::ParamGroupsOf<float, optim::AdamWOptions> groups(const ParameterList<float>& ps) const {
    return optim::weight_decay_groups(ps, adamw());
  }
};

// Step `step`'s global batch: tokens (B, T) and next-token targets (B, T).
inline std::pair<Tensor<std::int32_t>, Tensor<std::int32_t>> batch_of(const Setup& s, int step) {
  const Tensor<std::int32_t> seq = tp_test::random_tokens(s.batch, s.T + 1, s.config.vocab_size, 1000 + step);
  return {seq.slice(1, 0, s.T).contiguous(), seq.slice(1, 1, s.T + 1).contiguous()};
}

struct Reference {
  std::vector<double> losses, norms;
  std::map<std::string, Tensor<float>> params;  // final values by name
};

// The single-rank run: GPT, mean cross-entropy, clip, AdamW.
inline Reference serial_reference(const Setup& s) {
  GPT<float> gpt(s.config, s.seed);
  ParameterList<float> ps = gpt.parameters();
  optim::AdamW<float> opt(s.groups(ps));
  nn::CrossEntropy<float> ce({.reduction = nn::Reduction::mean});
  Reference r;
  for (int step = 0; step < s.steps; ++step) {
    auto [x, y] = batch_of(s, step);
    ps.zero_grad();
    auto [logits, ctx] = gpt.forward(x);
    auto [loss, lctx] = ce.forward(logits, y);
    gpt.backward(ce.backward(1.0f, lctx), ctx);
    r.norms.push_back(optim::clip_grad_norm(ps, s.max_norm));
    opt.step();
    r.losses.push_back(static_cast<double>(loss));
  }
  for (Parameter<float>& p : ps) r.params.emplace(p.name, p.value.contiguous());
  return r;
}

// A layout and the options it runs with.
struct Variant {
  MeshShape shape{};
  HybridOptions options{};
  bool zero1 = false;  // the optimizer sharded over dp (DistributedOptimizer)
  std::string describe() const {
    const char* sched = options.schedule == PipelineScheduleKind::gpipe         ? "gpipe"
                        : options.schedule == PipelineScheduleKind::one_f_one_b ? "1f1b"
                                                                                : "interleaved";
    char buf[160];
    std::snprintf(buf, sizeof buf, "dp=%d pp=%d tp=%d %s v=%d m=%d accum=%d%s", shape.dp, shape.pp, shape.tp, sched,
                  options.virtual_stages, options.num_microbatches, options.accumulation_steps,
                  zero1 ? " zero1" : "");
    return buf;
  }
};

// Every (dp, pp, tp) with dp * pp * tp = world, with options cycling through the schedules,
// ZeRO-1 and accumulation so that each appears at several sizes.
inline std::vector<Variant> variants_for(int world) {
  std::vector<Variant> out;
  int k = 0;
  for (int dp = 1; dp <= world; ++dp)
    for (int pp = 1; pp <= world / dp; ++pp) {
      if (world % (dp * pp) != 0) continue;
      const int tp = world / (dp * pp);
      Variant v;
      v.shape = MeshShape{.dp = dp, .pp = pp, .tp = tp};
      const int rows = 16 / dp;
      const int kind = k % 3;
      v.options.schedule = kind == 0   ? PipelineScheduleKind::one_f_one_b
                           : kind == 1 ? PipelineScheduleKind::gpipe
                                       : PipelineScheduleKind::interleaved_one_f_one_b;
      v.options.virtual_stages = 1;
      if (kind == 2) {
        if (pp > 1 && 2 * pp <= 8) {
          v.options.virtual_stages = 2;
        } else {
          v.options.schedule = PipelineScheduleKind::one_f_one_b;
        }
      }
      v.options.accumulation_steps = (k % 2 == 1 && rows >= 4) ? 2 : 1;
      const int per_call = rows / v.options.accumulation_steps;
      v.options.num_microbatches = std::min(per_call, pp > 1 ? 2 * pp : 2);
      if (v.options.virtual_stages > 1) v.options.num_microbatches = std::min(per_call / pp * pp, 2 * pp);
      if (v.options.num_microbatches < 1) v.options.num_microbatches = 1;
      v.zero1 = dp > 1 && k % 2 == 0;
      out.push_back(v);
      ++k;
    }
  return out;
}

// What one rank found.
struct Outcome {
  double worst_loss = 0, worst_norm = 0, worst_param = 0;  // relative errors; +inf after a NaN
  std::string worst_param_name;
  bool copies_equal = true;  // every rank's parameters equal on all dp ranks (bitwise)
};

// Runs steps [begin, end) of `v` on this rank of `world` and compares with `ref`: first loads
// the checkpoint `load` (unless empty; saved at any layout), at the end saves into `save`
// (unless empty). Collective over world.
inline Outcome run_segment(Comm& world, const Setup& s, const Variant& v, const Reference& ref, int begin, int end,
                           const std::string& load = "", const std::string& save = "") {
  Mesh mesh(world, v.shape);
  HybridGPT<float> model(mesh, s.config, s.seed, v.options);
  DistributedOptimizer<optim::AdamW<float>> opt(model, s.groups(model.parameters()), v.zero1);
  if (!load.empty()) {
    const auto info = checkpoint::load_hybrid_checkpoint(load, model, opt, checkpoint::gpt2_config_json(s.config));
    REQUIRE(info.step == begin);
  }
  const int dp = v.shape.dp, a = v.options.accumulation_steps;
  const std::int64_t rows = s.batch / dp, r0 = mesh.coord().dp * rows, chunk = rows / a;
  Outcome o;
  testing::WorstError worst_loss, worst_norm;  // a NaN is +inf, not dropped
  for (int step = begin; step < end; ++step) {
    auto [x, y] = batch_of(s, step);
    model.zero_grad();
    for (int k = 0; k < a; ++k) {
      const std::int64_t lo = r0 + k * chunk;
      model.forward_backward(x.slice(0, lo, lo + chunk).contiguous(), y.slice(0, lo, lo + chunk).contiguous());
    }
    const double norm = optim::clip_grad_norm(model.gradients(), s.max_norm);
    opt.step();
    const double loss = model.accumulated_loss();
    const std::size_t i = static_cast<std::size_t>(step);
    worst_loss.add(testing::rel_error(loss, ref.losses[i]));
    worst_norm.add(testing::rel_error(norm, ref.norms[i]));
  }
  o.worst_loss = worst_loss.value();
  o.worst_norm = worst_norm.value();
  if (!save.empty()) {
    checkpoint::CheckpointMeta meta;
    meta.config = checkpoint::gpt2_config_json(s.config);
    meta.step = end;
    checkpoint::save_hybrid_checkpoint(save, model, opt, meta);
  }
  if (end < s.steps) return o;  // the final parameters are compared at the end of the run
  const int tp = v.shape.tp, tr = mesh.coord().tp;
  testing::WorstError worst_param;
  for (const Parameter<float>& p : model.parameters()) {
    Tensor<float> full = ref.params.at(p.name);
    if (p.layout.is_shard() && p.layout.dim == 0) full = tp_test::pad_rows(full, p.value.size(0) * tp);
    const Tensor<float> want = p.layout.is_shard() ? shard_of(full, p.layout, tr, tp) : full;
    const double before = worst_param.value();
    worst_param.add(tp_test::rel_err(p.value, want));
    if (o.worst_param_name.empty() || worst_param.value() > before) o.worst_param_name = p.name;
    if (!tp_test::same_on_every_rank(mesh.dp(), p.value)) o.copies_equal = false;
  }
  o.worst_param = worst_param.value();
  return o;
}

// Runs all of `v`'s steps on this rank of `world` and compares with `ref`. Collective.
inline Outcome run_variant(Comm& world, const Setup& s, const Variant& v, const Reference& ref) {
  return run_segment(world, s, v, ref, 0, s.steps);
}

}  // namespace hybrid_test
