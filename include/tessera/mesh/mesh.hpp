#pragma once
/// @file
/// Mesh: the world's ranks arranged on named axes dp, pp, tp, with one communicator per axis.

#include <string>

#include "tessera/comm/communicator.hpp"

namespace tessera {

/// Sizes of the mesh axes; their product must equal the world size.
/// Set with designated initializers: `MeshShape{.dp = 2, .pp = 2, .tp = 2}`.
struct MeshShape {
  int dp = 1;  ///< data-parallel degree (replicas)
  int pp = 1;  ///< pipeline-parallel degree (stages)
  int tp = 1;  ///< tensor-parallel degree (shards of each weight)
  /// dp * pp * tp.
  constexpr int world_size() const { return dp * pp * tp; }
};

/// A rank's coordinates on the mesh.
struct MeshCoord {
  int dp = 0;  ///< index on the dp axis
  int pp = 0;  ///< index on the pp axis (the pipeline stage's rank)
  int tp = 0;  ///< index on the tp axis
  friend bool operator==(const MeshCoord&, const MeshCoord&) = default;
};

/// The world's ranks laid out on axes dp, pp, tp with tp varying fastest and pp slowest
/// (Megatron-LM's default order "tp-dp-pp"): world rank = (pp * dp_size + dp) * tp_size + tp.
/// So the tp group of a rank holds consecutive ranks (e.g. 8 ranks, tp = 2, pp = 2: tp groups
/// [0,1] [2,3] [4,5] [6,7], dp groups [0,2] [1,3] [4,6] [5,7], pp groups [0,4] [1,5] [2,6] [3,7]).
///
/// Construction is collective over `world` (it splits it three times).
/// Throws Error on every rank if an axis is < 1 or the world size is not dp x pp x tp, e.g.
/// "Mesh: world size 6 is not dp(4) x pp(2) x tp(1) = 8".
class Mesh {
 public:
  /// Builds the axis communicators. Collective over `world`.
  Mesh(Comm world, MeshShape shape) : world_(std::move(world)), shape_(shape) {
    TESSERA_EXPECTS(shape.dp >= 1 && shape.pp >= 1 && shape.tp >= 1, "Mesh: every axis must be >= 1, got dp(",
                    shape.dp, ") pp(", shape.pp, ") tp(", shape.tp, ")");
    TESSERA_EXPECTS(world_.size() == shape.world_size(), "Mesh: world size ", world_.size(), " is not dp(",
                    shape.dp, ") x pp(", shape.pp, ") x tp(", shape.tp, ") = ", shape.world_size());
    coord_ = coord_of(world_.rank());
    const std::string base = world_.name();
    tp_ = world_.split(coord_.pp * shape.dp + coord_.dp, coord_.tp);
    tp_.set_name(detail::str(base, "/tp[pp=", coord_.pp, ",dp=", coord_.dp, "]"));
    dp_ = world_.split(coord_.pp * shape.tp + coord_.tp, coord_.dp);
    dp_.set_name(detail::str(base, "/dp[pp=", coord_.pp, ",tp=", coord_.tp, "]"));
    pp_ = world_.split(coord_.dp * shape.tp + coord_.tp, coord_.pp);
    pp_.set_name(detail::str(base, "/pp[dp=", coord_.dp, ",tp=", coord_.tp, "]"));
  }

  /// The axis sizes.
  const MeshShape& shape() const { return shape_; }
  /// This rank's coordinates.
  const MeshCoord& coord() const { return coord_; }
  /// The whole world.
  Comm& world() { return world_; }
  /// Ranks that differ only in their dp coordinate (rank in it = coord().dp).
  Comm& dp() { return dp_; }
  /// Ranks that differ only in their pp coordinate (rank in it = coord().pp).
  Comm& pp() { return pp_; }
  /// Ranks that differ only in their tp coordinate (rank in it = coord().tp).
  Comm& tp() { return tp_; }

  /// World rank of the given coordinates. Throws Error if a coordinate is out of range.
  int rank_of(MeshCoord c) const {
    TESSERA_EXPECTS(c.dp >= 0 && c.dp < shape_.dp && c.pp >= 0 && c.pp < shape_.pp && c.tp >= 0 && c.tp < shape_.tp,
                    "Mesh: coordinate (dp=", c.dp, ", pp=", c.pp, ", tp=", c.tp, ") is outside dp(", shape_.dp,
                    ") x pp(", shape_.pp, ") x tp(", shape_.tp, ")");
    return (c.pp * shape_.dp + c.dp) * shape_.tp + c.tp;
  }
  /// Coordinates of a world rank. Throws Error if it is out of range.
  MeshCoord coord_of(int world_rank) const {
    TESSERA_EXPECTS(world_rank >= 0 && world_rank < shape_.world_size(), "Mesh: rank ", world_rank,
                    " is outside a mesh of ", shape_.world_size(), " ranks");
    return MeshCoord{.dp = (world_rank / shape_.tp) % shape_.dp,
                     .pp = world_rank / (shape_.tp * shape_.dp),
                     .tp = world_rank % shape_.tp};
  }

 private:
  Comm world_;
  MeshShape shape_;
  MeshCoord coord_;
  Comm tp_, dp_, pp_;
};

}  // namespace tessera
