#pragma once
/// @file
/// Sampling the next token from logits with temperature and top-k (GPT-2's generation).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <vector>

#include "tessera/core/error.hpp"

namespace tessera::nn {

/// Options of sample_next / generate.
struct SamplingOptions {
  double temperature = 1.0;  ///< logits are divided by it; <= 0 means greedy (argmax)
  int top_k = 0;             ///< keep the k largest logits (0: all)
};

/// Draws a token id from softmax(logits / temperature) restricted to the top_k largest logits
/// (Radford et al. 2019 sample.py; Fan et al. 2018 for top-k). logits: (V). Throws Error if
/// logits is empty or top_k is negative.
template <class T, class Rng>
std::int32_t sample_next(std::span<const T> logits, const SamplingOptions& opt, Rng& rng) {
  TESSERA_EXPECTS(!logits.empty(), "sample_next: empty logits");
  TESSERA_EXPECTS(opt.top_k >= 0, "sample_next: top_k must be >= 0, got ", opt.top_k);
  const auto V = static_cast<std::int32_t>(logits.size());
  if (opt.temperature <= 0)
    return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<std::int32_t> ids(static_cast<std::size_t>(V));
  for (std::int32_t i = 0; i < V; ++i) ids[static_cast<std::size_t>(i)] = i;
  std::int32_t keep = (opt.top_k > 0 && opt.top_k < V) ? opt.top_k : V;
  std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), [&](std::int32_t a, std::int32_t b) {
    return logits[static_cast<std::size_t>(a)] > logits[static_cast<std::size_t>(b)];
  });
  const double top = static_cast<double>(logits[static_cast<std::size_t>(ids[0])]);
  std::vector<double> w(static_cast<std::size_t>(keep));
  for (std::int32_t i = 0; i < keep; ++i)
    w[static_cast<std::size_t>(i)] =
        std::exp((static_cast<double>(logits[static_cast<std::size_t>(ids[static_cast<std::size_t>(i)])]) - top) /
                 opt.temperature);
  std::discrete_distribution<std::int32_t> pick(w.begin(), w.end());
  return ids[static_cast<std::size_t>(pick(rng))];
}

/// Autoregressive generation: appends `n_new` tokens to `tokens`, each drawn by sample_next
/// from `last_logits(context)`, where context is the last `max_context` tokens and
/// last_logits returns the logits (V) of the context's last position. `seed` makes it
/// deterministic (the same on every rank, so tensor-parallel ranks agree on each token).
template <class T>
std::vector<std::int32_t> generate(std::vector<std::int32_t> tokens, int n_new, std::int64_t max_context,
                                   const std::function<std::vector<T>(const std::vector<std::int32_t>&)>& last_logits,
                                   const SamplingOptions& opt, std::uint64_t seed) {
  TESSERA_EXPECTS(!tokens.empty(), "generate: the prompt must hold at least one token");
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n_new; ++i) {
    const auto n = static_cast<std::int64_t>(tokens.size());
    std::vector<std::int32_t> ctx(tokens.begin() + std::max<std::int64_t>(0, n - max_context), tokens.end());
    const std::vector<T> logits = last_logits(ctx);
    tokens.push_back(sample_next<T>(std::span<const T>(logits), opt, rng));
  }
  return tokens;
}

}  // namespace tessera::nn
