// Tensor, Shape, the counter-based init RNG and ParameterList.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "nn_test_util.hpp"
#include "tessera/core/allocation_counter.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/random.hpp"
#include "tessera/core/storage_cache.hpp"
#include "tessera/core/tensor.hpp"

using tessera::Index;
using tessera::Shape;
using tessera::Tensor;
using nn_test::contains;
using nn_test::error_of;

namespace {
// A (2, 3, 4) tensor holding 0..23.
Tensor<float> iota234() {
  Tensor<float> t = Tensor<float>::empty(Shape{2, 3, 4});
  for (int i = 0; i < 24; ++i) t.data()[i] = static_cast<float>(i);
  return t;
}
}  // namespace

TEST_CASE("Tensor: a slice along each dim is a view whose elements are those of the parent") {
  const Tensor<float> t = iota234();
  for (int d = 0; d < 3; ++d) {
    const Tensor<float> s = t.slice(d, 1, 2 + (d == 2));
    CHECK(s.shares_storage_with(t));
    for (std::int64_t a = 0; a < s.size(0); ++a)
      for (std::int64_t b = 0; b < s.size(1); ++b)
        for (std::int64_t c = 0; c < s.size(2); ++c) {
          const std::int64_t ia = a + (d == 0), ib = b + (d == 1), ic = c + (d == 2);
          CHECK(s(a, b, c) == static_cast<float>(ia * 12 + ib * 4 + ic));
        }
  }
  // Writes through a view reach the parent.
  t.slice(-1, 3, 4).fill(-1.0f);
  CHECK(t(1, 2, 3) == -1.0f);
  CHECK(t(1, 2, 2) == 22.0f);
}

TEST_CASE("Tensor: contiguous() copies a strided slice and returns a dense tensor unchanged") {
  const Tensor<float> t = iota234();
  const Tensor<float> cols = t.slice(2, 1, 3);
  CHECK_FALSE(cols.is_contiguous());
  const Tensor<float> c = cols.contiguous();
  CHECK(c.is_contiguous());
  CHECK_FALSE(c.shares_storage_with(t));
  CHECK(c.shape() == Shape{2, 3, 2});
  CHECK(c(1, 2, 1) == 22.0f);
  CHECK(t.slice(0, 1, 2).contiguous().shares_storage_with(t));  // already dense: no copy
  CHECK(contains(error_of([&] { (void)cols.span(); }), "not contiguous"));
}

