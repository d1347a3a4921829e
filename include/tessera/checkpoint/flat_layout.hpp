#pragma once
/// @file
/// FlatLayout: the flattened (padded) parameter vector that ZeRO-1 shards over the dp ranks,
/// and the map from a flat range back onto named parameters, so a ZeRO-1 rank's optimizer
/// state is saved as named pieces that any other dp size can load.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/checkpoint/tensor_shard.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::checkpoint {

/// One parameter's place in a flat vector.
struct FlatParam {
  std::string name;        ///< the parameter's name
  Shape local_shape{};     ///< its tp-local shape (what this rank holds of it)
  ParamLayout layout{};    ///< its tp layout
  std::int64_t offset = 0; ///< index of its first element in the flat vector
};

/// The part of one parameter inside a flat range: its elements [param_begin, param_end)
/// (row-major, of the tp-local tensor) sit at flat index flat_begin.
struct FlatSegment {
  std::size_t param = 0;         ///< index into FlatLayout::params
  std::int64_t param_begin = 0;  ///< first element of the parameter in the range
  std::int64_t param_end = 0;    ///< one past the last
  std::int64_t flat_begin = 0;   ///< flat index of param_begin
};

/// The flat vector of ZeRO-1: parameters laid out in order at their offsets (gaps allowed, for
/// alignment), `padded_numel` elements in all, cut into dp_size equal contiguous shards
/// (DeepSpeed's ZeRO stage 1 and PyTorch's ZeroRedundancyOptimizer work the same way).
struct FlatLayout {
  std::vector<FlatParam> params;   ///< in flat order
  std::int64_t padded_numel = 0;   ///< total length, a multiple of the dp size

  /// Parameters back to back in list order, each starting at a multiple of `align` elements,
  /// the total padded to a multiple of `dp_size * align`. Throws tessera::Error when dp_size
  /// or align is below 1.
  template <std::floating_point T>
  static FlatLayout contiguous(const ParameterList<T>& ps, int dp_size, std::int64_t align = 1) {
    TESSERA_EXPECTS(dp_size >= 1 && align >= 1, "FlatLayout: dp size ", dp_size, " and align ", align,
                    " must be >= 1");
    FlatLayout f;
    std::int64_t at = 0;
    for (const Parameter<T>& p : ps) {
      at = (at + align - 1) / align * align;
      f.params.push_back({p.name, p.value.shape(), p.layout, at});
      at += p.value.numel();
    }
    const std::int64_t unit = static_cast<std::int64_t>(dp_size) * align;
    f.padded_numel = (at + unit - 1) / unit * unit;
    return f;
  }

  /// The flat range [begin, end) of dp rank `dp_rank` of `dp_size`: equal shards in rank order.
  /// Throws tessera::Error when dp_size does not divide padded_numel or the rank is out of range.
  std::pair<std::int64_t, std::int64_t> shard_range(int dp_rank, int dp_size) const {
    TESSERA_EXPECTS(dp_size >= 1 && dp_rank >= 0 && dp_rank < dp_size, "FlatLayout: dp rank ", dp_rank,
                    " is outside [0, ", dp_size, ")");
    TESSERA_EXPECTS(padded_numel % dp_size == 0, "FlatLayout: ", padded_numel, " elements do not split into ",
                    dp_size, " equal shards");
    const std::int64_t n = padded_numel / dp_size;
    return {dp_rank * n, (dp_rank + 1) * n};
  }

  /// The parameters inside flat range [begin, end), in flat order (padding is skipped). Throws
  /// tessera::Error when the range is outside [0, padded_numel) or parameters overlap.
  std::vector<FlatSegment> segments(std::int64_t begin, std::int64_t end) const {
    TESSERA_EXPECTS(0 <= begin && begin <= end && end <= padded_numel, "FlatLayout: range [", begin, ", ", end,
                    ") is outside the ", padded_numel, " flat elements");
    std::vector<FlatSegment> out;
    std::int64_t prev_end = 0;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const FlatParam& p = params[i];
      const std::int64_t lo = p.offset, hi = p.offset + p.local_shape.numel();
      TESSERA_EXPECTS(lo >= prev_end && hi <= padded_numel, "FlatLayout: parameter '", p.name, "' at [", lo, ", ",
                      hi, ") overlaps the previous one or passes the end ", padded_numel);
      prev_end = hi;
      const std::int64_t a = std::max(lo, begin), b = std::min(hi, end);
      if (a < b) out.push_back({i, a - lo, b - lo, a});
    }
    return out;
  }

  /// The pieces of flat range [begin, begin + flat.numel()) as named TensorShards whose values
  /// are views into `flat` (1-D, the range's elements), each named after its parameter plus
  /// `suffix` (e.g. ".exp_avg"), with the parameter's layout and its FlatRange: what to save for
  /// a ZeRO-1 rank's optimizer state, and where loading writes it back. Throws tessera::Error
  /// when `flat` is not 1-D or the range is outside the vector.
  template <std::floating_point T>
  std::vector<TensorShard<T>> shards(std::int64_t begin, const Tensor<T>& flat, std::string_view suffix) const {
    TESSERA_EXPECTS(flat.rank() == 1, "FlatLayout::shards: the flat buffer must be 1-D, got ", flat.shape());
    std::vector<TensorShard<T>> out;
    for (const FlatSegment& s : segments(begin, begin + flat.numel())) {
      const FlatParam& p = params[s.param];
      out.push_back({p.name + std::string(suffix),
                     flat.slice(0, s.flat_begin - begin, s.flat_begin - begin + (s.param_end - s.param_begin)),
                     p.layout, FlatRange{p.local_shape, s.param_begin, s.param_end}});
    }
    return out;
  }
};

}  // namespace tessera::checkpoint
