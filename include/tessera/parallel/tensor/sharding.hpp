#pragma once
/// @file
/// Slicing a full tensor into its tp shard and reassembling the full tensor from the shards,
/// along any dim, with ParamLayout's `blocks` (the fused q, k, v of c_attn); the packing that
/// lets a collective move a slice that is not contiguous in memory.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera {

namespace detail::tp {

/// A tensor seen as [outer][blocks][size][chunk] around dim `dim` (chunk includes the dims
/// after it): the rank's piece of every block is `chunk` consecutive elements.
struct SplitGeometry {
  std::int64_t outer = 1;   ///< product of the dims before `dim`
  std::int64_t blocks = 1;  ///< parts of the dim (3 for fused q, k, v)
  std::int64_t size = 1;    ///< ranks
  std::int64_t chunk = 1;   ///< elements of one rank's piece of one part (times the inner dims)
};

/// The geometry of splitting `full` along `dim` into `blocks` parts, each over `size` ranks.
/// Throws tessera::Error naming the numbers when the dim does not divide evenly.
inline SplitGeometry split_geometry(const Shape& full, int dim, int blocks, int size, const char* what) {
  const int d = full.dim(dim);
  const std::int64_t n = full[d];
  TESSERA_EXPECTS(blocks >= 1 && size >= 1 && n % (static_cast<std::int64_t>(blocks) * size) == 0, what,
                  ": dim ", dim, " of shape ", full, " (", n, ") is not divisible into ", blocks, " block(s) x ",
                  size, " tp ranks");
  SplitGeometry g{.outer = 1, .blocks = blocks, .size = size, .chunk = n / (static_cast<std::int64_t>(blocks) * size)};
  for (int i = 0; i < d; ++i) g.outer *= full[i];
  for (int i = d + 1; i < full.rank(); ++i) g.chunk *= full[i];
  return g;
}

/// Copies rank `rank`'s pieces out of contiguous `full` into contiguous `local`
/// ([outer][blocks][chunk]).
template <class T>
void gather_pieces(const T* full, T* local, const SplitGeometry& g, int rank) {
  for (std::int64_t o = 0; o < g.outer; ++o)
    for (std::int64_t b = 0; b < g.blocks; ++b)
      std::copy_n(full + ((o * g.blocks + b) * g.size + rank) * g.chunk, g.chunk, local + (o * g.blocks + b) * g.chunk);
}

/// Copies contiguous `local` ([outer][blocks][chunk]) into rank `rank`'s pieces of `full`.
template <class T>
void scatter_pieces(const T* local, T* full, const SplitGeometry& g, int rank) {
  for (std::int64_t o = 0; o < g.outer; ++o)
    for (std::int64_t b = 0; b < g.blocks; ++b)
      std::copy_n(local + (o * g.blocks + b) * g.chunk, g.chunk, full + ((o * g.blocks + b) * g.size + rank) * g.chunk);
}

/// Whether rank pieces are already consecutive in memory (one block, nothing before the dim).
inline bool rank_major(const SplitGeometry& g) noexcept { return g.outer == 1 && g.blocks == 1; }

/// Rank `rank`'s shard of `x` along `dim` (contiguous copy; `blocks` as in ParamLayout).
template <class T>
Tensor<T> split_dim(const Tensor<T>& x, int dim, int blocks, int rank, int size, const char* what = "split") {
  const SplitGeometry g = split_geometry(x.shape(), dim, blocks, size, what);
  const Tensor<T> xc = x.contiguous();
  Tensor<T> out = Tensor<T>::empty(x.shape().with(dim, x.size(dim) / size));
  gather_pieces(xc.data(), out.data(), g, rank);
  return out;
}

/// The full tensor from every rank's shard `local` along `dim`: an all-gather, then the pieces
/// put in place. Collective over `comm`: every rank calls it with the same shape. `loc` (the
/// caller's line by default) is the call site a CollectiveChecker reports.
template <class T>
Tensor<T> all_gather_dim(Comm& comm, const Tensor<T>& local, int dim, int blocks = 1,
                         SourceLocation loc = SourceLocation::current()) {
  const int size = comm.size();
  const Shape full_shape = local.shape().with(dim, local.size(dim) * size);
  const SplitGeometry g = split_geometry(full_shape, dim, blocks, size, "all_gather");
  const Tensor<T> lc = local.contiguous();
  Tensor<T> full = Tensor<T>::empty(full_shape);
  if (rank_major(g)) {
    comm.all_gather(lc.span(), full.span(), loc);
    return full;
  }
  Tensor<T> packed = Tensor<T>::empty(Shape{static_cast<std::int64_t>(size), lc.numel()});  // [rank][local]
  comm.all_gather(lc.span(), packed.span(), loc);
  for (int r = 0; r < size; ++r) scatter_pieces(packed.data() + r * lc.numel(), full.data(), g, r);
  return full;
}

/// This rank's shard along `dim` of the sum over ranks of `full`: a reduce-scatter, with the
/// pieces packed rank by rank first. Collective over `comm`: every rank calls it with the same
/// shape. `loc`: the call site a CollectiveChecker reports (the caller's line by default).
template <class T>
Tensor<T> reduce_scatter_dim(Comm& comm, const Tensor<T>& full, int dim, int blocks = 1,
                             SourceLocation loc = SourceLocation::current()) {
  const int size = comm.size();
  const SplitGeometry g = split_geometry(full.shape(), dim, blocks, size, "reduce_scatter");
  const Tensor<T> fc = full.contiguous();
  Tensor<T> local = Tensor<T>::empty(full.shape().with(dim, full.size(dim) / size));
  if (rank_major(g)) {
    comm.reduce_scatter(fc.span(), local.span(), ReduceOp::sum, loc);
    return local;
  }
  Tensor<T> packed = Tensor<T>::empty(Shape{static_cast<std::int64_t>(size), local.numel()});
  for (int r = 0; r < size; ++r) gather_pieces(fc.data(), packed.data() + r * local.numel(), g, r);
  comm.reduce_scatter(packed.span(), local.span(), ReduceOp::sum, loc);
  return local;
}

/// Throws tessera::Error unless `s` is (B, T, d), the shape of a sequence-parallel activation.
inline void expect_sequence_rank(const Shape& s, const char* what) {
  TESSERA_EXPECTS(s.rank() == 3, what, ": a sequence-parallel activation must be (B, T, d); got shape ", s);
}

/// In-place sum over the ranks of a contiguous tensor. Collective over `comm`. `loc`: the call
/// site a CollectiveChecker reports (the caller's line by default).
template <class T>
void all_reduce_sum(Comm& comm, const Tensor<T>& x, SourceLocation loc = SourceLocation::current()) {
  comm.all_reduce(x.span(), ReduceOp::sum, loc);
}

/// Adds `bias` [c] to every row of contiguous `x` (..., c); nothing for an empty bias.
template <class T>
void add_bias_rows(const Tensor<T>& x, const Tensor<T>& bias) {
  if (bias.numel() == 0) return;
  const std::int64_t c = bias.numel(), rows = x.numel() / c;
  TESSERA_EXPECTS(x.is_contiguous() && x.size(-1) == c, "bias of shape ", bias.shape(),
                  " does not match an activation of shape ", x.shape());
  const Tensor<T> b = bias.contiguous();
  for (std::int64_t r = 0; r < rows; ++r) {
    T* row = x.data() + r * c;
    for (std::int64_t j = 0; j < c; ++j) row[j] += b.data()[j];
  }
}

/// Adds the column sums of `dy` (..., c) into `grad` [c].
template <class T>
void add_column_sums(const Tensor<T>& grad, const Tensor<T>& dy) {
  const Tensor<T> g = dy.contiguous();
  const std::int64_t c = grad.numel(), rows = g.numel() / c;
  T* out = grad.data();
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* row = g.data() + r * c;
    for (std::int64_t j = 0; j < c; ++j) out[j] += row[j];
  }
}

