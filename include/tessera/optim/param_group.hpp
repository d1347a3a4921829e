#pragma once
/// @file
/// Parameter groups: subsets of a model's parameters, each with its own optimizer options
/// (torch.optim's param_groups), and the split every GPT recipe uses: no weight decay on
/// biases and normalization weights.

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"

namespace tessera::optim {

/// Parameters that share one set of optimizer options (e.g. AdamWOptions).
template <class T, class Options>
struct ParamGroup {
  ParameterList<T> params;  ///< the group's parameters (handles: the parameters must outlive the optimizer)
  Options options{};        ///< their options
};

/// A list of parameter groups (what optimizers and ZeroOptimizer take).
template <class T, class Options>
using ParamGroupsOf = std::vector<ParamGroup<T, Options>>;

/// `params` split in two groups, as nanoGPT, Megatron-LM and torchtitan configure AdamW:
/// parameters of two or more dimensions (weight matrices, embeddings) with `options`, and
/// those of fewer (biases, LayerNorm/RMSNorm weights) with the same options but
/// weight_decay = 0. A group with no parameter is left out. Local.
template <class T, class Options>
std::vector<ParamGroup<T, Options>> weight_decay_groups(const ParameterList<T>& params, const Options& options) {
  ParamGroup<T, Options> decay{{}, options}, no_decay{{}, options};
  no_decay.options.weight_decay = 0;
  for (Parameter<T>& p : params) (p.value.rank() >= 2 ? decay : no_decay).params.push_back(p);
  std::vector<ParamGroup<T, Options>> groups;
  if (!decay.params.empty()) groups.push_back(std::move(decay));
  if (!no_decay.params.empty()) groups.push_back(std::move(no_decay));
  return groups;
}

/// One group of all `params` with `options`. Local.
template <class T, class Options>
std::vector<ParamGroup<T, Options>> single_group(ParameterList<T> params, const Options& options) {
  return {ParamGroup<T, Options>{std::move(params), options}};
}

/// The index of the group holding each parameter of `params` (by identity), in order. Throws
/// tessera::Error naming the parameter when one is in no group or in two, and naming the group
/// when a group holds a parameter that is not in `params`. Local.
template <class T, class Options>
std::vector<std::size_t> group_of_each(const ParameterList<T>& params, const std::vector<ParamGroup<T, Options>>& groups,
                                       const char* who) {
  std::vector<std::size_t> out(params.size(), groups.size());
  std::size_t placed = 0;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    for (const Parameter<T>& q : groups[g].params) {
      bool found = false;
      for (std::size_t i = 0; i < params.size(); ++i) {
        if (&params[i] != &q) continue;
        TESSERA_EXPECTS(out[i] == groups.size(), who, ": parameter \"", q.name, "\" is in parameter groups ", out[i],
                        " and ", g);
        out[i] = g;
        found = true;
        ++placed;
      }
      TESSERA_EXPECTS(found, who, ": parameter group ", g, " holds \"", q.name,
                      "\", which is not among the optimizer's ", params.size(), " parameters");
    }
  }
  for (std::size_t i = 0; i < params.size(); ++i)
    TESSERA_EXPECTS(out[i] < groups.size(), who, ": parameter \"", params[i].name, "\" is in none of the ",
                    groups.size(), " parameter groups");
  (void)placed;
  return out;
}

}  // namespace tessera::optim
