// consolidate_checkpoint: turns a sharded tessera checkpoint (a directory with index.json and
// one safetensors file per rank, saved at any dp x tp x pp layout) into one plain safetensors
// file with the full model tensors under their Hugging Face GPT-2 names, which Python's
// `safetensors`, Hugging Face's transformers or another tessera run load.
//
//   ./build/examples/consolidate_checkpoint ckpt/step1000 gpt2.safetensors
//   ./build/examples/consolidate_checkpoint ckpt/step1000 out/model.safetensors
//       --dtype F32 --prefix transformer. --config-json out/config.json   (one line)
//
// Only the model is written (not the optimizer state). The run's configuration and step are
// kept in the file's metadata ("tessera.config", "tessera.step").
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "tessera/checkpoint/checkpoint.hpp"

int main(int argc, char** argv) {
  CLI::App app{"Consolidate a sharded tessera checkpoint into one safetensors file"};
  std::string dir, out, dtype = "keep", prefix, config_json;
  app.add_option("checkpoint", dir, "sharded checkpoint directory (holds index.json)")->required();
  app.add_option("output", out, "the safetensors file to write")->required();
  app.add_option("--dtype", dtype, "stored dtype: F32, F64, or keep (the saved one)")
      ->check(CLI::IsMember({"F32", "F64", "keep"}));
  app.add_option("--prefix", prefix, "prepended to every name, e.g. \"transformer.\"");
  app.add_option("--config-json", config_json, "also write the saved model configuration (Hugging Face config.json)");
  CLI11_PARSE(app, argc, argv);

  try {
    if (!config_json.empty()) {
      // The configuration file must not replace the checkpoint's files or the output.
      namespace fs = std::filesystem;
      const fs::path d = fs::weakly_canonical(fs::absolute(dir)), c = fs::weakly_canonical(fs::absolute(config_json));
      TESSERA_EXPECTS(std::mismatch(d.begin(), d.end(), c.begin(), c.end()).first != d.end(), "--config-json ",
                      config_json, " lies inside the checkpoint directory ", dir, " it reads: write it elsewhere");
      TESSERA_EXPECTS(c != fs::weakly_canonical(fs::absolute(out)), "--config-json ", config_json,
                      " is the output file ", out, ": give each its own path");
      TESSERA_EXPECTS(!fs::is_directory(c), "--config-json ", config_json, " is a directory, not a file");
    }
    tessera::checkpoint::ConsolidateOptions options{.dtype = std::nullopt, .name_prefix = prefix};
    if (dtype != "keep") options.dtype = tessera::checkpoint::parse_safetensors_dtype(dtype);
    const tessera::checkpoint::CheckpointReader reader(dir);
    const auto result = tessera::checkpoint::consolidate_checkpoint(dir, out, options);
    std::printf("%s: %zu tensors, %lld elements, %llu bytes (step %lld, saved at dp=%d pp=%d tp=%d)\n", out.c_str(),
                result.tensors, static_cast<long long>(result.numel), static_cast<unsigned long long>(result.bytes),
                static_cast<long long>(reader.info().step), reader.info().layout.dp, reader.info().layout.pp,
                reader.info().layout.tp);
    if (!config_json.empty()) {
      nlohmann::json config = reader.info().config;
      if (config.value("model_type", "") == "gpt2") config["architectures"] = {"GPT2LMHeadModel"};
      std::ofstream f(config_json);
      f << config.dump(2) << '\n';
      f.close();
      TESSERA_EXPECTS(f.good(), "cannot write the configuration to ", config_json);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consolidate_checkpoint: %s\n", e.what());
    return 1;
  }
  return 0;
}
