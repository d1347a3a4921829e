#pragma once
/// @file
/// TensorShard (a named piece of a tensor that a rank holds), Placement (where the rank sits
/// on the mesh), and ShardGeometry: which elements of the global tensor a piece holds, as
/// runs of consecutive elements, so that any saved layout can be copied into any other.

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <concepts>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/checkpoint/detail/json_input.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/mesh/mesh.hpp"

namespace tessera::checkpoint {

/// Where a rank sits: the mesh's axis sizes and this rank's coordinates on it. Saving records
/// it; loading needs only the tp coordinate (to cut each sharded tensor) and the caller's
/// choice of which parameters this pp stage and dp rank hold.
struct Placement {
  MeshShape shape{};  ///< dp, pp, tp sizes
  MeshCoord coord{};  ///< this rank's dp, pp, tp coordinates
  /// The placement of this rank of `mesh`.
  static Placement of(const Mesh& mesh) { return {mesh.shape(), mesh.coord()}; }
  /// A rank of tp size `tp_size` at tp coordinate `tp_rank` (dp = pp = 1).
  static Placement tensor_parallel(int tp_rank, int tp_size) {
    return {MeshShape{.dp = 1, .pp = 1, .tp = tp_size}, MeshCoord{.dp = 0, .pp = 0, .tp = tp_rank}};
  }
};

/// Elements [begin, end) of a tp-local tensor of shape `local_shape`, flattened row-major: what
/// a ZeRO-1 rank holds of a parameter's optimizer state (Rajbhandari et al., "ZeRO", SC 2020).
struct FlatRange {
  Shape local_shape{};     ///< shape of the whole tp-local tensor
  std::int64_t begin = 0;  ///< first element held
  std::int64_t end = 0;    ///< one past the last element held
};

/// A named tensor as one rank holds it: the whole tp-local shard of `name` (`value` shaped like
/// the parameter on this rank, cut from the global tensor by `layout` at this rank's tp
/// coordinate) or, when `flat` is set, elements [flat->begin, flat->end) of that shard
/// flattened (`value` then holds end - begin elements). Optimizer state is a list of these,
/// named after the parameter plus a suffix (e.g. "h.0.attn.c_attn.weight.exp_avg").
///
/// `value` is a handle: loading writes into it, so it may view a parameter, an optimizer's
/// moment or a slice of a flat buffer.
template <std::floating_point T>
struct TensorShard {
  std::string name;               ///< global name, e.g. "h.0.attn.c_attn.weight"
  Tensor<T> value;                ///< the elements this rank holds
  ParamLayout layout{};           ///< how the global tensor is cut over the tp ranks
  std::optional<FlatRange> flat;  ///< set for a flat (ZeRO) range of the tp-local tensor
};

/// A run of `length` consecutive elements at row-major index `global` of the global tensor,
/// found at element `local` of a piece's data.
struct Run {
  std::int64_t global = 0;  ///< first element in the global tensor (row-major)
  std::int64_t local = 0;   ///< first element in the piece's data
  std::int64_t length = 0;  ///< number of elements
};

/// Which elements of a global tensor a piece holds, in a form that is saved in the files and
/// the index: the global shape; the dim along which the tp-local tensor was cut (-1: the whole
/// tensor) and the [begin, end) ranges of that dim it holds, in local order (several for
/// blocks > 1, e.g. the q, k and v columns of a fused c_attn); optionally a flat range of the
/// tp-local tensor (ZeRO-1).
struct ShardGeometry {
  std::vector<std::int64_t> global_shape;               ///< the full tensor's extents
  int shard_dim = -1;                                   ///< cut dim, or -1 for the whole tensor
  std::vector<std::array<std::int64_t, 2>> ranges;      ///< along shard_dim, in local order
  std::optional<std::array<std::int64_t, 2>> flat;      ///< elements [a, b) of the local tensor
  /// The tp-local tensor's extent along shard_dim when it is padded past the ranges (a padded
  /// vocabulary shard: the ranges hold its first rows, the rest is padding); -1: the sum of
  /// the ranges.
  std::int64_t local_extent = -1;

