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
#include "tessera/parallel/hybrid/hybrid.hpp"

namespace tessera::checkpoint {

/// The AdamW state of `model` as this rank holds it: per parameter "<name>.exp_avg" and
/// "<name>.exp_avg_sq" with the parameter's tp layout, or, with ZeRO-1, this dp rank's flat
/// pieces of them (zero_adamw_state). Views into the optimizer: loading writes in place. Local.
template <std::floating_point T, class Input, class Target>
OptimizerState<T> hybrid_adamw_state(Hybrid<T, Input, Target, optim::AdamW<T>>& model) {
  return model.zero1() ? zero_adamw_state(model.zero_optimizer(), model.buckets()) : adamw_state(model.optimizer());
}

/// Saves `model`'s parameters and optimizer state (unless `with_optimizer` is false) into
/// `dir` (see save_checkpoint: atomic, each rank its shards; a tied weight only from the first
/// stage). Collective over the mesh's world. Throws what save_checkpoint throws, on every rank.
template <std::floating_point T, class Input, class Target>
void save_hybrid_checkpoint(const std::filesystem::path& dir, Hybrid<T, Input, Target, optim::AdamW<T>>& model,
                            const CheckpointMeta& meta, bool with_optimizer = true) {
  std::set<std::string> copy_names;
  ParameterList<T> params;
  for (Parameter<T>& p : model.parameters()) {
    if (model.tied_copies().count(&p)) {
      copy_names.insert(p.name);
      continue;
    }
    params.push_back(p);
  }
  OptimizerState<T> state = hybrid_adamw_state(model);
  std::erase_if(state.tensors, [&](const TensorShard<T>& t) {
    for (const std::string& n : copy_names)
      if (t.name.rfind(n + ".", 0) == 0) return true;  // "<name>.exp_avg", "<name>.exp_avg_sq"
    return false;
  });
  save_checkpoint(dir, model.mesh(), params, with_optimizer ? &state : nullptr, meta);
}

/// Loads the checkpoint in `dir`, saved at any layout, into `model`'s parameters and (with
/// `with_optimizer`) its AdamW state and step count. Returns what the index records.
/// Collective over the mesh's world. Throws what load_checkpoint throws (a missing tensor, a
/// shape or configuration that differs from `expected_config`, a truncated or corrupted file),
/// on every rank, with no parameter changed.
template <std::floating_point T, class Input, class Target>
CheckpointInfo load_hybrid_checkpoint(const std::filesystem::path& dir, Hybrid<T, Input, Target, optim::AdamW<T>>& model,
                                      const nlohmann::json& expected_config, bool with_optimizer = true) {
  OptimizerState<T> state = hybrid_adamw_state(model);
  const CheckpointInfo info =
      load_checkpoint(dir, model.mesh(), model.parameters(), with_optimizer ? &state : nullptr, expected_config);
  if (with_optimizer) {
    if (model.zero1())
      model.zero_optimizer().inner().set_steps(state.step);
    else
      model.optimizer().set_steps(state.step);
  }
  return info;
}

}  // namespace tessera::checkpoint