/// `a + b` without writing into a tensor that another handle may still read: a fresh sum when
/// `a` shares storage with `b`, else `a` updated in place.
template <class T>
Tensor<T> add_into_fresh(Tensor<T> a, const Tensor<T>& b) {
  if (a.shares_storage_with(b)) a = a.clone();
  a.add_(b);
  return a;
}

}  // namespace detail::tp

/// Rank `rank`'s shard of the full tensor `full` under `layout`, as a new contiguous tensor:
/// a clone for Replicate; for Shard(dim, blocks) its piece of each of the `blocks` equal parts
/// of dim `dim` (so a fused [d, 3d] c_attn weight gives the rank its heads' q, k and v columns,
/// as Megatron-LM's `stride`). Throws tessera::Error naming the numbers when the dim is not
/// divisible by blocks x size or rank is outside [0, size).
template <TensorScalar T>
Tensor<T> shard_of(const Tensor<T>& full, const ParamLayout& layout, int rank, int size) {
  TESSERA_EXPECTS(size >= 1 && rank >= 0 && rank < size, "shard_of: rank ", rank, " is outside [0, ", size, ")");
  if (!layout.is_shard()) return full.clone();
  return detail::tp::split_dim(full, layout.dim, layout.blocks, rank, size, "shard_of");
}

/// The full tensor from every tp rank's shard `local` under `layout` (the inverse of
/// shard_of): an all-gather along the sharded dim; for Replicate, a copy of `local`.
/// Collective over `comm` for a shard: every rank calls it with the same shape.
template <TensorScalar T>
Tensor<T> unshard(Comm& comm, const Tensor<T>& local, const ParamLayout& layout) {
  if (!layout.is_shard()) return local.clone();
  return detail::tp::all_gather_dim(comm, local, layout.dim, layout.blocks);
}

}  // namespace tessera