TEST_CASE("Tensor: element-wise helpers work on strided views and name both shapes on mismatch") {
  const Tensor<double> a = Tensor<double>::full(Shape{3, 4}, 1.0);
  const Tensor<double> b = Tensor<double>::from(Shape{4, 3}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
  // a[:, 1:3] += 2 * b[1:4, 0:2]
  a.slice(1, 1, 3).add_(b.slice(0, 1, 4).slice(1, 0, 2), 2.0);
  CHECK(a(0, 0) == 1.0);
  CHECK(a(0, 1) == 1.0 + 2 * 3);
  CHECK(a(2, 2) == 1.0 + 2 * 10);
  CHECK(a(2, 3) == 1.0);
  a.slice(0, 0, 1).scale_(0.5);
  CHECK(a(0, 1) == 3.5);
  const std::string msg = error_of([&] { a.add_(b); });
  CHECK(contains(msg, "(3, 4)"));
  CHECK(contains(msg, "(4, 3)"));
  CHECK(contains(error_of([&] { a.copy_from(b); }), "(4, 3)"));
}

TEST_CASE("Tensor: reshape is a view of the same elements and rejects other element counts") {
  const Tensor<float> t = iota234();
  const Tensor<float> r = t.reshape(Shape{6, 4});
  CHECK(r.shares_storage_with(t));
  CHECK(r(5, 3) == 23.0f);
  const std::string msg = error_of([&] { (void)t.reshape(Shape{5, 5}); });
  CHECK(contains(msg, "(2, 3, 4)"));
  CHECK(contains(msg, "(5, 5)"));
  CHECK(contains(error_of([&] { (void)t.slice(1, 0, 2).reshape(Shape{16}); }), "not contiguous"));
}

TEST_CASE("Tensor: concat of slices along a dim restores the original; cast converts element-wise") {
  const Tensor<float> t = iota234();
  for (int d = 0; d < 3; ++d) {
    const std::vector<Tensor<float>> parts{t.slice(d, 0, 1), t.slice(d, 1, t.size(d))};
    const Tensor<float> c = tessera::concat(parts, d);
    CHECK(c.shape() == t.shape());
    for (int i = 0; i < 24; ++i) CHECK(c.data()[i] == t.data()[i]);
  }
  const Tensor<double> dd = t.cast<double>();
  CHECK(dd(1, 2, 3) == 23.0);
  const std::vector<Tensor<float>> bad{t, Tensor<float>(Shape{2, 4, 4})};
  CHECK(contains(error_of([&] { (void)tessera::concat(bad, 0); }), "(2, 4, 4)"));
}

TEST_CASE("Tensor: bad indices, slices and element counts throw with the numbers") {
  const Tensor<float> t = iota234();
  CHECK(contains(error_of([&] { (void)t(0, 3, 0); }), "index 3"));
  CHECK(contains(error_of([&] { (void)t(0, 0); }), "2 indices"));
  CHECK(contains(error_of([&] { (void)t.slice(1, 2, 4); }), "[2, 4)"));
  CHECK(contains(error_of([&] { (void)t.slice(3, 0, 1); }), "dim 3"));
  CHECK(contains(error_of([] { (void)Tensor<float>::from(Shape{2, 2}, {1, 2, 3}); }), "3 values"));
  CHECK(Shape{2, 3}.str() == "(2, 3)");
  CHECK(Shape{}.numel() == 1);
}

TEST_CASE("fill_normal: the same seed and name give the same values; other seeds or names differ") {
  const Tensor<float> a(Shape{64}), b(Shape{64}), c(Shape{64}), d(Shape{64});
  tessera::fill_normal(a, 7, "w", 1.0);
  tessera::fill_normal(b, 7, "w", 1.0);
  tessera::fill_normal(c, 8, "w", 1.0);
  tessera::fill_normal(d, 7, "v", 1.0);
  int same_ab = 0, same_ac = 0, same_ad = 0;
  for (int i = 0; i < 64; ++i) {
    same_ab += a.data()[i] == b.data()[i];
    same_ac += a.data()[i] == c.data()[i];
    same_ad += a.data()[i] == d.data()[i];
  }
  CHECK(same_ab == 64);
  CHECK(same_ac == 0);
  CHECK(same_ad == 0);
}

TEST_CASE("fill_normal: 200000 samples have mean 0 and the requested std within sampling error") {
  const Tensor<double> t(Shape{200000});
  tessera::fill_normal(t, 1, "stats", 0.02);
  double s = 0, s2 = 0, s4 = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const double v = t.data()[i] / 0.02;
    s += v;
    s2 += v * v;
    s4 += v * v * v * v;
  }
  const double n = static_cast<double>(t.numel());
  CHECK(std::abs(s / n) < 5 / std::sqrt(n));            // mean 0
  CHECK(std::abs(s2 / n - 1) < 5 * std::sqrt(2 / n));   // variance 1
  CHECK(std::abs(s4 / n - 3) < 5 * std::sqrt(96 / n));  // kurtosis 3: normal, not uniform
}

TEST_CASE("fill_normal: a shard filled at its offset equals the slice of the full tensor, bitwise") {
  const Shape full_shape{6, 12};
  const Tensor<float> full(full_shape);
  tessera::fill_normal(full, 3, "h.0.attn.c_attn.weight", 0.02);
  // Column shard [4, 8) into its own storage, and row shard [2, 5) into a strided view.
  const Tensor<float> cols(Shape{6, 4});
  tessera::fill_normal(cols, 3, "h.0.attn.c_attn.weight", 0.02, full_shape, Index{0, 4});
  const Tensor<float> host(Shape{3, 20});
  const Tensor<float> rows = host.slice(1, 5, 17);
  tessera::fill_normal(rows, 3, "h.0.attn.c_attn.weight", 0.02, full_shape, Index{2, 0});
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 4; ++j) CHECK(cols(i, j) == full(i, 4 + j));
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 12; ++j) CHECK(rows(i, j) == full(2 + i, j));
  CHECK(host(0, 4) == 0.0f);  // nothing written outside the view
  CHECK(contains(error_of([&] { tessera::fill_normal(cols, 3, "w", 1.0, full_shape, Index{0, 9}); }), "offset 9"));
}

