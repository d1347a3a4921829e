#pragma once
// Sampling from the model (any layout): the next-token logits gathered over tp, top-k sampling
// with a temperature; and --generate, which loads a checkpoint saved at any layout and samples.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "gpt/args.hpp"
#include "tessera/checkpoint/hybrid_state.hpp"
#include "tessera/data/text_dataset.hpp"
#include "tessera/models/hybrid_gpt.hpp"
#include "tessera/nn/sampling.hpp"

namespace train_gpt {

// Samples `a.sample_len` bytes after the prompt; every rank runs the same generation.
std::string sample(HybridGPT<float>& model, const Args& a) {
  auto last_logits = [&](const std::vector<std::int32_t>& ctx) {
    Tensor<std::int32_t> x(Shape{1, static_cast<std::int64_t>(ctx.size())});
    std::copy(ctx.begin(), ctx.end(), x.data());
    return model.next_token_logits(x);
  };
  const auto out = nn::generate<float>(data::ByteTokenizer::encode(a.prompt), a.sample_len, a.context, last_logits,
                                       {.temperature = a.temperature, .top_k = a.top_k}, a.seed);
  return data::ByteTokenizer::decode(out);
}

// Writes sampled bytes to stdout whole: a byte 0 (which a byte-level model may sample, and
// which printf's %s would stop at) as the two characters \0, every other byte as it is.
inline void print_sample(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char ch : text) {
    if (ch == '\0')
      out += "\\0";
    else
      out += ch;
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
}

// Loads a checkpoint (any layout) and samples from it at this layout.
inline void generate_rank(Comm& world, const Args& a) {
  Mesh mesh(world, MeshShape{.dp = a.dp, .pp = a.pp, .tp = a.tp});
  HybridGPT<float> model(mesh, a.config(), a.seed, a.hybrid());
  const auto info = checkpoint::load_hybrid_checkpoint(a.resume, model, checkpoint::gpt2_config_json(a.config()));
  const std::string text = sample(model, a);
  if (world.rank() == 0) {
    std::printf("checkpoint %s (step %lld), sampled at dp=%d pp=%d tp=%d:\n", a.resume.c_str(),
                static_cast<long long>(info.step), a.dp, a.pp, a.tp);
    print_sample(text);
    std::printf("\n");
  }
}

}  // namespace train_gpt
