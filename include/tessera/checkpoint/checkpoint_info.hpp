#pragma once
/// @file
/// CheckpointMeta (what the caller saves besides tensors), CheckpointInfo (what a loaded
/// checkpoint's index says) and the names of a sharded checkpoint's files.

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "tessera/mesh/mesh.hpp"

namespace tessera::checkpoint {

/// The value of "format" in a checkpoint's index.json.
inline constexpr std::string_view index_format = "tessera-checkpoint";
/// The version of the checkpoint format written; loading accepts this version only.
inline constexpr int format_version = 1;
/// The index file of a checkpoint directory. A directory without it is no checkpoint.
inline constexpr std::string_view index_file_name = "index.json";

/// "model-rank00003.safetensors": the model tensors world rank `rank` saved.
inline std::string model_file_name(int rank) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "model-rank%05d.safetensors", rank);
  return buf;
}
/// "optim-rank00003.safetensors": the optimizer state world rank `rank` saved.
inline std::string optim_file_name(int rank) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "optim-rank%05d.safetensors", rank);
  return buf;
}

/// What a save records besides tensors. Set with designated initializers:
/// `CheckpointMeta{.config = gpt2_config_json(cfg), .step = 100}`.
struct CheckpointMeta {
  /// The model configuration as a JSON object (for GPT-2: gpt2_config_json). Loading compares
  /// it with the loading model's and names the first field that differs.
  nlohmann::json config = nlohmann::json::object();
  std::int64_t step = 0;                             ///< training step at the save
  nlohmann::json extra = nlohmann::json::object();   ///< anything else (schedule, data position)
};

/// What a checkpoint's index records (returned by loading).
struct CheckpointInfo {
  int version = 0;                                  ///< format version
  std::string id;                                   ///< unique id of this save
  std::int64_t step = 0;                            ///< CheckpointMeta::step
  nlohmann::json config = nlohmann::json::object(); ///< CheckpointMeta::config
  nlohmann::json extra = nlohmann::json::object();  ///< CheckpointMeta::extra
  MeshShape layout{};                               ///< (dp, pp, tp) of the saving run
  bool has_optimizer = false;                       ///< whether optimizer state was saved
  std::int64_t optimizer_step = 0;                  ///< the optimizer's step count, if saved
};

}  // namespace tessera::checkpoint
