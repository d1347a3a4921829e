#pragma once
/// @file
/// StaticStagePartition: the cut of a model given as a type list of layers (LayerList) into
/// pipeline stages, checked at compile time -- every layer in exactly one stage -- and the
/// factory of each stage as a StageChain of its layers.
///
/// ```cpp
/// using Model = LayerList<Embed, Block, Block, Block, Head>;
/// using Cut = StaticStagePartition<Model, StageLayers<0, 1, 2>, StageLayers<3, 4>>;  // or StageCuts<3>
/// auto stage = Cut::make_stage<float, Tensor<std::int32_t>>(s, [&](auto layer) { ... return Block(...); });
/// ```

#include <array>
#include <concepts>
#include <cstddef>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/core/layer.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/pipeline/pipeline_stage.hpp"
#include "tessera/parallel/pipeline/stage_chain.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"

namespace tessera {

/// A model as a sequence of layer types, in execution order.
template <class... Ls>
struct LayerList {
  /// Number of layers.
  static constexpr int size = static_cast<int>(sizeof...(Ls));
};

/// The layer indices (into a LayerList) that one pipeline stage holds: consecutive, increasing.
template <int... Layers>
struct StageLayers {};

/// Cut points: the first layer index of every stage but the first, strictly increasing, each in
/// [1, number of layers - 1]. StageCuts<3, 5> over 7 layers: stages [0, 3), [3, 5), [5, 7).
template <int... FirstLayers>
struct StageCuts {};

namespace detail {
/// Checks instantiated by StaticStagePartition. Their template arguments name the culprits in
/// the compiler's "in instantiation of" line.
template <int... Layers>
struct missing_layers {};
template <int... Layers>
struct doubled_layers {};

template <class Missing, class Doubled>
struct every_layer_in_exactly_one_stage {
  static constexpr bool value = true;
};
template <int... M, int... D>
struct every_layer_in_exactly_one_stage<missing_layers<M...>, doubled_layers<D...>> {
  static_assert(sizeof...(M) == 0 && sizeof...(D) == 0,
                "tessera: every layer of the LayerList must be in exactly one pipeline stage; "
                "missing_layers<...> names the layers in no StageLayers, doubled_layers<...> those in several.");
  static constexpr bool value = true;
};

template <int Stage, int Entry, int Layer>
struct stage_layer_in_range {
  static_assert(Stage < 0, "tessera: a StageLayers entry is not a layer of the LayerList (or a stage is empty); "
                           "the template arguments are <stage, entry, layer> (layer -1: the stage is empty).");
  static constexpr bool value = true;
};

template <int Stage, int Entry, int Layer, int Expected>
struct stage_layers_consecutive {
  static_assert(Stage < 0, "tessera: each StageLayers must hold consecutive layers in increasing order, continuing "
                           "where the previous stage ends; the template arguments are <stage, entry, layer, expected layer>.");
  static constexpr bool value = true;
};

template <int Entry, int Cut, int NumLayers>
struct stage_cut_valid {
  static_assert(Entry < 0, "tessera: StageCuts must increase strictly and lie in [1, number of layers - 1]; the "
                           "template arguments are <entry, cut point, number of layers>.");
  static constexpr bool value = true;
};

template <class S>
struct stage_values;
template <int... L>
struct stage_values<StageLayers<L...>> {
  static constexpr std::array<int, sizeof...(L)> values{L...};
};

/// Everything but the checks, from the stage boundaries.
template <class List, class Bounds>
class StaticStages;

template <class... Ls, int... B>
class StaticStages<LayerList<Ls...>, std::integer_sequence<int, B...>> {
  static_assert((check_layer<Ls>() && ...));

 public:
  /// Number of layers.
  static constexpr int num_layers = static_cast<int>(sizeof...(Ls));
  /// Number of stages.
  static constexpr int num_stages = static_cast<int>(sizeof...(B)) - 1;
  /// Stage s holds layers [bounds[s], bounds[s + 1]).
  static constexpr std::array<int, sizeof...(B)> bounds{B...};

