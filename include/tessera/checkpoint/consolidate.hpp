#pragma once
/// @file
/// consolidate_checkpoint: turns a sharded checkpoint into one plain safetensors file of the
/// full model tensors, with their global names and shapes (Hugging Face GPT-2 names for
/// tessera's GPT), which other tools load.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/checkpoint/checkpoint_reader.hpp"
#include "tessera/checkpoint/safetensors_dtype.hpp"
#include "tessera/checkpoint/safetensors_writer.hpp"
#include "tessera/core/error.hpp"

namespace tessera::checkpoint {

/// Options of consolidate_checkpoint.
struct ConsolidateOptions {
  /// Stored dtype of the output: F32 or F64; unset keeps each tensor's saved dtype.
  std::optional<SafetensorsDType> dtype;
  /// Prepended to every name, e.g. "transformer." for tools that expect GPT2LMHeadModel names.
  std::string name_prefix;
};

/// What consolidate_checkpoint wrote.
struct ConsolidateResult {
  std::size_t tensors = 0;   ///< number of tensors
  std::uint64_t bytes = 0;   ///< file size
  std::int64_t numel = 0;    ///< elements over all tensors
};

/// For a checkpoint whose configuration says "model_type": "gpt2" (gpt2_config_json):
/// throws tessera::Error naming the field when vocab_size, n_positions, n_layer, n_head or
/// n_embd is not a positive integer, n_head does not divide n_embd, or the configuration
/// disagrees with the saved tensors (wte.weight (vocab_size, n_embd), wpe.weight
/// (n_positions, n_embd), blocks h.0 to h.<n_layer - 1>), so that a consolidated file and its
/// config.json describe the same model. Other configurations are not checked. Not collective.
inline void check_gpt2_config(const CheckpointReader& reader) {
  const nlohmann::json& c = reader.info().config;
  if (!c.is_object() || c.value("model_type", "") != "gpt2") return;
  const std::string where = tessera::detail::str("checkpoint ", reader.dir(), ": its GPT-2 configuration");
  const auto field = [&](const char* key) {
    TESSERA_EXPECTS(c.contains(key) && c.at(key).is_number_integer() && c.at(key).get<std::int64_t>() >= 1, where, "'s ",
                    key, " is ", c.contains(key) ? c.at(key).dump() : std::string("missing"), ", not a positive integer");
    return c.at(key).get<std::int64_t>();
  };
  const std::int64_t vocab = field("vocab_size"), positions = field("n_positions"), layers = field("n_layer"),
                     heads = field("n_head"), embd = field("n_embd");
  TESSERA_EXPECTS(embd % heads == 0, where, ": n_head ", heads, " does not divide n_embd ", embd);
  const auto shape = [&](const char* name, std::vector<std::int64_t> want) {
    if (!reader.contains(name)) return;
    const std::vector<std::int64_t> got = reader.global_shape(name);
    TESSERA_EXPECTS(got == want, where, " (vocab_size ", vocab, ", n_positions ", positions, ", n_embd ", embd,
                    ") disagrees with tensor '", name, "' of shape ", shape_str(got), ", not ",
                    shape_str(want));
  };
  shape("wte.weight", {vocab, embd});
  shape("wpe.weight", {positions, embd});
  std::int64_t blocks = 0;  // 1 + the largest N of a saved "h.N." tensor
  for (const std::string& name : reader.tensor_names(TensorKind::model))
    if (name.rfind("h.", 0) == 0) {
      const std::size_t dot = name.find('.', 2);
      try {
        blocks = std::max<std::int64_t>(blocks, 1 + std::stoll(name.substr(2, dot - 2)));
      } catch (const std::exception&) {
      }
    }
  TESSERA_EXPECTS(blocks == layers, where, "'s n_layer ", layers, " disagrees with the saved blocks h.0 to h.", blocks - 1,
                  " (", blocks, ")");
}

/// Writes the model tensors of the sharded checkpoint in `dir` (not its optimizer state) as
/// one safetensors file `out` (atomically), each tensor reassembled at its global shape from
/// the pieces of every rank, in the saving model's parameter order. Metadata: {"format": "pt",
/// "tessera.config": the saved config as JSON, "tessera.step": the step}. One tensor is in
/// memory at a time. Not collective.
///
/// Throws tessera::Error as CheckpointReader (naming the tensor for a missing, truncated or
/// corrupted piece), when a tensor has rank above 4, for an output dtype other than F32 or
/// F64, when `out` lies inside the checkpoint directory (it would replace a piece being read),
/// or when `out` exists and is not a regular file (a directory, a device). A symbolic link
/// `out` is followed: its target is written.
inline ConsolidateResult consolidate_checkpoint(const std::filesystem::path& dir, const std::filesystem::path& out_given,
                                                const ConsolidateOptions& options = {}) {
  namespace fs = std::filesystem;
  const fs::path out = fs::is_symlink(out_given) ? fs::weakly_canonical(out_given) : out_given;
  {
    // (absolute first: weakly_canonical leaves a relative path whose first element does not
    // exist relative, and "out.st" beside a checkpoint "." passed this check)
    const fs::path d = fs::weakly_canonical(fs::absolute(dir)), o = fs::weakly_canonical(fs::absolute(out));
    const auto [mismatch, _] = std::mismatch(d.begin(), d.end(), o.begin(), o.end());
    TESSERA_EXPECTS(mismatch != d.end(), "consolidate_checkpoint: the output ", out_given,
                    " lies inside the checkpoint directory ", dir, " it reads: write it elsewhere");
    TESSERA_EXPECTS(!fs::exists(out) || fs::is_regular_file(out), "consolidate_checkpoint: the output ", out_given,
                    " exists and is not a regular file: refusing to replace it");
  }
  auto reader = std::make_shared<CheckpointReader>(dir);
  reader->check_index_lists_every_tensor();  // a tensor left out of the index would be left out here
  check_gpt2_config(*reader);
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata("tessera.config", reader->info().config.dump());
  w.set_metadata("tessera.step", std::to_string(reader->info().step));
  ConsolidateResult r;
  for (const std::string& name : reader->tensor_names(TensorKind::model)) {
    const std::vector<std::int64_t> g = reader->global_shape(name);
    TESSERA_EXPECTS(g.size() <= static_cast<std::size_t>(max_rank), "consolidate_checkpoint: tensor '", name,
                    "' has rank ", g.size(), " above ", max_rank);
    Index dims{};
    for (std::size_t d = 0; d < g.size(); ++d) dims[d] = g[d];
    const Shape shape = Shape::from(dims, static_cast<int>(g.size()));
    const SafetensorsDType dt = options.dtype.value_or(reader->dtype(name));
    TESSERA_EXPECTS(dt == SafetensorsDType::f32 || dt == SafetensorsDType::f64, "consolidate_checkpoint: tensor '",
                    name, "' would be written as ", name_of(dt), "; only F32 and F64 are written");
    if (dt == SafetensorsDType::f32) {
      w.add_deferred<float>(options.name_prefix + name, shape, [reader, name] { return reader->read_full<float>(name); });
    } else {
      w.add_deferred<double>(options.name_prefix + name, shape, [reader, name] { return reader->read_full<double>(name); });
    }
    ++r.tensors;
    r.numel += shape.numel();
  }
  r.bytes = w.write(out);
  return r;
}

}  // namespace tessera::checkpoint
