#pragma once
// Helpers of the tensor-parallel tests: relative errors, random tensors, moving values between a
// serial model and its tp shards, and the comparisons every body makes. Backend-independent:
// everything takes a tessera::Comm.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/tensor/sharding.hpp"
#include "tessera/testing/compare.hpp"

namespace tp_test {

using tessera::Comm;
using tessera::Parameter;
using tessera::ParameterList;
using tessera::Shape;
using tessera::Tensor;

// The elements of a contiguous tensor, read-only (for the comparisons of tessera/testing).
template <class T>
std::span<const T> values_of(const Tensor<T>& contiguous) {
  return std::span<const T>(contiguous.span());
}

// ||a - b|| / max(||a||, ||b||) over all elements, in double (0 when both are 0); +infinity
// when the shapes differ or either holds a NaN or an infinity (tessera::testing::norm_rel_error).
template <class A, class B>
double rel_err(const Tensor<A>& a, const Tensor<B>& b) {
  return tessera::testing::norm_rel_error(a, b);
}

// Whether both tensors hold the same values bit for bit, all finite (two NaN tensors are not
// equal: tessera::testing::bitwise_equal_finite).
template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  return tessera::testing::bitwise_equal_finite(a, b);
}

// normal(0, std) values of `shape`, from (seed, name).
template <class T>
Tensor<T> random_tensor(const Shape& shape, std::uint64_t seed, const char* name = "x", double std = 1.0) {
  Tensor<T> t = Tensor<T>::empty(shape);
  tessera::fill_normal(t, seed, name, std);
  return t;
}

// Random token ids in [0, vocab) of shape (B, T).
inline Tensor<std::int32_t> random_tokens(std::int64_t B, std::int64_t T, std::int64_t vocab, std::uint64_t seed) {
  Tensor<std::int32_t> t = Tensor<std::int32_t>::empty(Shape{B, T});
  for (std::int64_t i = 0; i < t.numel(); ++i)
    t.data()[i] = static_cast<std::int32_t>(tessera::random_bits(seed, 17, static_cast<std::uint64_t>(i)) %
                                            static_cast<std::uint64_t>(vocab));
  return t;
}

// Overwrites every parameter with normal(0, std) values keyed by its name, so that LayerNorm
// weights, biases and attention are away from GPT-2's near-identity init.
template <class T>
void randomize(const ParameterList<T>& params, std::uint64_t seed, double std = 0.3) {
  for (Parameter<T>& p : params) tessera::fill_normal(p.value, seed, p.name, std);
}

// `full` with its first dim zero-padded to `rows` (the padded vocabulary of wte).
template <class T>
Tensor<T> pad_rows(const Tensor<T>& full, std::int64_t rows) {
  if (full.size(0) == rows) return full;
  Tensor<T> out(full.shape().with(0, rows));
  out.slice(0, 0, full.size(0)).copy_from(full);
  return out;
}

// The full tensor of a tp parameter's value or grad (all-gathered; padding rows dropped to
// `full_rows` when positive). Collective over `tp`.
template <class T>
Tensor<T> gather_full(Comm& tp, const Tensor<T>& local, const tessera::ParamLayout& layout, std::int64_t full_rows = 0) {
  Tensor<T> full = tessera::unshard(tp, local, layout);
  if (full_rows > 0 && full.size(0) != full_rows) full = full.slice(0, 0, full_rows).contiguous();
  return full;
}

// Copies the serial parameters' values into the tp shards of the same names (the shard of each
// under its layout; wte's rows padded). Throws when a name is missing.
template <class T>
void load_shards(const ParameterList<T>& tp_params, const ParameterList<T>& serial, const Comm& tp) {
  for (Parameter<T>& p : tp_params) {
    const Parameter<T>& s = serial.at(p.name);
    Tensor<T> full = s.value;
    if (p.layout.is_shard() && p.layout.dim == 0) full = pad_rows(full, p.value.size(0) * tp.size());
    p.value.copy_from(tessera::shard_of(full, p.layout, tp.rank(), tp.size()));
  }
}

// The worst relative error of the gathered tp gradients against the serial ones, by name.
struct GradReport {
  double max_rel = 0;       // over every parameter (+infinity after a NaN or an infinity)
  std::string worst;        // the name of the worst
  std::size_t count = 0;    // parameters compared
  bool replicated_equal = true;  // every replicated gradient bitwise equal on all tp ranks
};

// Whether `local` is the same, bit for bit, on every rank of `tp`, and finite (NaN copies are
// not "the same"). Collective over `tp`.
template <class T>
bool same_on_every_rank(Comm& tp, const Tensor<T>& local) {
  const Tensor<T> lc = local.contiguous();
  Tensor<T> all = Tensor<T>::empty(Shape{static_cast<std::int64_t>(tp.size()), lc.numel()});
  tp.all_gather(lc.span(), all.span());
  const std::span<const T> everyone = values_of(all);
  const std::size_t n = static_cast<std::size_t>(lc.numel());
  for (int r = 0; r < tp.size(); ++r)
    if (!tessera::testing::bitwise_equal_finite(values_of(lc), everyone.subspan(static_cast<std::size_t>(r) * n, n)))
      return false;
  return true;
}

// Compares every tp parameter's gathered gradient (or value, with `values`) with the serial
// parameter of the same name. Collective over `tp`.
template <class T>
GradReport compare_params(Comm& tp, const ParameterList<T>& tp_params, const ParameterList<T>& serial,
                          bool values = false) {
  GradReport r;
  tessera::testing::WorstError worst;  // a NaN is +inf, not skipped
  for (Parameter<T>& p : tp_params) {
    const Parameter<T>& s = serial.at(p.name);
    const Tensor<T>& mine = values ? p.value : p.grad;
    const Tensor<T> full = gather_full(tp, mine, p.layout, s.value.size(0));
    const double before = worst.value();
    worst.add(rel_err(full, values ? s.value : s.grad));
    if (r.worst.empty() || worst.value() > before) r.worst = p.name;
    if (!p.layout.is_shard() && !same_on_every_rank(tp, mine)) r.replicated_equal = false;
    ++r.count;
  }
  r.max_rel = worst.value();
  return r;
}

// Loop reference of the smoothed mean cross-entropy and its logit gradient (PyTorch semantics).
inline std::pair<double, Tensor<double>> smoothed_reference(const Tensor<double>& x, const Tensor<std::int32_t>& t,
                                                            double eps, std::int64_t ignore = -100) {
  const std::int64_t n = x.size(0), v = x.size(1);
  Tensor<double> g(x.shape());
  double total = 0;
  std::int64_t valid = 0;
  for (std::int64_t r = 0; r < n; ++r) valid += t.data()[r] != ignore;
  for (std::int64_t r = 0; r < n; ++r) {
    if (t.data()[r] == ignore) continue;
    double mx = -1e300, se = 0, sx = 0;
    for (std::int64_t j = 0; j < v; ++j) mx = std::max(mx, x(r, j));
    for (std::int64_t j = 0; j < v; ++j) se += std::exp(x(r, j) - mx), sx += x(r, j);
    const double lse = std::log(se) + mx;
    total += (1 - eps) * (lse - x(r, t.data()[r])) + eps * (lse - sx / static_cast<double>(v));
    for (std::int64_t j = 0; j < v; ++j)
      g(r, j) = (std::exp(x(r, j) - lse) - eps / static_cast<double>(v) - (j == t.data()[r] ? 1 - eps : 0.0)) /
                static_cast<double>(valid);
  }
  return {total / static_cast<double>(valid), g};
}

}  // namespace tp_test
