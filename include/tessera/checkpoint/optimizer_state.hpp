#pragma once
/// @file
/// OptimizerState: an optimizer's state as named tensors with layouts, plus its step count,
/// the form in which checkpoints save and reshard it for any optimizer; adamw_state builds it
/// for AdamW.

#include <concepts>
#include <cstdint>
#include <string>
#include <vector>

#include "tessera/checkpoint/tensor_shard.hpp"
#include "tessera/core/error.hpp"
#include "tessera/optim/adamw.hpp"

namespace tessera::checkpoint {

/// An optimizer's state as this rank holds it: named tensor shards (e.g.
/// "h.0.attn.c_attn.weight.exp_avg" with the parameter's layout, or ZeRO-1 flat pieces from
/// FlatLayout::shards) and the step count. Loading writes into the tensors' values and sets
/// `step`; give it back to the optimizer (AdamW::set_steps).
template <std::floating_point T>
struct OptimizerState {
  std::vector<TensorShard<T>> tensors;  ///< the state tensors (handles into the optimizer)
  std::int64_t step = 0;                ///< steps taken (AdamW's bias-correction t)
};

/// The state of `opt` (PyTorch's names): for its parameter i, "<name>.exp_avg" and
/// "<name>.exp_avg_sq" viewing AdamW's moments, with the parameter's layout; step =
/// opt.steps(). When the optimizer runs on pieces of parameters (ZeRO-1), `described[i]` says
/// what its parameter i is as the checkpoint sees it (name, layout, flat range: see
/// FlatLayout::shards); its value is ignored. Throws tessera::Error when `described` is
/// neither empty nor one entry per parameter.
template <std::floating_point T>
OptimizerState<T> adamw_state(const optim::AdamW<T>& opt, const std::vector<TensorShard<T>>& described = {}) {
  const ParameterList<T>& ps = opt.parameters();
  TESSERA_EXPECTS(described.empty() || described.size() == ps.size(), "adamw_state: ", described.size(),
                  " descriptions for ", ps.size(), " parameters");
  OptimizerState<T> s;
  s.step = opt.steps();
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const std::string name = described.empty() ? ps[i].name : described[i].name;
    const ParamLayout layout = described.empty() ? ps[i].layout : described[i].layout;
    const std::optional<FlatRange> flat = described.empty() ? std::nullopt : described[i].flat;
    s.tensors.push_back({name + ".exp_avg", opt.exp_avg(i), layout, flat});
    s.tensors.push_back({name + ".exp_avg_sq", opt.exp_avg_sq(i), layout, flat});
  }
  return s;
}

}  // namespace tessera::checkpoint
