#pragma once
// train_gpt --plan auto: the planner (tessera::plan, docs/planner.md) picks dp x tp x pp, the
// schedule, the micro-batches, the recomputation and the ZeRO stage for the world size given, from this machine's
// calibrated cluster file, says why, and writes the choice into the options before the ranks
// start.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "gpt/args.hpp"
#include "tessera/data/text_dataset.hpp"
#include "tessera/plan/cluster.hpp"
#include "tessera/plan/search.hpp"

namespace train_gpt {

// The model train_gpt trains, as the planner sees it: tessera's nn::Block (4 x d MLP, no dropout
// inside, its contexts as nn::block_activation_bytes counts them), byte-level vocabulary, the LM
// head tied to the embedding.
inline plan::ModelSpec model_spec(const Args& a) {
  return plan::ModelSpec{.name = "train_gpt GPT", .layers = a.layers, .hidden = a.d_model, .heads = a.heads,
                         .kv_heads = 0, .ffn = 0, .vocab = static_cast<int>(data::ByteTokenizer::vocab_size),
                         .seq = a.context, .tied = true, .dropout = false, .tessera_block = true};
}

// The layouts train_gpt can run, for `world` ranks: any tp dividing the heads (up to a node),
// pp dividing the layers, 1F1B, ZB-H1 or interleaved 1F1B (v 1-4), micro-batch sizes 1-64, ZeRO 0-3
// (ZeRO-3 with --zero3-unit's unit of gathering, default one layer: the planner counts the gathered
// units and their gradient buckets as Hybrid's per-layer units hold them), recomputation none,
// selective or full, no sequence parallelism (left to the user), fp32 AdamW.
inline plan::SearchOptions search_options(const Args& a, int world, const plan::Cluster& cluster) {
  plan::SearchOptions o{.world = world, .global_batch = a.batch};
  o.microbatch_sizes = {1, 2, 4, 8, 16, 32, 64};
  o.recompute = {plan::Recompute::none, plan::Recompute::selective, plan::Recompute::full};
  o.zero_stages = {0, 1, 2, 3};
  o.zero3_unit_layers = a.zero3_unit_layers();
  o.dp_bucket_bytes = o.dp_first_bucket_bytes = a.bucket_bytes();  // Hybrid's buckets, --bucket-mb
  o.sequence_parallel = false;
  for (int t = 1; t <= world && t <= cluster.devices_per_node; ++t)
    if (a.heads % t == 0) o.tp_sizes.push_back(t);
  return o;
}

// Only rank 0 of an MPI job prints (every process plans the same, deterministically).
inline bool prints() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMI_RANK"})
    if (const char* r = std::getenv(var); r != nullptr && std::atoi(r) != 0) return false;
  return true;
}

// Searches every layout of the world size (--world, else --dp x --tp x --pp) on the cluster
// file (--cluster, else plan/clusters/this_machine_<backend>.json), prints the ranking's top 3
// with their predicted step times (and the chosen one, if lower) and the rejections by kind,
// and sets a's layout to plan::choose's pick at --plan-tolerance. Throws tessera::Error naming the numbers when no layout fits.
inline void apply_auto_plan(Args& a) {
  const int world = a.world_size > 0 ? a.world_size : a.world();
  const std::string path = a.cluster.empty() ? "plan/clusters/this_machine_" + a.backend + ".json" : a.cluster;
  // The default path is relative to the working directory (the repository root).
  TESSERA_EXPECTS(!a.cluster.empty() || std::filesystem::exists(path), "train_gpt: --plan auto: cannot open '", path,
                  "' (the default cluster file, relative to the working directory: run from the repository root, or "
                  "give --cluster FILE, written by tessera-plan calibrate)");
  const plan::Cluster cluster = plan::Cluster::load(path);
  const plan::ModelSpec model = model_spec(a);
  const plan::SearchResult r =
      plan::search(model, cluster, search_options(a, world, cluster), plan::Precision::float32_adamw());
  TESSERA_EXPECTS(!r.ranked.empty(), "train_gpt: --plan auto: none of the ", r.rejected.size(), " layouts of ", world,
                  " ranks for batch ", a.batch, " fits ", path, (r.rejected.empty() ? "" : "; e.g. "),
                  (r.rejected.empty() ? "" : r.rejected.front().reason));
  const plan::Choice choice = plan::choose(r, a.plan_tolerance);
  const plan::Plan& best = r.ranked[choice.index];
  const plan::Layout& l = best.layout;
  if (prints()) {
    std::printf("plan auto: %d ranks on %s (%s): %zu layouts fit, %zu rejected; within %g%% of the fastest predicted, "
                "the one with the fewest optional mechanisms, then synchronizations, is chosen (--plan-tolerance)\n",
                world, cluster.name.c_str(), path.c_str(), r.ranked.size(), r.rejected.size(), 100 * a.plan_tolerance + 0.0);
    // Digits enough to tell the times of a small model apart (as TimeEstimate::to_string).
    const int digits = best.time.total() >= 0.1 ? 3 : best.time.total() >= 0.001 ? 5 : 7;
    auto show = [&](std::size_t i) {
      const plan::Plan& p = r.ranked[i];
      std::printf("plan auto: %zu. %-50s predicted %.*f s/step (%.0f tokens/s)%s\n", i + 1, p.layout.to_string().c_str(),
                  digits, p.time.total(), static_cast<double>(a.batch) * a.context / p.time.total(),
                  i == choice.index ? "  <- chosen" : "");
      std::printf("plan auto:    %s\n", p.time.to_string().c_str());
    };
    for (std::size_t i = 0; i < r.ranked.size() && i < 3; ++i) show(i);
    if (choice.index >= 3) show(choice.index);
    std::printf("plan auto: chosen: %s\n", choice.reason.c_str());
    if (r.ranked.size() > 1 && choice.index == 0)
      std::printf("plan auto: the second is predicted %.1f%% slower\n",
                  100 * (r.ranked[1].time.total() / best.time.total() - 1));
    for (const auto& [kind, n] : r.rejections_by_kind()) std::printf("plan auto: %4d rejected: %s\n", n, kind.c_str());
  }
  a.dp = l.dp;
  a.tp = l.tp;
  a.pp = l.pp;
  a.schedule = l.schedule == plan::PipelineSchedule::interleaved      ? "interleaved"
               : l.schedule == plan::PipelineSchedule::zero_bubble_h1 ? "zb-h1"
                                                                      : "1f1b";
  a.virtual_stages = l.virtual_stages;
  a.microbatches = l.num_microbatches;
  a.accum = 1;
  a.zero1 = l.zero_stage == 1;
  a.zero = l.zero_stage;
  a.recompute = plan::to_string(l.recompute);
  if (prints())
    std::printf("plan auto: training with --dp %d --tp %d --pp %d --schedule %s --virtual-stages %d --microbatches %d "
                "--recompute %s --zero %d\n",
                a.dp, a.tp, a.pp, a.schedule.c_str(), a.virtual_stages, a.microbatches, a.recompute.c_str(),
                l.zero_stage);
  a.sequence_parallel = l.sequence_parallel;
}

}  // namespace train_gpt
