#pragma once
// --eval-model: the mean next-token cross-entropy of a Hugging Face GPT-2 safetensors file over
// a file of token ids, at any layout; and the validation loss during training.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "gpt/args.hpp"
#include "tessera/checkpoint/checkpoint.hpp"
#include "tessera/data/text_dataset.hpp"
#include "tessera/models/hybrid_gpt.hpp"

namespace train_gpt {

// Mean next-token loss over `a.val_batches` validation batches, each dp rank its rows; the same
// value on every rank (a control value: CASES C10).
inline double validation_loss(HybridGPT<float>& model, const data::TextDataset& ds, const Args& a) {
  Mesh& mesh = model.mesh();
  const int rows = a.batch / a.dp, r0 = mesh.coord().dp * rows;
  double sum = 0;
  for (int i = 0; i < a.val_batches; ++i) {
    const data::Batch b = ds.batch(data::Split::val, a.seed, i, a.batch, r0, r0 + rows);
    sum += model.evaluate(b.inputs, b.targets);
  }
  return sum / a.val_batches;
}

// Token ids (whitespace-separated integers) from a text file.
inline std::vector<std::int32_t> read_token_ids(const std::string& path) {
  TESSERA_EXPECTS(std::filesystem::is_regular_file(path), "train_gpt: the token file ", path, " is not a regular file");
  std::ifstream in(path);
  TESSERA_EXPECTS(in.good(), "train_gpt: cannot open the token file ", path);
  std::vector<std::int32_t> ids;
  long long v;
  while (in >> v) {
    TESSERA_EXPECTS(v >= 0 && v <= std::numeric_limits<std::int32_t>::max(), "train_gpt: token id ", v, " at position ",
                    ids.size(), " of ", path, " is not a token id (negative or past int32)");
    ids.push_back(static_cast<std::int32_t>(v));
  }
  TESSERA_EXPECTS(in.eof(), "train_gpt: ", path, " holds something other than integers after ", ids.size(), " ids");
  TESSERA_EXPECTS(ids.size() >= 2, "train_gpt: ", path, " holds ", ids.size(), " token ids; at least 2 are needed");
  return ids;
}

// The configuration of a Hugging Face GPT-2 safetensors file: vocab and width from wte, context
// from wpe, depth from the h.N tensors; n_head from the file's "tessera.config" metadata (a
// consolidated tessera checkpoint), else from --heads, which must then be given (`heads` 0: not
// given). A --heads that contradicts the file is an error.
inline GPTConfig config_of_file(const std::string& path, int heads) {
  const checkpoint::SafetensorsFile f(path);
  int stored = 0;
  if (auto it = f.metadata().find("tessera.config"); it != f.metadata().end()) {
    const nlohmann::json c = nlohmann::json::parse(it->second, nullptr, false);
    if (c.is_object() && c.contains("n_head") && c["n_head"].is_number_integer()) stored = c["n_head"].get<int>();
  }
  TESSERA_EXPECTS(stored > 0 || heads > 0, "train_gpt: ", path, " does not record its number of heads: pass --heads "
                  "(12 for GPT-2 small)");
  TESSERA_EXPECTS(stored == 0 || heads == 0 || heads == stored, "train_gpt: --heads ", heads, " contradicts the ",
                  stored, " heads recorded in ", path);
  heads = stored > 0 ? stored : heads;
  const auto* wte = f.find("wte.weight") ? f.find("wte.weight") : f.find("transformer.wte.weight");
  const auto* wpe = f.find("wpe.weight") ? f.find("wpe.weight") : f.find("transformer.wpe.weight");
  TESSERA_EXPECTS(wte && wpe, "train_gpt: ", path, " has no wte.weight / wpe.weight: not a GPT-2 checkpoint");
  std::int64_t layers = 0;
  while (f.find("h." + std::to_string(layers) + ".ln_1.weight") ||
         f.find("transformer.h." + std::to_string(layers) + ".ln_1.weight"))
    ++layers;
  return {.vocab_size = wte->shape[0], .n_positions = wpe->shape[0], .n_layer = layers, .n_head = heads,
          .d_model = wte->shape[1]};
}

// Mean next-token cross-entropy of a GPT-2 safetensors file over a token file, windows of the
// model's context, at this layout.
inline void eval_rank(Comm& world, const Args& a) {
  const GPTConfig cfg = config_of_file(a.eval_model, a.heads_given ? a.heads : 0);
  TESSERA_EXPECTS(cfg.d_model % cfg.n_head == 0, "train_gpt: the file's width d_model ", cfg.d_model,
                  " is not divisible by --heads ", cfg.n_head, " (GPT-2 small has 12)");
  TESSERA_EXPECTS(cfg.n_head % a.tp == 0, "train_gpt: tp ", a.tp, " does not divide the ", cfg.n_head, " heads");
  Mesh mesh(world, MeshShape{.dp = a.dp, .pp = a.pp, .tp = a.tp});
  HybridGPT<float> model(mesh, cfg, a.seed, a.hybrid());
  checkpoint::load_gpt2_safetensors(a.eval_model, model.parameters(), mesh.coord().tp, a.tp, {.allow_unused = true});
  const std::vector<std::int32_t> ids = read_token_ids(a.eval_tokens);
  for (std::int32_t t : ids)
    TESSERA_EXPECTS(t >= 0 && t < cfg.vocab_size, "train_gpt: token id ", t, " in ", a.eval_tokens,
                    " is outside the vocabulary [0, ", cfg.vocab_size, ")");
  const std::int64_t T = std::min<std::int64_t>(cfg.n_positions, static_cast<std::int64_t>(ids.size()) - 1);
  double sum = 0, count = 0;
  for (std::size_t start = 0; start + 1 < ids.size(); start += static_cast<std::size_t>(T)) {
    const std::int64_t n = std::min<std::int64_t>(T, static_cast<std::int64_t>(ids.size() - start) - 1);
    Tensor<std::int32_t> x(Shape{1, n}), y(Shape{1, n});
    for (std::int64_t t = 0; t < n; ++t) {
      x.data()[t] = ids[start + static_cast<std::size_t>(t)];
      y.data()[t] = ids[start + static_cast<std::size_t>(t) + 1];
    }
    // dp replicas evaluate the same windows here (each would take its own share of a corpus).
    sum += model.evaluate(x, y) * static_cast<double>(n);
    count += static_cast<double>(n);
  }
  if (world.rank() == 0)
    std::printf("eval %s: %d layers, d_model %lld, %lld heads, vocab %lld; %.0f tokens: mean cross-entropy %.4f "
                "(perplexity %.2f) at dp=%d pp=%d tp=%d\n",
                a.eval_model.c_str(), static_cast<int>(cfg.n_layer), static_cast<long long>(cfg.d_model),
                static_cast<long long>(cfg.n_head), static_cast<long long>(cfg.vocab_size), count, sum / count,
                std::exp(sum / count), a.dp, a.pp, a.tp);
}

}  // namespace train_gpt
