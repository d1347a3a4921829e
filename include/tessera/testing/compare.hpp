#pragma once
/// @file
/// NaN-safe comparisons for tests: every error measure here is +infinity when either side holds a
/// NaN or an infinity, and `WorstError` keeps +infinity once it has seen one, so a check of the
/// form `CHECK(worst.value() < tol)` fails on a non-finite result instead of passing
/// (`std::max(0.0, NaN)` is 0; `if (e >= worst)` skips a NaN). docs/testing.md states the rule.

#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <span>

#include "tessera/core/tensor.hpp"

namespace tessera::testing {

/// +infinity: the error of a comparison that involved a non-finite value.
inline constexpr double infinite_error = std::numeric_limits<double>::infinity();

/// `e` itself when it is finite, else +infinity (a NaN error never compares below a tolerance).
inline double finite_or_infinite(double e) { return std::isfinite(e) ? e : infinite_error; }

/// The largest error seen; a NaN or infinite error makes it +infinity for good.
/// Use instead of `std::max(worst, e)`, which drops a NaN.
class WorstError {
 public:
  /// Records one error (any sign is taken as its magnitude).
  void add(double e) {
    e = finite_or_infinite(std::abs(e));
    if (e > worst_) worst_ = e;
  }
  /// The largest recorded error: 0 when none was recorded, +infinity after a non-finite one.
  double value() const { return worst_; }

 private:
  double worst_ = 0;
};

/// |a - b| / |b| for scalars (|a - b| when b is 0); +infinity if either is not finite.
inline double rel_error(double a, double b) {
  if (!std::isfinite(a) || !std::isfinite(b)) return infinite_error;
  const double d = std::abs(a - b);
  return b == 0 ? d : d / std::abs(b);
}

/// max_i |a_i - b_i|: +infinity if any element of either side is not finite, or the sizes differ.
template <class A, class B>
double max_abs_error(std::span<const A> a, std::span<const B> b) {
  if (a.size() != b.size()) return infinite_error;
  WorstError w;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return infinite_error;
    w.add(x - y);
  }
  return w.value();
}

/// max_i |a_i - b_i| / max_i |b_i| (fp32 round-off of an elementwise reproduction is about 1e-6);
/// +infinity on any non-finite element or a size mismatch; |a - b| when b is all zeros.
template <class A, class B>
double max_rel_error(std::span<const A> a, std::span<const B> b) {
  if (a.size() != b.size()) return infinite_error;
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return infinite_error;
    diff = std::abs(x - y) > diff ? std::abs(x - y) : diff;
    scale = std::abs(y) > scale ? std::abs(y) : scale;
  }
  return scale == 0 ? diff : diff / scale;
}

/// ||a - b|| / max(||a||, ||b||) in double (norm-wise relative error; 0 when both are 0);
/// +infinity on any non-finite element or a size mismatch. The elements are divided by the
/// largest magnitude before they are squared, so finite values whose squares would overflow
/// (> 1e154) or underflow (< 1e-154, which would make different values compare as 0) still give
/// the true ratio.
template <class A, class B>
double norm_rel_error(std::span<const A> a, std::span<const B> b) {
  if (a.size() != b.size()) return infinite_error;
  double scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return infinite_error;
    scale = std::abs(x) > scale ? std::abs(x) : scale;
    scale = std::abs(y) > scale ? std::abs(y) : scale;
  }
  if (scale == 0) return 0;
  double num = 0, na = 0, nb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]) / scale, y = static_cast<double>(b[i]) / scale;
    num += (x - y) * (x - y);
    na += x * x;
    nb += y * y;
  }
  return finite_or_infinite(std::sqrt(num) / std::sqrt(na > nb ? na : nb));
}

/// Whether a and b hold the same bits and every value is finite (two identical NaNs are not
/// "equal" here: a bitwise check must not pass on garbage).
template <class T>
bool bitwise_equal_finite(std::span<const T> a, std::span<const T> b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!std::isfinite(static_cast<double>(a[i]))) return false;
  return a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// Whether every element is finite.
template <class T>
bool all_finite(std::span<const T> a) {
  for (const T& x : a)
    if (!std::isfinite(static_cast<double>(x))) return false;
  return true;
}

/// norm_rel_error over two tensors of any strides: +infinity when the shapes differ (or as the
/// span form).
template <class A, class B>
double norm_rel_error(const Tensor<A>& a, const Tensor<B>& b) {
  if (a.shape() != b.shape()) return infinite_error;
  const Tensor<A> ac = a.contiguous();
  const Tensor<B> bc = b.contiguous();
  return norm_rel_error(std::span<const A>(ac.span()), std::span<const B>(bc.span()));
}

/// bitwise_equal_finite over two tensors of any strides: false when the shapes differ.
template <class T>
bool bitwise_equal_finite(const Tensor<T>& a, const Tensor<T>& b) {
  if (a.shape() != b.shape()) return false;
  const Tensor<T> ac = a.contiguous(), bc = b.contiguous();
  return bitwise_equal_finite(std::span<const T>(ac.span()), std::span<const T>(bc.span()));
}

}  // namespace tessera::testing