 private:
  template <int Begin, class Seq>
  struct chain_of;
  template <int Begin, std::size_t... I>
  struct chain_of<Begin, std::index_sequence<I...>> {
    using type = StageChain<std::tuple_element_t<static_cast<std::size_t>(Begin) + I, std::tuple<Ls...>>...>;
  };

 public:
  /// The type of stage S: a StageChain of its layers.
  template <int S>
  using stage_type = typename chain_of<bounds[static_cast<std::size_t>(S)],
                                       std::make_index_sequence<static_cast<std::size_t>(
                                           bounds[static_cast<std::size_t>(S) + 1] - bounds[static_cast<std::size_t>(S)])>>::type;

  /// The same cut as a runtime StagePartition (layer names optional).
  static StagePartition partition(std::vector<std::string> names = {}) {
    std::vector<int> cuts;
    for (int s = 1; s < num_stages; ++s) cuts.push_back(bounds[static_cast<std::size_t>(s)]);
    return StagePartition::from_cuts(num_layers, cuts, std::move(names));
  }

  /// Builds stage `stage` (chosen at run time) as a PipelineStage<T, Input> holding a
  /// StageChain of its layers; `make_layer(std::integral_constant<int, I>{})` must return layer
  /// I (of the I-th type of the LayerList). Only this stage's layers are made. Throws Error if
  /// stage is outside [0, num_stages).
  template <std::floating_point T, class Input = Tensor<T>, class MakeLayer>
  static std::unique_ptr<PipelineStage<T, Input>> make_stage(int stage, MakeLayer&& make_layer) {
    TESSERA_EXPECTS(stage >= 0 && stage < num_stages, "StaticStagePartition::make_stage: stage ", stage,
                    " is outside [0, ", num_stages, ")");
    return dispatch<T, Input>(stage, make_layer, std::make_index_sequence<static_cast<std::size_t>(num_stages)>{});
  }