  /// Elements of the global tensor.
  std::int64_t global_numel() const noexcept {
    std::int64_t n = 1;
    for (std::int64_t d : global_shape) n *= d;
    return n;
  }
  /// Shape of the tp-local tensor: the global shape with shard_dim's extent the sum of the
  /// ranges.
  std::vector<std::int64_t> local_shape() const {
    std::vector<std::int64_t> s = global_shape;
    if (shard_dim >= 0) {
      std::int64_t n = 0;
      for (const auto& r : ranges) n += r[1] - r[0];
      s[static_cast<std::size_t>(shard_dim)] = local_extent >= 0 ? local_extent : n;
    }
    return s;
  }
  /// Elements of the tp-local tensor.
  std::int64_t local_numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : local_shape()) n *= d;
    return n;
  }
  /// Elements this piece holds (the flat range's length, else the local tensor's).
  std::int64_t numel() const { return flat ? (*flat)[1] - (*flat)[0] : local_numel(); }

  /// The elements held, as runs in the order of the piece's data, adjacent runs merged. A
  /// whole tensor is one run; a column shard of a (R, C) matrix is R runs per range.
  std::vector<Run> runs() const {
    std::vector<Run> out;
    if (global_numel() == 0) return out;  // nothing held; also no loop over a huge outer extent
    auto push = [&out](Run r) {
      if (r.length == 0) return;
      if (!out.empty() && out.back().global + out.back().length == r.global &&
          out.back().local + out.back().length == r.local) {
        out.back().length += r.length;
      } else {
        out.push_back(r);
      }
    };
    if (shard_dim < 0) {
      push({0, 0, global_numel()});
    } else {
      const auto d = static_cast<std::size_t>(shard_dim);
      std::int64_t outer = 1, inner = 1;
      for (std::size_t i = 0; i < d; ++i) outer *= global_shape[i];
      for (std::size_t i = d + 1; i < global_shape.size(); ++i) inner *= global_shape[i];
      const std::int64_t g = global_shape[d];
      std::int64_t l = 0;
      for (const auto& r : ranges) l += r[1] - r[0];
      if (local_extent >= 0) l = local_extent;  // padding after the ranges
      for (std::int64_t o = 0; o < outer; ++o) {
        std::int64_t at = 0;
        for (const auto& r : ranges) {
          push({(o * g + r[0]) * inner, (o * l + at) * inner, (r[1] - r[0]) * inner});
          at += r[1] - r[0];
        }
      }
    }
    if (!flat) return out;
    const std::int64_t a = (*flat)[0], b = (*flat)[1];
    std::vector<Run> clipped;
    for (const Run& r : out) {
      const std::int64_t lo = std::max(a, r.local), hi = std::min(b, r.local + r.length);
      if (lo < hi) clipped.push_back({r.global + (lo - r.local), lo - a, hi - lo});
    }
    return clipped;
  }

  /// As saved: {"global_shape": [...], "shard_dim": d, "ranges": [[b, e], ...], "flat": [a, b]}.
  nlohmann::json to_json() const {
    nlohmann::json j = {{"global_shape", global_shape}, {"shard_dim", shard_dim}, {"ranges", nlohmann::json::array()}};
    for (const auto& r : ranges) j["ranges"].push_back({r[0], r[1]});
    if (flat) j["flat"] = {(*flat)[0], (*flat)[1]};
    if (local_extent >= 0) j["local_extent"] = local_extent;
    return j;
  }
  /// Parses `to_json`'s form and checks it: integers of the right type, non-negative extents
  /// whose element count fits in int64 (for the local tensor too), a shard_dim of the shape,
  /// increasing disjoint ranges inside the global extent, a flat range inside the local
  /// tensor. Throws tessera::Error naming `name` (the tensor) and the defect; never anything
  /// else, whatever `j` holds.
  static ShardGeometry from_json(const nlohmann::json& j, std::string_view name) {
    const std::string what = tessera::detail::str("tensor '", name, "': shard description ", detail::brief(j));
    auto bad = [&](const std::string& defect) { throw Error(tessera::detail::str(what, " ", defect)); };
    auto array_of = [&](const nlohmann::json& a, std::string_view key, std::size_t size) -> const nlohmann::json& {
      if (!a.is_array() || (size > 0 && a.size() != size))
        bad(tessera::detail::str("has a \"", key, "\" that is not ", size > 0 ? "a pair" : "an array"));
      return a;
    };
    auto pair = [&](const nlohmann::json& a, std::string_view key) {
      const nlohmann::json& p = array_of(a, key, 2);
      return std::array<std::int64_t, 2>{detail::integer<std::int64_t>(p[0], what + " " + std::string(key)),
                                         detail::integer<std::int64_t>(p[1], what + " " + std::string(key))};
    };
    ShardGeometry g;
    for (const auto& d : array_of(detail::member(j, "global_shape", what), "global_shape", 0))
      g.global_shape.push_back(detail::integer<std::int64_t>(d, what + " extent", 0));
    if (g.global_shape.size() > static_cast<std::size_t>(max_rank))
      bad(tessera::detail::str("has rank ", g.global_shape.size(), " above ", max_rank));
    g.shard_dim = detail::integer<int>(detail::member(j, "shard_dim", what), what + " shard_dim", -1,
                                       static_cast<int>(g.global_shape.size()) - 1);
    for (const auto& r : array_of(detail::member(j, "ranges", what), "ranges", 0)) g.ranges.push_back(pair(r, "range"));
    if (j.contains("flat")) g.flat = pair(j["flat"], "flat");
    if (j.contains("local_extent")) g.local_extent = detail::integer<std::int64_t>(j["local_extent"], what + " local_extent", 0);
    if (detail::checked_numel(g.global_shape) < 0) bad("has more elements than an int64 counts");
    if (g.shard_dim >= 0) {
      const std::int64_t ext = g.global_shape[static_cast<std::size_t>(g.shard_dim)];
      std::int64_t held = 0, at = 0;
      for (const auto& r : g.ranges) {
        if (r[0] < at || r[0] > r[1] || r[1] > ext)
          bad(tessera::detail::str("has a range [", r[0], ", ", r[1], ") outside the global extent ", ext,
                                   " or not after the previous one"));
        held += r[1] - r[0];  // <= ext: the ranges are disjoint
        at = r[1];
      }
      if (g.local_extent >= 0 && g.local_extent < held) bad("has a local extent smaller than its ranges");
    } else if (g.local_extent >= 0) {
      bad("has a local extent but no shard dim");
    } else if (!g.ranges.empty()) {
      bad("has ranges but no shard dim");
    }
    const std::int64_t local = detail::checked_numel(g.local_shape());
    if (local < 0) bad("has a local tensor of more elements than an int64 counts");
    if (g.flat && ((*g.flat)[0] < 0 || (*g.flat)[0] > (*g.flat)[1] || (*g.flat)[1] > local))
      bad("has a flat range outside the local tensor");
    return g;
  }
  /// Equal descriptions.
  friend bool operator==(const ShardGeometry&, const ShardGeometry&) = default;
};

