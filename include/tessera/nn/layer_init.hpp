#pragma once
/// @file
/// LayerInit: where a layer sits in a model (its parameter-name prefix) and how its parameters
/// start, following GPT-2.

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

namespace tessera::nn {

/// Where a layer sits in a model and how its parameters are initialized, as in GPT-2
/// (Radford et al. 2019; Hugging Face `GPT2PreTrainedModel._init_weights`): weights and
/// embeddings normal(0, std), biases 0, LayerNorm weight 1 and bias 0, and the residual
/// projections (`c_proj.weight`) normal(0, std / sqrt(2 n_layer)).
///
/// Every value is a pure function of (seed, full parameter name, element index) (see
/// tessera::fill_normal), so the same seed gives the same model whatever the sharding.
struct LayerInit {
  /// Name prefix of the layer's parameters: "h.0.attn" gives "h.0.attn.c_attn.weight".
  /// Empty for a standalone layer ("weight", "bias").
  std::string prefix{};
  std::uint64_t seed = 0;  ///< seed of every parameter's random stream
  double std = 0.02;       ///< standard deviation of normal weights and embeddings
  int n_layer = 1;         ///< transformer blocks in the model; scales the c_proj init

  /// The same init for the child layer `name`: prefix "h.0" and name "attn" give "h.0.attn".
  LayerInit child(std::string_view name) const {
    LayerInit c = *this;
    c.prefix = join(name);
    return c;
  }
  /// The same init for a residual projection: std / sqrt(2 n_layer).
  LayerInit residual(std::string_view name) const {
    LayerInit c = child(name);
    c.std = std / std::sqrt(2.0 * n_layer);
    return c;
  }
  /// The full name of this layer's parameter `name`: prefix "h.0.ln_1", "weight" gives
  /// "h.0.ln_1.weight".
  std::string join(std::string_view name) const {
    return prefix.empty() ? std::string(name) : prefix + "." + std::string(name);
  }
};

}  // namespace tessera::nn
