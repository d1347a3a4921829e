#pragma once
/// @file
/// Checkpoints of a Hybrid model (dp x pp x tp, AdamW or ZeRO-1 AdamW): its parameters and
/// optimizer state saved as sharded safetensors and loaded at any other layout. Not included
/// by checkpoint.hpp (it pulls in the parallel policies).

#include <concepts>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "tessera/checkpoint/checkpoint_info.hpp"
#include "tessera/checkpoint/load_checkpoint.hpp"
#include "tessera/checkpoint/optimizer_state.hpp"
#include "tessera/checkpoint/save_checkpoint.hpp"
#include "tessera/checkpoint/tensor_shard.hpp"
#include "tessera/checkpoint/zero_state.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/optim/adamw.hpp"
#include "tessera/parallel/data/distributed_optimizer.hpp"
#include "tessera/parallel/hybrid/hybrid.hpp"

namespace tessera::checkpoint {

/// The AdamW state of `opt` (over `model`) as this rank holds it: per parameter
/// "<name>.exp_avg" and "<name>.exp_avg_sq" with the parameter's tp layout, or, with ZeRO-1,
/// this dp rank's flat pieces of them (zero_adamw_state). Views into the optimizer: loading
/// writes in place. Local.
template <std::floating_point T, class Input, class Target>
OptimizerState<T> hybrid_adamw_state(Hybrid<T, Input, Target>& model, DistributedOptimizer<optim::AdamW<T>>& opt) {
  return opt.zero1() ? zero_adamw_state(opt.sharded(), model.buckets()) : adamw_state(opt.replicated());
}

namespace detail {
template <std::floating_point T, class Input, class Target>
void save_hybrid(const std::filesystem::path& dir, Hybrid<T, Input, Target>& model, OptimizerState<T>* state,
                 const CheckpointMeta& meta) {
  std::set<std::string> copy_names;
  ParameterList<T> params;
  for (Parameter<T>& p : model.parameters()) {
    if (model.tied_copies().count(&p)) {
      copy_names.insert(p.name);
      continue;
    }
    params.push_back(p);
  }
  if (state)
    std::erase_if(state->tensors, [&](const TensorShard<T>& t) {
      for (const std::string& n : copy_names)
        if (t.name.rfind(n + ".", 0) == 0) return true;  // "<name>.exp_avg", "<name>.exp_avg_sq"
      return false;
    });
  save_checkpoint(dir, model.mesh(), params, state, meta);
}
}  // namespace detail

/// Saves `model`'s parameters and the AdamW state of `opt` into `dir` (see save_checkpoint:
/// atomic, each rank its shards; a tied weight only from the first stage). Collective over the
/// mesh's world. Throws what save_checkpoint throws, on every rank.
template <std::floating_point T, class Input, class Target>
void save_hybrid_checkpoint(const std::filesystem::path& dir, Hybrid<T, Input, Target>& model,
                            DistributedOptimizer<optim::AdamW<T>>& opt, const CheckpointMeta& meta) {
  OptimizerState<T> state = hybrid_adamw_state(model, opt);
  detail::save_hybrid(dir, model, &state, meta);
}
/// Saves `model`'s parameters only (no optimizer state), as above.
template <std::floating_point T, class Input, class Target>
void save_hybrid_checkpoint(const std::filesystem::path& dir, Hybrid<T, Input, Target>& model, const CheckpointMeta& meta) {
  detail::save_hybrid<T, Input, Target>(dir, model, nullptr, meta);
}

/// Loads the checkpoint in `dir`, saved at any layout, into `model`'s parameters and the
/// AdamW state and step count of `opt`. Returns what the index records. Collective over the
/// mesh's world. Throws what load_checkpoint throws (a missing tensor, a shape or
/// configuration that differs from `expected_config`, a truncated or corrupted file, a
/// checkpoint saved without optimizer state), on every rank, with no parameter changed.
template <std::floating_point T, class Input, class Target>
CheckpointInfo load_hybrid_checkpoint(const std::filesystem::path& dir, Hybrid<T, Input, Target>& model,
                                      DistributedOptimizer<optim::AdamW<T>>& opt, const nlohmann::json& expected_config) {
  OptimizerState<T> state = hybrid_adamw_state(model, opt);
  const CheckpointInfo info = load_checkpoint(dir, model.mesh(), model.parameters(), &state, expected_config);
  if (opt.zero1())
    opt.sharded().inner().set_steps(state.step);
  else
    opt.replicated().set_steps(state.step);
  return info;
}
/// Loads only the parameters (e.g. for sampling), as above.
template <std::floating_point T, class Input, class Target>
CheckpointInfo load_hybrid_checkpoint(const std::filesystem::path& dir, Hybrid<T, Input, Target>& model,
                                      const nlohmann::json& expected_config) {
  return load_checkpoint(dir, model.mesh(), model.parameters(), static_cast<OptimizerState<T>*>(nullptr),
                         expected_config);
}

}  // namespace tessera::checkpoint