 private:
  template <std::floating_point T, class Input, class F, std::size_t... S>
  static std::unique_ptr<PipelineStage<T, Input>> dispatch(int stage, F& f, std::index_sequence<S...>) {
    std::unique_ptr<PipelineStage<T, Input>> out;
    ((stage == static_cast<int>(S) ? (void)(out = make_one<static_cast<int>(S), T, Input>(f)) : void()), ...);
    return out;
  }
  template <int S, std::floating_point T, class Input, class F>
  static std::unique_ptr<PipelineStage<T, Input>> make_one(F& f) {
    constexpr int begin = bounds[static_cast<std::size_t>(S)], end = bounds[static_cast<std::size_t>(S) + 1];
    return make_chain<S, T, Input>(f, std::make_index_sequence<static_cast<std::size_t>(end - begin)>{});
  }
  template <int S, std::floating_point T, class Input, class F, std::size_t... I>
  static std::unique_ptr<PipelineStage<T, Input>> make_chain(F& f, std::index_sequence<I...>) {
    using Chain = stage_type<S>;
    constexpr int begin = bounds[static_cast<std::size_t>(S)], end = bounds[static_cast<std::size_t>(S) + 1];
    std::string name = begin + 1 == end ? tessera::detail::str("layer ", begin)
                                        : tessera::detail::str("layers ", begin, "-", end - 1);
    return std::make_unique<LayerStage<Chain, T, Input>>(
        Chain(f(std::integral_constant<int, begin + static_cast<int>(I)>{})...), std::move(name));
  }
};

struct StageEntry {
  int stage, entry, layer;
};

template <std::size_t Count, class... Stages>
constexpr std::array<StageEntry, Count> stage_entries() {
  std::array<StageEntry, Count> e{};
  std::size_t k = 0;
  int s = 0;
  auto add = [&](const auto& values) {
    int i = 0;
    for (int l : values) e[k++] = StageEntry{s, i++, l};
    ++s;
  };
  (add(stage_values<Stages>::values), ...);
  return e;
}

template <std::size_t S, std::size_t Count>
constexpr std::array<int, S> stage_sizes(const std::array<StageEntry, Count>& entries) {
  std::array<int, S> z{};
  for (const StageEntry& e : entries) ++z[static_cast<std::size_t>(e.stage)];
  return z;
}

template <std::size_t N, std::size_t S, std::size_t Count>
constexpr StageEntry first_out_of_range(const std::array<StageEntry, Count>& entries, const std::array<int, S>& sizes) {
  for (std::size_t s = 0; s < S; ++s)
    if (sizes[s] == 0) return StageEntry{static_cast<int>(s), 0, -1};
  for (const StageEntry& e : entries)
    if (e.layer < 0 || e.layer >= static_cast<int>(N)) return e;
  return StageEntry{-1, 0, 0};
}

template <std::size_t N, std::size_t Count>
constexpr std::array<int, N> layer_holders(const std::array<StageEntry, Count>& entries) {
  std::array<int, N> c{};
  for (const StageEntry& e : entries)
    if (e.layer >= 0 && e.layer < static_cast<int>(N)) ++c[static_cast<std::size_t>(e.layer)];
  return c;
}

template <std::size_t N>
constexpr int count_holders(const std::array<int, N>& holders, bool doubled) {
  int n = 0;
  for (int c : holders) n += doubled ? c > 1 : c == 0;
  return n;
}

template <std::size_t N>
constexpr int nth_holder(const std::array<int, N>& holders, bool doubled, std::size_t k) {
  for (std::size_t l = 0; l < N; ++l) {
    const int c = holders[l];
    if ((doubled ? c > 1 : c == 0) && k-- == 0) return static_cast<int>(l);
  }
  return -1;
}

template <std::size_t Count>
constexpr std::array<int, 4> first_out_of_order(const std::array<StageEntry, Count>& entries, bool enabled) {
  if (!enabled) return {-1, 0, 0, 0};
  int k = 0;
  for (const StageEntry& e : entries) {
    if (e.layer != k) return {e.stage, e.entry, e.layer, k};
    ++k;
  }
  return {-1, 0, 0, 0};
}

/// The checks of the StageLayers form and the resulting boundaries.
template <int N, class... Stages>
struct StageLayersCheck {
  static constexpr std::size_t S = sizeof...(Stages);
  static constexpr std::size_t num_entries = (std::size_t{0} + ... + stage_values<Stages>::values.size());
  static constexpr std::array<StageEntry, num_entries> entries = stage_entries<num_entries, Stages...>();
  static constexpr std::array<int, S> sizes = stage_sizes<S>(entries);

  // 1. Every entry names a layer, and no stage is empty.
  static constexpr StageEntry out_of_range = first_out_of_range<static_cast<std::size_t>(N), S>(entries, sizes);
  static_assert(stage_layer_in_range<out_of_range.stage, out_of_range.entry, out_of_range.layer>::value);
  static constexpr bool in_range = out_of_range.stage < 0;

  // 2. Every layer in exactly one stage.
  static constexpr std::array<int, static_cast<std::size_t>(N)> holders =
      layer_holders<static_cast<std::size_t>(N)>(entries);
  static constexpr int num_missing = in_range ? count_holders(holders, false) : 0;
  static constexpr int num_doubled = in_range ? count_holders(holders, true) : 0;
  template <std::size_t... I>
  static missing_layers<nth_holder(holders, false, I)...> missing(std::index_sequence<I...>);
  template <std::size_t... I>
  static doubled_layers<nth_holder(holders, true, I)...> doubled(std::index_sequence<I...>);
  static_assert(every_layer_in_exactly_one_stage<
                decltype(missing(std::make_index_sequence<static_cast<std::size_t>(num_missing)>{})),
                decltype(doubled(std::make_index_sequence<static_cast<std::size_t>(num_doubled)>{}))>::value);
  static constexpr bool once = in_range && num_missing == 0 && num_doubled == 0;