/// The extents of `s` as a vector.
inline std::vector<std::int64_t> dims_of(const Shape& s) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(s.rank()));
  for (int d = 0; d < s.rank(); ++d) v[static_cast<std::size_t>(d)] = s[d];
  return v;
}

/// The geometry of the tp-local tensor of shape `local_shape` that tp rank `tp_rank` of
/// `tp_size` holds under `layout` (ParamLayout's rule: shard(dim, blocks) cuts dim `dim` of
/// the global tensor into `blocks` equal parts and gives each rank its equal slice of every
/// part, in order; Megatron-LM's `stride`), with `flat` when only a flat range of it is held.
/// Throws tessera::Error naming `name` when the shard dim is out of range, the local extent is
/// not a multiple of `blocks`, the rank is outside [0, tp_size) or the flat range is outside
/// the local tensor.
inline ShardGeometry geometry_of(std::string_view name, const Shape& local_shape, ParamLayout layout, int tp_rank,
                                 int tp_size, const std::optional<FlatRange>& flat = std::nullopt) {
  TESSERA_EXPECTS(tp_size >= 1 && tp_rank >= 0 && tp_rank < tp_size, "tensor '", name, "': tp rank ", tp_rank,
                  " is outside [0, ", tp_size, ")");
  ShardGeometry g;
  g.global_shape = dims_of(local_shape);
  if (layout.is_shard()) {
    TESSERA_EXPECTS(layout.dim >= 0 && layout.dim < local_shape.rank(), "tensor '", name, "': shard dim ", layout.dim,
                    " is out of range for its shape ", local_shape);
    TESSERA_EXPECTS(layout.blocks >= 1 && local_shape[layout.dim] % layout.blocks == 0, "tensor '", name,
                    "': its local extent ", local_shape[layout.dim], " in dim ", layout.dim,
                    " is not a multiple of blocks=", layout.blocks);
    const std::int64_t piece = local_shape[layout.dim] / layout.blocks;
    g.shard_dim = layout.dim;
    if (layout.extent > 0) {
      // A padded shard: rank r holds rows [r piece, (r + 1) piece) of the padded tensor, of
      // which those below `extent` belong to the tensor.
      TESSERA_EXPECTS(layout.blocks == 1, "tensor '", name, "': a padded shard (extent ", layout.extent,
                      ") must have blocks=1, not ", layout.blocks);
      TESSERA_EXPECTS(piece * tp_size >= layout.extent && piece * (tp_size - 1) < layout.extent + piece, "tensor '",
                      name, "': a local extent of ", piece, " over ", tp_size, " tp ranks does not pad extent ",
                      layout.extent);
      const std::int64_t lo = std::min(tp_rank * piece, layout.extent), hi = std::min(lo + piece, layout.extent);
      g.global_shape[static_cast<std::size_t>(layout.dim)] = layout.extent;
      g.ranges.push_back({lo, hi});
      g.local_extent = piece;
    } else {
      const std::int64_t part = piece * tp_size;
      g.global_shape[static_cast<std::size_t>(layout.dim)] = part * layout.blocks;
      for (int b = 0; b < layout.blocks; ++b) {
        const std::int64_t lo = b * part + tp_rank * piece;
        if (!g.ranges.empty() && g.ranges.back()[1] == lo) {
          g.ranges.back()[1] = lo + piece;  // tp = 1: the parts are adjacent
        } else {
          g.ranges.push_back({lo, lo + piece});
        }
      }
    }
  }
  if (flat) {
    TESSERA_EXPECTS(flat->local_shape == local_shape, "tensor '", name, "': flat range of shape ", flat->local_shape,
                    " differs from the local shape ", local_shape);
    TESSERA_EXPECTS(0 <= flat->begin && flat->begin <= flat->end && flat->end <= local_shape.numel(), "tensor '",
                    name, "': flat range [", flat->begin, ", ", flat->end, ") is outside its ", local_shape.numel(),
                    " elements");
    g.flat = std::array<std::int64_t, 2>{flat->begin, flat->end};
  }
  return g;
}

/// The geometry of `shard` at tp rank `tp_rank` of `tp_size` (see geometry_of). Throws
/// tessera::Error naming the tensor when its value does not hold the described elements.
template <std::floating_point T>
ShardGeometry geometry_of(const TensorShard<T>& shard, int tp_rank, int tp_size) {
  const Shape local = shard.flat ? shard.flat->local_shape : shard.value.shape();
  ShardGeometry g = geometry_of(shard.name, local, shard.layout, tp_rank, tp_size, shard.flat);
  if (shard.flat)
    TESSERA_EXPECTS(shard.value.numel() == shard.flat->end - shard.flat->begin, "tensor '", shard.name, "': value of ",
                    shard.value.numel(), " elements for the flat range [", shard.flat->begin, ", ", shard.flat->end, ")");
  return g;
}

}  // namespace tessera::checkpoint
