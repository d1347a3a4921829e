#pragma once
// Helpers shared by the nn tests: central finite differences, random fills, error messages.

#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <span>
#include <string>

#include "tessera/core/parameter.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/testing/compare.hpp"

namespace nn_test {

using tessera::Tensor;

// A tensor of normal(0, std) values from `seed` (fixed, independent of any layer).
inline Tensor<double> random_tensor(const tessera::Shape& s, std::uint64_t seed, double std = 1.0) {
  Tensor<double> t = Tensor<double>::empty(s);
  tessera::fill_normal(t, seed, "test", std);
  return t;
}

// Overwrites every parameter with normal(0, std) values, so that gradient checks exercise
// the nonlinear range (GPT-2's 0.02 init keeps layers almost linear) and LayerNorm's
// weight/bias are not 1/0.
template <class T>
void randomize(const tessera::ParameterList<T>& params, std::uint64_t seed, double std = 0.5) {
  for (tessera::Parameter<T>& p : params) tessera::fill_normal(p.value, seed, p.name, std);
}

// The elements of a contiguous tensor, read-only (for the comparisons of tessera/testing).
template <class T>
std::span<const T> values_of(const Tensor<T>& contiguous) {
  return std::span<const T>(contiguous.span());
}

// ||a - b|| / max(||a||, ||b||), over all elements; +infinity when either holds a NaN or an
// infinity (tessera::testing::norm_rel_error), so `relative_error(...) < tol` fails on garbage.
template <class A, class B>
double relative_error(const Tensor<A>& a, const Tensor<B>& b) {
  REQUIRE(a.shape() == b.shape());
  return tessera::testing::norm_rel_error(a, b);
}

// Whether two tensors hold bitwise the same values, all finite (tessera::testing::bitwise_equal_finite).
template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  return tessera::testing::bitwise_equal_finite(a, b);
}

// Whether every element is finite.
template <class T>
bool all_finite(const Tensor<T>& a) {
  const Tensor<T> ac = a.contiguous();
  return tessera::testing::all_finite(values_of(ac));
}

// The L2 norm of all elements.
inline double norm(const Tensor<double>& a) {
  const Tensor<double> ac = a.contiguous();
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += ac.data()[i] * ac.data()[i];
  return std::sqrt(s);
}

// dL/d(wrt) by central differences, perturbing each element of the contiguous tensor `wrt`
// in place (and restoring it).
inline Tensor<double> numeric_grad(const Tensor<double>& wrt, const std::function<double()>& loss,
                                   double h = 1e-5) {
  REQUIRE(wrt.is_contiguous());
  Tensor<double> g = Tensor<double>::empty(wrt.shape());
  for (std::int64_t i = 0; i < wrt.numel(); ++i) {
    const double saved = wrt.data()[i];
    wrt.data()[i] = saved + h;
    const double lp = loss();
    wrt.data()[i] = saved - h;
    const double lm = loss();
    wrt.data()[i] = saved;
    g.data()[i] = (lp - lm) / (2 * h);
  }
  return g;
}

// sum(y * r): the scalar whose gradient with respect to y is r.
inline double dot(const Tensor<double>& y, const Tensor<double>& r) {
  REQUIRE(y.shape() == r.shape());
  double s = 0;
  const Tensor<double> yc = y.contiguous(), rc = r.contiguous();
  for (std::int64_t i = 0; i < y.numel(); ++i) s += yc.data()[i] * rc.data()[i];
  return s;
}

// The what() of the exception that f throws, or "" if it throws none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Checks a tensor-input layer's backward against central differences: the input gradient and
// every parameter gradient, with loss sum(forward(x) * r) for a fixed random r.
template <class L>
void check_gradients(L& layer, const Tensor<double>& x, std::uint64_t seed, double tol = 1e-6) {
  auto [y, ctx] = layer.forward(x);
  const Tensor<double> r = random_tensor(y.shape(), seed + 1);
  layer.parameters().zero_grad();
  const Tensor<double> dx = layer.backward(r, ctx);
  const auto loss = [&] { return dot(layer.forward(x).output, r); };
  {
    INFO("input gradient");
    const Tensor<double> num = numeric_grad(x, loss);
    CHECK(norm(num) > 1e-6);  // a vanishing gradient would make the comparison vacuous
    CHECK(relative_error(dx, num) < tol);
  }
  for (tessera::Parameter<double>& p : layer.parameters()) {
    INFO("parameter ", p.name);
    const Tensor<double> num = numeric_grad(p.value, loss);
    CHECK(norm(num) > 1e-6);
    CHECK(relative_error(p.grad, num) < tol);
  }
}

}  // namespace nn_test
