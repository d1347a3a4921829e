#pragma once
/// @file
/// Layouts of an activation on the tp axis as types (Replicate, Shard<dim>, Partial) and
/// Activation, a tensor tagged with its layout, so that the compiler checks which
/// collectives tensor parallelism needs (DTensor placements; spmd_types' R / V / P).

#include <concepts>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "tessera/core/tensor.hpp"

namespace tessera {

/// Every tp rank holds the same full tensor.
struct Replicate {};

/// Each tp rank holds an equal slice of the full tensor along dim `Dim` (negative counts from
/// the back). `Shard<-1>` is the tensor-parallel region: hidden units, heads or vocabulary
/// entries split over the ranks. `Shard<1>` is the sequence-parallel region: (B, T, d)
/// activations split along T.
template <int Dim>
struct Shard {
  static constexpr int dim = Dim;  ///< the dim that is split
};

/// A pending sum: every tp rank holds a full-shape tensor and the activation is their sum
/// (the output of a row-parallel layer before its all-reduce). Only a reduction may consume it.
struct Partial {};

/// The layout of activations inside the tensor-parallel region: split along the last dim.
using TensorShard = Shard<-1>;
/// The layout of (B, T, d) activations under sequence parallelism: split along T.
using SequenceShard = Shard<1>;

namespace detail {
template <class L>
struct is_shard : std::false_type {};
template <int D>
struct is_shard<Shard<D>> : std::true_type {};
}  // namespace detail

/// Replicate, Shard<dim> or Partial.
template <class L>
concept Layout = std::same_as<L, Replicate> || std::same_as<L, Partial> || detail::is_shard<L>::value;

/// A value (a Tensor) tagged with its layout on the tp axis. Tensor-parallel layers take and
/// return Activations, so that feeding a layer the wrong layout is a compile error and the
/// collective that converts one layout into another is chosen from the types.
///
/// In `backward`, a gradient travels in the Activation type of the activation it belongs to:
/// the gradient of a Replicate or Shard activation has that layout; the gradient of a Partial
/// activation is replicated (a pending sum's gradient is the same on every rank).
template <class V, Layout L>
struct Activation {
  using Value = V;       ///< the tensor type
  using layout = L;      ///< the layout on the tp axis
  V value;               ///< this rank's tensor: full (Replicate), its slice (Shard)
};

/// A pending sum (see Partial), with the bias that is added once, after the reduction
/// (Megatron-LM's RowParallelLinear adds its bias after the all-reduce, so it is not counted tp
/// times). An empty `bias` means none; it broadcasts over the rows of `value`.
template <class V>
struct Activation<V, Partial> {
  using Value = V;        ///< the tensor type
  using layout = Partial; ///< the layout on the tp axis
  V value;                ///< this rank's addend, full shape
  V bias;                 ///< added once after the reduction; empty for none
};

/// `x` tagged with layout `L`, e.g. `with_layout<Replicate>(x)`.
template <Layout L, class V>
Activation<std::remove_cvref_t<V>, L> with_layout(V&& x) {
  return {std::forward<V>(x)};
}

/// Where an element-wise layer runs, for layers whose result depends on it (dropout).
struct ShardInfo {
  /// The three kinds of region of a tensor-parallel model.
  enum class Region {
    replicated,         ///< a Replicate activation: same values, same random stream on every tp rank
    tensor_parallel,    ///< a Shard<-1> activation: each rank holds other units (own random stream)
    sequence_parallel,  ///< a Shard<1> activation of (B, T, d): each rank holds T / tp positions
  };
  Region region = Region::replicated;  ///< the kind of region
  int rank = 0;                        ///< this rank on the tp axis
  int size = 1;                        ///< ranks on the tp axis
};

/// The region of an activation of layout `L`: Replicate the replicated region, Shard<1> the
/// sequence-parallel one, any other Shard the tensor-parallel one (Partial has none: only a
/// reduction consumes it).
template <Layout L>
  requires(!std::same_as<L, Partial>)
constexpr ShardInfo::Region region_of() noexcept {
  if constexpr (std::same_as<L, Replicate>) return ShardInfo::Region::replicated;
  else if constexpr (L::dim == 1) return ShardInfo::Region::sequence_parallel;
  else return ShardInfo::Region::tensor_parallel;
}

/// The name of a layout, for messages: "Replicate", "Shard<-1>", "Partial".
template <Layout L>
constexpr const char* layout_name() noexcept {
  if constexpr (std::same_as<L, Replicate>) return "Replicate";
  else if constexpr (std::same_as<L, Partial>) return "Partial";
  else if constexpr (L::dim == -1) return "Shard<-1>";
  else if constexpr (L::dim == 1) return "Shard<1>";
  else return "Shard<dim>";
}

}  // namespace tessera
