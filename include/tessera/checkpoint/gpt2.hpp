#pragma once
/// @file
/// GPT-2 specifics: the model configuration as a checkpoint records it (Hugging Face's
/// config.json names), and the evaluation-mode loader of plain safetensors GPT-2 files with
/// Hugging Face names and shapes, such as the "gpt2" model's model.safetensors.

#include <nlohmann/json.hpp>

#include <concepts>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/checkpoint/detail/assemble.hpp"
#include "tessera/checkpoint/detail/json_input.hpp"
#include "tessera/checkpoint/safetensors_file.hpp"
#include "tessera/checkpoint/tensor_shard.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/models/gpt.hpp"

namespace tessera::checkpoint {

/// The configuration of a GPT-2 model as checkpoints record and compare it, with Hugging
/// Face's config.json names: {"model_type": "gpt2", "vocab_size", "n_positions", "n_layer",
/// "n_head", "n_embd"}.
inline nlohmann::json gpt2_config_json(const GPTConfig& c) {
  return {{"model_type", "gpt2"}, {"vocab_size", c.vocab_size}, {"n_positions", c.n_positions},
          {"n_layer", c.n_layer}, {"n_head", c.n_head},           {"n_embd", c.d_model}};
}

/// The tessera name of a Hugging Face GPT-2 tensor name: without a leading "transformer."
/// (GPT2LMHeadModel's files) and otherwise unchanged ("h.0.attn.c_attn.weight").
inline std::string gpt2_canonical_name(std::string_view hf_name) {
  constexpr std::string_view prefix = "transformer.";
  if (hf_name.substr(0, prefix.size()) == prefix) hf_name.remove_prefix(prefix.size());
  return std::string(hf_name);
}

/// Whether a (canonical) Hugging Face GPT-2 tensor is a buffer rather than a parameter: the
/// causal mask "h.N.attn.bias" and "h.N.attn.masked_bias" of older files.
inline bool gpt2_is_buffer(std::string_view name) {
  auto ends_with = [&](std::string_view s) {
    return name.size() >= s.size() && name.substr(name.size() - s.size()) == s;
  };
  return name.substr(0, 2) == "h." && (ends_with(".attn.bias") || ends_with(".attn.masked_bias"));
}

/// Options of load_gpt2_safetensors.
struct Gpt2LoadOptions {
  /// Accept tensors of the file that no given parameter takes (a pipeline stage loading its
  /// blocks only). Otherwise they are an error: the file holds another configuration.
  bool allow_unused = false;
};

/// Loads a GPT-2 checkpoint in plain safetensors form with Hugging Face names and shapes into
/// `params` (tessera's GPT parameters, or this rank's tp shards of them cut by their layouts
/// at tp coordinate `tp_rank` of `tp_size`), converting F16, BF16, F32 or F64 to T: the
/// evaluation mode's loader. `path` is a .safetensors file, or a directory holding
/// model.safetensors or a sharded model.safetensors.index.json ("weight_map").
///
/// Hugging Face's files store Conv1D weights [in, out], as nn::Linear does, so no transpose
/// is needed. Names may carry a "transformer." prefix; the causal-mask buffers h.N.attn.bias
/// and h.N.attn.masked_bias are skipped; "lm_head.weight", present in some files, is checked
/// to equal "wte.weight" (tessera ties them) and skipped. Not collective.
///
/// Everything is checked before any parameter changes. Throws tessera::Error naming the
/// tensor when a parameter is not in the file, its shape differs (both shapes named), the
/// file is truncated or corrupted (CRC-32, when the file has tessera's), an lm_head.weight
/// differs from wte.weight, or (without allow_unused) the file holds a tensor no parameter
/// takes, e.g. "h.12.ln_1.weight" of a deeper model.
template <std::floating_point T>
void load_gpt2_safetensors(const std::filesystem::path& path, const ParameterList<T>& params, int tp_rank = 0,
                           int tp_size = 1, const Gpt2LoadOptions& options = {}) {
  namespace fs = std::filesystem;
  std::vector<fs::path> paths;
  if (fs::is_directory(path)) {
    const fs::path index = path / "model.safetensors.index.json";
    if (fs::exists(index)) {
      std::ifstream in(index);
      std::stringstream ss;
      ss << in.rdbuf();
      const std::string what = tessera::detail::str("load_gpt2_safetensors: ", index);
      const auto j = detail::parse_json<nlohmann::json>(ss.str(), what);
      TESSERA_EXPECTS(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), what,
                      " has no weight_map object");
      std::set<std::string> files;
      for (auto f = j["weight_map"].begin(); f != j["weight_map"].end(); ++f) {
        const std::string file = detail::string_of(*f, what + ": the file of tensor '" + f.key() + "'");
        // Hugging Face's shards lie beside the index: a name with a separator would read elsewhere.
        TESSERA_EXPECTS(!file.empty() && file != "." && file != ".." && file.find('/') == std::string::npos, what,
                        ": the file of tensor '", f.key(), "' is \"", file, "\", not a file name beside the index");
        files.insert(file);
      }
      for (const std::string& f : files) paths.push_back(path / f);
    } else {
      paths.push_back(path / "model.safetensors");
    }
  } else {
    paths.push_back(path);
  }
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  struct Found {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  std::map<std::string, Found> by_name;
  for (const fs::path& p : paths) {
    files.push_back(std::make_unique<SafetensorsFile>(p));
    for (const TensorInfo& t : files.back()->tensors()) {
      const std::string name = gpt2_canonical_name(t.name);
      TESSERA_EXPECTS(by_name.emplace(name, Found{files.back().get(), &t}).second, "load_gpt2_safetensors: tensor '",
                      name, "' appears twice (again in ", p, ")");
    }
  }
  const std::string where = tessera::detail::str("load_gpt2_safetensors(", path.string(), ")");
  std::set<std::string> used;
  std::vector<std::pair<detail::LoadPlan, Tensor<T>>> plans;
  for (const Parameter<T>& p : params) {
    const auto it = by_name.find(p.name);
    TESSERA_EXPECTS(it != by_name.end(), where, ": tensor '", p.name, "' is not in the file (", by_name.size(),
                    " tensors)");
    const TensorInfo& info = *it->second.info;
    detail::LoadPlan plan;
    plan.name = p.name;
    plan.where = where;
    try {
      plan.target = geometry_of(TensorShard<T>{p.name, p.value, p.layout, std::nullopt}, tp_rank, tp_size);
    } catch (const Error& e) {
      throw Error(tessera::detail::str(where, ": ", e.what()));
    }
    TESSERA_EXPECTS(info.shape == plan.target.global_shape, where, ": tensor '", p.name, "' has shape ",
                    shape_str(info.shape), " in the file but ", shape_str(plan.target.global_shape),
                    " in this model");
    TESSERA_EXPECTS(is_floating(info.dtype), where, ": tensor '", p.name, "' holds ", name_of(info.dtype),
                    ", which does not load into floating-point values");
    try {
      it->second.file->verify(info);
    } catch (const Error& e) {
      throw Error(tessera::detail::str(where, ": ", e.what()));
    }
    plan.sources.push_back({it->second.file, &info, ShardGeometry{info.shape, -1, {}, std::nullopt}});
    detail::check_coverage(plan);
    used.insert(p.name);
    plans.emplace_back(std::move(plan), p.value);
  }
  if (const auto lm = by_name.find("lm_head.weight"); lm != by_name.end()) {
    const auto wte = by_name.find("wte.weight");
    TESSERA_EXPECTS(wte != by_name.end(), where, ": tensor 'lm_head.weight' is in the file but 'wte.weight' is not");
    const TensorInfo &a = *lm->second.info, &b = *wte->second.info;
    const auto ba = lm->second.file->bytes(a), bb = wte->second.file->bytes(b);
    TESSERA_EXPECTS(a.shape == b.shape && a.dtype == b.dtype && std::memcmp(ba.data(), bb.data(), ba.size()) == 0,
                    where, ": tensor 'lm_head.weight' ", shape_str(a.shape), " differs from 'wte.weight' ",
                    shape_str(b.shape), "; tessera's GPT ties the LM head to the token embedding");
    used.insert("lm_head.weight");
  }
  if (!options.allow_unused) {
    for (const auto& [name, found] : by_name) {
      (void)found;
      TESSERA_EXPECTS(used.count(name) != 0 || gpt2_is_buffer(name), where, ": tensor '", name,
                      "' of the file is no parameter of this model: the file holds another model configuration "
                      "(or pass allow_unused to load part of it)");
    }
  }
  for (const auto& [plan, value] : plans) detail::execute(plan, value);
}

}  // namespace tessera::checkpoint
