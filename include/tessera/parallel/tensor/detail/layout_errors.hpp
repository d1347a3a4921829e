#pragma once
/// @file
/// The one-sentence compile errors of tensor parallelism: each misuse of a layout has one
/// enumerator and one static_assert sentence, shared by the typed layers (ColumnParallel,
/// RowParallel, the vocab-parallel loss) and the plan checker of TensorParallel.

#include <type_traits>

#include "tessera/parallel/tensor/layouts.hpp"

namespace tessera::detail::tp {

/// A misuse of layouts found at compile time (none when the plan or call is well-formed).
enum class LayoutError {
  none,
  partial_to_nonlinear,
  partial_to_column,
  partial_to_row,
  replicate_to_row,
  sequence_to_row,
  shard_to_column,
  shard_to_replicated,
  heads_need_shard,
  nested_layout,
  reduce_needs_partial,
  gather_needs_shard,
  scatter_needs_replicate,
  cannot_end,
  block_layout,
  gathered_logits,
  column_sequence_mismatch,
  shard_to_scattering_row,
};

template <LayoutError>
inline constexpr bool always_false_error = false;

/// Fails to compile with the sentence of `E` (one static_assert, so one error); true for none.
template <LayoutError E>
consteval bool check_layout_error() {
  using enum LayoutError;
  if constexpr (E == partial_to_nonlinear) {
    static_assert(always_false_error<E>,
                  "tessera: the tensor-parallel plan feeds a pending partial sum (Partial, the output of a "
                  "row-parallel layer before its all-reduce) to a non-linear layer; add tp::reduce() before it "
                  "or end the branch there.");
  } else if constexpr (E == partial_to_column) {
    static_assert(always_false_error<E>,
                  "tessera: a pending partial sum (Partial) is fed to a column-parallel layer, which needs "
                  "the whole input; reduce it first (tp::reduce()).");
  } else if constexpr (E == partial_to_row) {
    static_assert(always_false_error<E>,
                  "tessera: a pending partial sum (Partial) is fed to a row-parallel layer; reduce it first "
                  "(tp::reduce()).");
  } else if constexpr (E == replicate_to_row) {
    static_assert(always_false_error<E>,
                  "tessera: a replicated activation is fed to a row-parallel layer without a scatter; put a "
                  "column-parallel layer before it, or set input_is_parallel = false so that it scatters "
                  "its input first.");
  } else if constexpr (E == sequence_to_row) {
    static_assert(always_false_error<E>,
                  "tessera: a sequence-sharded activation (Shard<1>) is fed to a row-parallel layer; under "
                  "sequence parallelism its input must come from a column-parallel layer (input_is_parallel).");
  } else if constexpr (E == shard_to_column) {
    static_assert(always_false_error<E>,
                  "tessera: an activation split over the tensor-parallel ranks (Shard<-1>) is fed to a "
                  "column-parallel layer, which needs the whole input; add tp::gather() before it or make "
                  "that layer row-parallel.");
  } else if constexpr (E == shard_to_replicated) {
    static_assert(always_false_error<E>,
                  "tessera: the tensor-parallel plan feeds an activation split over its last dim (Shard<-1>) "
                  "to a replicated layer that needs the whole last dim (such as LayerNorm); reduce or gather "
                  "it before that layer.");
  } else if constexpr (E == heads_need_shard) {
    static_assert(always_false_error<E>,
                  "tessera: the tensor-parallel plan gives a per-head layer (tp::heads) an input that is not "
                  "split over heads (Shard<-1>); put a column-parallel layer before it.");
  } else if constexpr (E == nested_layout) {
    static_assert(always_false_error<E>,
                  "tessera: the tensor-parallel plan feeds a nested block (tp::nested) an activation that is "
                  "neither replicated nor sequence-sharded; end the tensor-parallel region before it.");
  } else if constexpr (E == reduce_needs_partial) {
    static_assert(always_false_error<E>,
                  "tessera: tp::reduce() in the tensor-parallel plan follows an activation that is not a "
                  "pending partial sum (Partial); remove it.");
  } else if constexpr (E == gather_needs_shard) {
    static_assert(always_false_error<E>,
                  "tessera: tp::gather() in the tensor-parallel plan follows an activation that is not split "
                  "over its last dim (Shard<-1>); remove it.");
  } else if constexpr (E == scatter_needs_replicate) {
    static_assert(always_false_error<E>,
                  "tessera: tp::scatter() in the tensor-parallel plan follows an activation that is not "
                  "replicated; remove it.");
  } else if constexpr (E == cannot_end) {
    static_assert(always_false_error<E>,
                  "tessera: the tensor-parallel plan ends a block or residual branch with an activation that "
                  "no collective turns back into the block's layout.");
  } else if constexpr (E == block_layout) {
    static_assert(always_false_error<E>,
                  "tessera: a tensor-parallel block's input and output are replicated (Replicate) or, under "
                  "sequence parallelism, split along the sequence (Shard<1>); no other layout.");
  } else if constexpr (E == gathered_logits) {
    static_assert(always_false_error<E>,
                  "tessera: the vocab-parallel cross-entropy needs logits split over the vocabulary "
                  "(Activation<Tensor<T>, Shard<-1>>), not gathered ones; leave gather_output off for the LM "
                  "head, or use nn::CrossEntropy on full logits.");
  } else if constexpr (E == column_sequence_mismatch) {
    static_assert(always_false_error<E>,
                  "tessera: a ColumnParallel layer's sequence_parallel option does not match its input: it "
                  "takes Shard<1> with sequence parallelism and Replicate without.");
  } else if constexpr (E == shard_to_scattering_row) {
    static_assert(always_false_error<E>,
                  "tessera: an activation already split over its last dim (Shard<-1>) is fed to a row-parallel "
                  "layer with input_is_parallel = false, which would split it again; set input_is_parallel.");
  }
  return true;
}

/// The error of feeding layout `In` to a column-parallel layer (sequence_parallel `Sp`).
template <class In, bool Sp>
consteval LayoutError column_input_error() {
  using enum LayoutError;
  if constexpr (std::is_same_v<In, Partial>) return partial_to_column;
  else if constexpr (std::is_same_v<In, Replicate>) return Sp ? column_sequence_mismatch : none;
  else if constexpr (In::dim == 1) return Sp ? none : column_sequence_mismatch;
  else return shard_to_column;
}

/// The error of feeding layout `In` to a row-parallel layer (input_is_parallel `Parallel`).
template <class In, bool Parallel>
consteval LayoutError row_input_error() {
  using enum LayoutError;
  if constexpr (std::is_same_v<In, Partial>) return partial_to_row;
  else if constexpr (std::is_same_v<In, Replicate>) return Parallel ? replicate_to_row : none;
  else if constexpr (In::dim == 1) return sequence_to_row;
  else return Parallel ? none : shard_to_scattering_row;
}

}  // namespace tessera::detail::tp