  // 3. Consecutive and in order: entry k over all stages is layer k.
  static constexpr std::array<int, 4> out_of_order = first_out_of_order(entries, once);
  static_assert(stage_layers_consecutive<out_of_order[0], out_of_order[1], out_of_order[2], out_of_order[3]>::value);
  static constexpr bool valid = once && out_of_order[0] < 0;

  /// Stage boundaries (one layer per stage, clamped, when a check failed, so that only the
  /// check's error is reported).
  static constexpr std::array<int, S + 1> bounds = [] {
    std::array<int, S + 1> b{};
    for (std::size_t s = 0; s < S; ++s)
      b[s + 1] = valid ? b[s] + sizes[s] : (static_cast<int>(s) + 1 < N ? static_cast<int>(s) + 1 : N);
    b[S] = N;
    return b;
  }();
};

/// The checks of the StageCuts form and the resulting boundaries.
template <int N, int... Cuts>
struct StageCutsCheck {
  static constexpr std::array<int, sizeof...(Cuts) + 1> cuts{Cuts..., N};
  static constexpr std::array<int, 2> first_bad = [] {
    int prev = 0;
    for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
      if (cuts[i] <= prev || cuts[i] >= N) return std::array<int, 2>{static_cast<int>(i), cuts[i]};
      prev = cuts[i];
    }
    return std::array<int, 2>{-1, 0};
  }();
  static_assert(stage_cut_valid<first_bad[0], first_bad[1], N>::value);

  /// Stage boundaries: 0, the cuts, N (one layer per stage, clamped, when the check failed).
  static constexpr std::array<int, sizeof...(Cuts) + 2> bounds = [] {
    std::array<int, sizeof...(Cuts) + 2> b{};
    for (std::size_t i = 0; i + 1 < cuts.size(); ++i)
      b[i + 1] = first_bad[0] < 0 ? cuts[i] : (static_cast<int>(i) + 1 < N ? static_cast<int>(i) + 1 : N);
    b[cuts.size()] = N;
    return b;
  }();
};

template <class Check, class Idx>
struct bounds_seq;
template <class Check, std::size_t... I>
struct bounds_seq<Check, std::index_sequence<I...>> {
  using type = std::integer_sequence<int, Check::bounds[I]...>;
};
template <class Check>
using bounds_seq_t = typename bounds_seq<Check, std::make_index_sequence<Check::bounds.size()>>::type;
}  // namespace detail

/// The cut of the layers of `Layers` (a LayerList) into stages given by `Spec...`: either one
/// StageLayers<...> per stage, or a single StageCuts<...>. Checked at compile time: every
/// layer in exactly one stage, consecutive and in order, or for cuts strictly increasing in
/// [1, number of layers - 1]. A violation fails to compile with one static_assert whose
/// instantiation names the culprits, e.g.
/// `every_layer_in_exactly_one_stage<missing_layers<3>, doubled_layers<1>>`.
///
/// Offers `num_layers`, `num_stages`, `bounds`, `stage_type<S>` (a StageChain),
/// `partition()` (the runtime StagePartition) and `make_stage<T, Input>(stage, make_layer)`.
template <class Layers, class... Spec>
class StaticStagePartition;

/// The StageLayers form: one StageLayers<...> per stage.
template <class... Ls, int... First, class... Rest>
class StaticStagePartition<LayerList<Ls...>, StageLayers<First...>, Rest...>
    : public detail::StaticStages<LayerList<Ls...>,
                                  detail::bounds_seq_t<detail::StageLayersCheck<static_cast<int>(sizeof...(Ls)),
                                                                                StageLayers<First...>, Rest...>>> {};

/// The StageCuts form: stages cut before each listed layer.
template <class... Ls, int... Cuts>
class StaticStagePartition<LayerList<Ls...>, StageCuts<Cuts...>>
    : public detail::StaticStages<LayerList<Ls...>,
                                  detail::bounds_seq_t<detail::StageCutsCheck<static_cast<int>(sizeof...(Ls)), Cuts...>>> {};

}  // namespace tessera