TEST_CASE("ParameterList: iterates references in order, finds by name, zeroes gradients") {
  tessera::Parameter<float> w("lin.weight", Tensor<float>::full(Shape{2, 3}, 1.0f));
  tessera::Parameter<float> b("lin.bias", Tensor<float>::full(Shape{3}, 2.0f), tessera::ParamLayout::shard(0));
  tessera::ParameterList<float> ps{&w, &b};
  std::vector<std::string> names;
  for (tessera::Parameter<float>& p : ps) {
    names.push_back(p.name);
    p.grad.fill(5.0f);
  }
  CHECK(names == std::vector<std::string>{"lin.weight", "lin.bias"});
  CHECK(ps.numel() == 9);
  CHECK(&ps.at("lin.bias") == &b);
  CHECK(ps.find("nope") == nullptr);
  CHECK(contains(error_of([&] { (void)ps.at("nope"); }), "\"nope\""));
  CHECK(w.grad(1, 2) == 5.0f);
  ps.zero_grad();
  CHECK(w.grad(1, 2) == 0.0f);
  CHECK(b.grad(0) == 0.0f);
  CHECK(tessera::detail::str(b.layout) == "Shard(0)");
  CHECK(tessera::detail::str(tessera::ParamLayout::shard(1, 3)) == "Shard(1, blocks=3)");
  CHECK(tessera::detail::str(w.layout) == "Replicate");
}

TEST_CASE("StorageCache: a freed large buffer is handed out again for the same size; small ones bypass it") {
  using tessera::detail::StorageCache;
  StorageCache::release();
  const float* first = nullptr;
  {
    const Tensor<float> big = Tensor<float>::empty(Shape{1 << 18});  // 1 MiB
    first = big.data();
    CHECK(reinterpret_cast<std::uintptr_t>(first) % 64 == 0);
  }
  CHECK(StorageCache::cached_bytes() == (std::size_t{1} << 20));
  {
    const Tensor<float> again(Shape{1 << 18});  // zero-filled even when reused
    CHECK(again.data() == first);
    CHECK(StorageCache::cached_bytes() == 0);
    CHECK(again(12345) == 0.0f);
    again.fill(3.0f);
  }
  { const Tensor<float> small(Shape{16}); }
  CHECK(StorageCache::cached_bytes() == (std::size_t{1} << 20));
  // A buffer allocated on another thread and freed here joins this thread's cache.
  Tensor<double> from_thread;
  std::thread([&] { from_thread = Tensor<double>::full(Shape{1 << 17}, 1.0); }).join();
  from_thread = Tensor<double>();
  CHECK(StorageCache::cached_bytes() == (std::size_t{2} << 20));
  StorageCache::release();
  CHECK(StorageCache::cached_bytes() == 0);
}

TEST_CASE("AllocationCounter: counts the storage allocated under its Scope until it is freed, on any thread; temporaries drop out, views add nothing, scopes nest") {
  using tessera::AllocationCounter;
  auto outer = std::make_shared<AllocationCounter>();
  auto inner = std::make_shared<AllocationCounter>();
  Tensor<float> kept, view;
  Tensor<double> in_inner;
  {
    const AllocationCounter::Scope counting(outer);
    kept = Tensor<float>(Shape{100});  // 400 bytes
    { const Tensor<float> temporary(Shape{1 << 18}); }  // 1 MiB, allocated and freed: drops out
    {
      const AllocationCounter::Scope nested(inner);
      in_inner = Tensor<double>(Shape{10});  // 80 bytes, in the inner counter only
    }
    view = kept.slice(0, 10, 20);             // a view: no new storage
    const Tensor<std::int32_t> last(Shape{3});  // the outer counter again: 12 bytes while alive
    CHECK(outer->bytes() == 412);
    CHECK(inner->bytes() == 80);
  }
  CHECK(AllocationCounter::current() == nullptr);
  const Tensor<float> outside(Shape{50});  // no scope: not counted
  CHECK(outer->bytes() == 400);
  kept = Tensor<float>();
  CHECK(outer->bytes() == 400);  // the view still holds the storage
  std::thread([&] { view = Tensor<float>(); }).join();  // freed on another thread
  CHECK(outer->bytes() == 0);
  in_inner = Tensor<double>();
  CHECK(inner->bytes() == 0);
}
