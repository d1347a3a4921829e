#pragma once
/// @file
/// Shape: the extents of a tensor of rank 0 to 4.

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <string>

#include "tessera/core/error.hpp"

namespace tessera {

/// The largest tensor rank tessera handles: (B, T, C) activations and (B, H, T, T) attention
/// probabilities need no more.
inline constexpr int max_rank = 4;

/// A multi-index or per-dim stride, one entry per dim (unused trailing entries are 0).
using Index = std::array<std::int64_t, max_rank>;

/// The extents of a tensor, rank 0 (a scalar) to 4, e.g. `Shape{8, 128, 768}` for (B, T, C).
/// Printed as "(8, 128, 768)", the form every shape error uses.
class Shape {
 public:
  /// Rank 0: a scalar, one element.
  constexpr Shape() = default;
  /// From the extents. Throws tessera::Error for more than 4 dims or a negative extent.
  Shape(std::initializer_list<std::int64_t> dims) {
    TESSERA_EXPECTS(dims.size() <= static_cast<std::size_t>(max_rank), "Shape: rank ", dims.size(),
                    " exceeds the maximum rank ", max_rank);
    for (std::int64_t d : dims) {
      TESSERA_EXPECTS(d >= 0, "Shape: extent ", d, " is negative");
      dims_[static_cast<std::size_t>(rank_++)] = d;
    }
  }
  /// From the first `rank` entries of `dims`. Throws tessera::Error as the list constructor.
  static Shape from(const Index& dims, int rank) {
    TESSERA_EXPECTS(rank >= 0 && rank <= max_rank, "Shape: rank ", rank, " outside [0, ", max_rank, "]");
    Shape s;
    for (int i = 0; i < rank; ++i) {
      TESSERA_EXPECTS(dims[static_cast<std::size_t>(i)] >= 0, "Shape: extent ",
                      dims[static_cast<std::size_t>(i)], " is negative");
      s.dims_[static_cast<std::size_t>(i)] = dims[static_cast<std::size_t>(i)];
    }
    s.rank_ = rank;
    return s;
  }

  /// Number of dims.
  constexpr int rank() const noexcept { return rank_; }
  /// Extent of dim `d` in [0, rank()); unchecked.
  constexpr std::int64_t operator[](int d) const noexcept { return dims_[static_cast<std::size_t>(d)]; }
  /// Extent of dim `d`; negative `d` counts from the back (-1 is the last dim). Throws
  /// tessera::Error when `d` is outside [-rank, rank).
  std::int64_t size(int d) const { return dims_[static_cast<std::size_t>(dim(d))]; }
  /// Normalizes a possibly negative dim to [0, rank()). Throws tessera::Error when out of range.
  int dim(int d) const {
    TESSERA_EXPECTS(d >= -rank_ && d < rank_, "Shape: dim ", d, " is out of range for shape ", *this);
    return d < 0 ? d + rank_ : d;
  }
  /// Product of the extents (1 for rank 0).
  constexpr std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }
  /// The extents as an Index (entries past rank() are 0).
  constexpr const Index& dims() const noexcept { return dims_; }
  /// This shape with dim `d` set to `extent`. Throws tessera::Error for a bad dim.
  Shape with(int d, std::int64_t extent) const {
    Shape s = *this;
    s.dims_[static_cast<std::size_t>(dim(d))] = extent;
    return s;
  }
  /// The product of all extents but the last: the row count when the tensor is seen as a
  /// (rows, last) matrix. 1 for rank 0 and 1.
  constexpr std::int64_t rows() const noexcept {
    std::int64_t n = 1;
    for (int i = 0; i + 1 < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }

  /// Equal rank and extents.
  friend constexpr bool operator==(const Shape& a, const Shape& b) noexcept {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.dims_[static_cast<std::size_t>(i)] != b.dims_[static_cast<std::size_t>(i)]) return false;
    return true;
  }
  /// Prints "(2, 3)"; a scalar prints "()".
  friend std::ostream& operator<<(std::ostream& os, const Shape& s) {
    os << '(';
    for (int i = 0; i < s.rank_; ++i) os << (i ? ", " : "") << s.dims_[static_cast<std::size_t>(i)];
    return os << ')';
  }
  /// The printed form, "(2, 3)".
  std::string str() const { return detail::str(*this); }

 private:
  Index dims_{};
  int rank_ = 0;
};

}  // namespace tessera
