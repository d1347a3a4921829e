#pragma once
/// @file
/// load_checkpoint: the collective load of a sharded checkpoint into this rank's parameters
/// and optimizer state, at any (dp, tp, pp) layout.

#include <nlohmann/json.hpp>

#include <concepts>
#include <exception>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "tessera/checkpoint/checkpoint_info.hpp"
#include "tessera/checkpoint/checkpoint_reader.hpp"
#include "tessera/checkpoint/detail/collective.hpp"
#include "tessera/checkpoint/optimizer_state.hpp"
#include "tessera/checkpoint/tensor_shard.hpp"
#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/mesh/mesh.hpp"

namespace tessera::checkpoint {

/// Loads the checkpoint in `dir` into `params` (this rank's parameters: this pp stage's, tp
/// shards cut by their layouts at this rank's tp coordinate) and, unless null, `optimizer`'s
/// tensors and step, resharding from whatever (dp, tp, pp) the checkpoint was saved at.
/// Returns what the index records (step, config, extra, saved layout).
///
/// Collective over `world`: every rank calls it. Every rank first checks everything it needs
/// (the index, the configuration, presence, global shapes, the files, CRCs and coverage of the
/// pieces it reads); if any rank finds an error, every rank throws (its own error, or
/// tessera::Error naming the failing rank and its message) and no parameter has changed.
///
/// Throws tessera::Error naming the first differing field when `expected_config` (as given to
/// save, e.g. gpt2_config_json) differs from the saved one (an empty object skips the check);
/// naming the tensor when it is missing (e.g. optimizer state from a checkpoint saved without
/// it), has another global shape, or a file holding it is truncated, corrupted or missing.
template <std::floating_point T>
CheckpointInfo load_checkpoint(const std::filesystem::path& dir, Comm world, const Placement& where,
                               const ParameterList<T>& params, OptimizerState<T>* optimizer,
                               const nlohmann::json& expected_config) {
  const std::string what = tessera::detail::str("load_checkpoint(", dir.string(), ")");
  std::exception_ptr err;
  std::optional<CheckpointReader> reader;
  std::vector<std::pair<detail::LoadPlan, Tensor<T>>> plans;
  try {
    TESSERA_EXPECTS(where.coord.tp >= 0 && where.coord.tp < where.shape.tp, what, ": tp coordinate ", where.coord.tp,
                    " is outside tp size ", where.shape.tp);
    reader.emplace(dir);
    reader->check_config(expected_config);
    for (const Parameter<T>& p : params) {
      const TensorShard<T> s{p.name, p.value, p.layout, std::nullopt};
      plans.emplace_back(reader->plan(s, where.coord.tp, where.shape.tp), p.value);
    }
    if (optimizer) {
      TESSERA_EXPECTS(reader->info().has_optimizer, what, ": the checkpoint holds no optimizer state (e.g. tensor '",
                      optimizer->tensors.empty() ? std::string("?") : optimizer->tensors.front().name,
                      "'); load without an optimizer or from a checkpoint saved with one");
      for (const TensorShard<T>& s : optimizer->tensors)
        plans.emplace_back(reader->plan(s, where.coord.tp, where.shape.tp), s.value);
    }
  } catch (...) {
    err = std::current_exception();
  }
  detail::agree(world, err, what);
  try {
    for (const auto& [plan, value] : plans) detail::execute(plan, value);
    if (optimizer) optimizer->step = reader->info().optimizer_step;
  } catch (...) {
    err = std::current_exception();
  }
  detail::agree(world, err, what);
  return reader->info();
}

/// load_checkpoint on `mesh`'s world with this rank's placement on it. Collective over the
/// mesh's world; see the main overload.
template <std::floating_point T>
CheckpointInfo load_checkpoint(const std::filesystem::path& dir, Mesh& mesh, const ParameterList<T>& params,
                               OptimizerState<T>* optimizer, const nlohmann::json& expected_config) {
  return load_checkpoint(dir, mesh.world(), Placement::of(mesh), params, optimizer, expected_config);
}

}  // namespace tessera::checkpoint
