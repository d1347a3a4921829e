#pragma once
/// @file
/// Tensor: a small strided CPU tensor (rank 0 to 4) with shared storage, cheap views and slices.
/// It is what layers, optimizers and communicators exchange; it is not a general tensor library.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <new>
#include <span>
#include <tuple>
#include <utility>
#include <vector>

#include "tessera/core/allocation_counter.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/storage_cache.hpp"

namespace tessera {

/// An element type a Tensor holds: float and double for data, std::int32_t and std::int64_t for
/// token ids and targets.
template <class T>
concept TensorScalar = std::same_as<T, float> || std::same_as<T, double> ||
                       std::same_as<T, std::int32_t> || std::same_as<T, std::int64_t>;

template <class T>
class Tensor;

template <class A, class B>
void expect_same_shape(const char* what, const Tensor<A>& a, const Tensor<B>& b);

namespace detail {
/// Row-major strides of a shape.
inline Index contiguous_strides(const Shape& s) noexcept {
  Index st{};
  std::int64_t acc = 1;
  for (int d = s.rank() - 1; d >= 0; --d) {
    st[static_cast<std::size_t>(d)] = acc;
    acc *= s[d];
  }
  return st;
}

/// Calls `fn(a[i], b[i], ...)` on matching elements of tensors of equal shape, in row-major
/// order. Throws tessera::Error naming both shapes when they differ.
template <class Fn, class T0, class... Ts>
void for_each_element(const char* what, Fn&& fn, const Tensor<T0>& t0, const Tensor<Ts>&... ts);
}  // namespace detail

/// A strided view of shared, 64-byte aligned storage, holding `T` (see TensorScalar). Large
/// buffers come from a per-thread cache of freed ones (detail::StorageCache).
///
/// Copying a Tensor copies the handle, not the elements (like std::shared_ptr): copies and
/// views see each other's writes; `clone()` makes an independent copy. Constness is shallow:
/// a `const Tensor&` still gives write access to the elements, as std::span does. A default
/// Tensor is empty, shape (0).
///
/// Layers return contiguous row-major tensors. Views from `slice` may be strided; every helper
/// here accepts strided tensors, while `span()` and the BLAS paths need contiguous ones
/// (`contiguous()` returns the tensor itself when it already is).
template <class T>
class Tensor {
  static_assert(TensorScalar<T>,
                "tessera::Tensor holds float, double, std::int32_t or std::int64_t elements.");

 public:
  /// The element type.
  using Scalar = T;

  /// An empty tensor, shape (0).
  Tensor() = default;
  /// A zero-filled tensor of `shape`.
  explicit Tensor(const Shape& shape) : Tensor(empty(shape)) { fill(T{0}); }

  /// A zero-filled tensor of `shape`.
  static Tensor zeros(const Shape& shape) { return Tensor(shape); }
  /// A tensor of `shape` with unspecified contents, to be overwritten entirely.
  static Tensor empty(const Shape& shape) {
    Tensor t;
    t.storage_ = allocate(shape.numel());
    t.data_ = t.storage_.get();
    t.shape_ = shape;
    t.strides_ = detail::contiguous_strides(shape);
    return t;
  }
  /// A tensor of `shape` with every element `value`.
  static Tensor full(const Shape& shape, T value) {
    Tensor t = empty(shape);
    t.fill(value);
    return t;
  }
  /// A tensor of `shape` holding `values` in row-major order. Throws tessera::Error when the
  /// number of values differs from the shape's element count.
  static Tensor from(const Shape& shape, std::span<const T> values) {
    TESSERA_EXPECTS(static_cast<std::int64_t>(values.size()) == shape.numel(), "Tensor::from: ",
                    values.size(), " values given for shape ", shape, " of ", shape.numel(),
                    " elements");
    Tensor t = empty(shape);
    std::copy(values.begin(), values.end(), t.data_);
    return t;
  }
  /// As `from(shape, span)`, from a braced list.
  static Tensor from(const Shape& shape, std::initializer_list<T> values) {
    return from(shape, std::span<const T>(values.begin(), values.size()));
  }

  /// The extents.
  const Shape& shape() const noexcept { return shape_; }
  /// Number of dims.
  int rank() const noexcept { return shape_.rank(); }
  /// Extent of dim `d` (negative counts from the back). Throws tessera::Error for a bad dim.
  std::int64_t size(int d) const { return shape_.size(d); }
  /// Number of elements.
  std::int64_t numel() const noexcept { return shape_.numel(); }
  /// Stride of dim `d` in elements (negative counts from the back). Throws for a bad dim.
  std::int64_t stride(int d) const { return strides_[static_cast<std::size_t>(shape_.dim(d))]; }
  /// The strides in elements (entries past rank() are 0).
  const Index& strides() const noexcept { return strides_; }
  /// Whether the elements are dense in row-major order (dims of extent 1 are ignored).
  bool is_contiguous() const noexcept {
    std::int64_t acc = 1;
    for (int d = rank() - 1; d >= 0; --d) {
      if (shape_[d] != 1 && strides_[static_cast<std::size_t>(d)] != acc) return false;
      acc *= shape_[d];
    }
    return true;
  }
  /// Pointer to the first element (null for an empty tensor).
  T* data() const noexcept { return data_; }
  /// The elements of a contiguous tensor, e.g. to hand to a communicator. Throws
  /// tessera::Error for a strided view (call `contiguous()` first).
  std::span<T> span() const {
    TESSERA_EXPECTS(is_contiguous(), "Tensor::span: the view of shape ", shape_,
                    " is not contiguous; call contiguous() first");
    return {data_, static_cast<std::size_t>(numel())};
  }
  /// Whether both tensors view the same storage (not necessarily the same elements).
  bool shares_storage_with(const Tensor& other) const noexcept {
    return storage_ != nullptr && storage_ == other.storage_;
  }

  /// Element at the given multi-index, one index per dim. Throws tessera::Error when the
  /// number of indices differs from rank() or an index is out of range.
  template <std::integral... I>
  T& operator()(I... idx) const {
    TESSERA_EXPECTS(static_cast<int>(sizeof...(I)) == rank(), "Tensor: ", sizeof...(I),
                    " indices given for shape ", shape_);
    const std::int64_t ix[] = {static_cast<std::int64_t>(idx)..., 0};
    std::int64_t off = 0;
    for (int d = 0; d < rank(); ++d) {
      TESSERA_EXPECTS(ix[d] >= 0 && ix[d] < shape_[d], "Tensor: index ", ix[d], " is out of range for dim ",
                      d, " of shape ", shape_);
      off += ix[d] * strides_[static_cast<std::size_t>(d)];
    }
    return data_[off];
  }

  /// The view of elements [begin, end) along dim `d` (negative counts from the back); shares
  /// storage. A tensor-parallel shard is such a slice. Throws tessera::Error for a bad dim or
  /// range.
  Tensor slice(int d, std::int64_t begin, std::int64_t end) const {
    const int dd = shape_.dim(d);
    TESSERA_EXPECTS(0 <= begin && begin <= end && end <= shape_[dd], "Tensor::slice: range [", begin,
                    ", ", end, ") is outside dim ", d, " of shape ", shape_);
    Tensor t = *this;
    t.data_ = data_ == nullptr ? nullptr : data_ + begin * strides_[static_cast<std::size_t>(dd)];
    t.shape_ = shape_.with(dd, end - begin);
    return t;
  }
  /// The same elements seen with another shape; shares storage. Throws tessera::Error when the
  /// element counts differ or the tensor is not contiguous.
  Tensor reshape(const Shape& shape) const {
    TESSERA_EXPECTS(shape.numel() == numel(), "Tensor::reshape: cannot view shape ", shape_, " as ",
                    shape, ": element counts ", numel(), " and ", shape.numel(), " differ");
    TESSERA_EXPECTS(is_contiguous(), "Tensor::reshape: the view of shape ", shape_,
                    " is not contiguous; call contiguous() first");
    Tensor t = *this;
    t.shape_ = shape;
    t.strides_ = detail::contiguous_strides(shape);
    return t;
  }
  /// This tensor if it is contiguous, else a contiguous copy.
  Tensor contiguous() const { return is_contiguous() ? *this : clone(); }
  /// A contiguous copy with its own storage.
  Tensor clone() const {
    Tensor t = empty(shape_);
    t.copy_from(*this);
    return t;
  }
  /// A contiguous copy converted element-wise to `U` (e.g. fp32 <-> fp64).
  template <TensorScalar U>
  Tensor<U> cast() const {
    Tensor<U> t = Tensor<U>::empty(shape_);
    detail::for_each_element("Tensor::cast", [](U& o, const T& i) { o = static_cast<U>(i); }, t, *this);
    return t;
  }

  /// Sets every element to `value`.
  void fill(T value) const {
    detail::for_each_element("Tensor::fill", [value](T& x) { x = value; }, *this);
  }
  /// Sets every element to zero.
  void zero() const { fill(T{0}); }
  /// Copies the elements of `src` into this view. Throws tessera::Error naming both shapes when
  /// they differ.
  void copy_from(const Tensor& src) const {
    detail::for_each_element("Tensor::copy_from", [](T& d, const T& s) { d = s; }, *this, src);
  }
  /// `this += alpha * other`, element-wise. Throws tessera::Error naming both shapes when they
  /// differ.
  void add_(const Tensor& other, T alpha = T{1}) const {
    detail::for_each_element("Tensor::add_", [alpha](T& d, const T& s) { d += alpha * s; }, *this, other);
  }
  /// `this *= alpha`, element-wise.
  void scale_(T alpha) const {
    detail::for_each_element("Tensor::scale_", [alpha](T& d) { d *= alpha; }, *this);
  }

 private:
  static std::shared_ptr<T[]> allocate(std::int64_t n) {
    if (n == 0) return {};
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    T* p = static_cast<T*>(detail::StorageCache::allocate(bytes));
    // Counted in this thread's AllocationCounter, if any (the pipeline's activation accounting),
    // until freed. If the control block cannot be allocated, shared_ptr calls the deleter itself.
    AllocationCounter* const current = AllocationCounter::current();
    std::shared_ptr<AllocationCounter> counter = current ? current->shared_from_this() : nullptr;
    if (counter) counter->add(static_cast<std::int64_t>(bytes));
    return std::shared_ptr<T[]>(p, [bytes, counter = std::move(counter)](T* q) {
      if (counter) counter->remove(static_cast<std::int64_t>(bytes));
      detail::StorageCache::deallocate(q, bytes);
    });
  }

  std::shared_ptr<T[]> storage_;
  T* data_ = nullptr;
  Shape shape_{0};
  Index strides_{1};
};

/// The tensors joined along dim `d` (negative counts from the back) into a new contiguous
/// tensor, e.g. to reassemble tensor-parallel shards. Throws tessera::Error when the list is
/// empty or the shapes differ in a dim other than `d`.
template <TensorScalar T>
Tensor<T> concat(const std::vector<Tensor<T>>& parts, int d) {
  TESSERA_EXPECTS(!parts.empty(), "concat: no tensors given");
  const Shape& first = parts.front().shape();
  const int dd = first.dim(d);
  std::int64_t total = 0;
  for (const Tensor<T>& p : parts) {
    TESSERA_EXPECTS(p.shape().with(dd, 0) == first.with(dd, 0), "concat: shapes ", first, " and ",
                    p.shape(), " differ outside dim ", d);
    total += p.size(dd);
  }
  Tensor<T> out = Tensor<T>::empty(first.with(dd, total));
  std::int64_t at = 0;
  for (const Tensor<T>& p : parts) {
    out.slice(dd, at, at + p.size(dd)).copy_from(p);
    at += p.size(dd);
  }
  return out;
}

/// Throws tessera::Error "<what>: shapes (a) and (b) differ" unless both tensors have the same
/// shape.
template <class A, class B>
void expect_same_shape(const char* what, const Tensor<A>& a, const Tensor<B>& b) {
  TESSERA_EXPECTS(a.shape() == b.shape(), what, ": shapes ", a.shape(), " and ", b.shape(), " differ");
}

namespace detail {
inline Index padded(const Index& v, int rank, std::int64_t fill) noexcept {
  Index out{fill, fill, fill, fill};
  const int shift = max_rank - rank;
  for (int d = 0; d < rank; ++d) out[static_cast<std::size_t>(d + shift)] = v[static_cast<std::size_t>(d)];
  return out;
}

template <class Fn, class... Ts, std::size_t... I>
void for_each_strided(std::index_sequence<I...>, const Shape& shape, Fn& fn, const Tensor<Ts>&... ts) {
  const Index e = padded(shape.dims(), shape.rank(), 1);
  const std::array<Index, sizeof...(Ts)> st{padded(ts.strides(), ts.rank(), 0)...};
  const std::tuple<Ts*...> base{ts.data()...};
  for (std::int64_t a = 0; a < e[0]; ++a)
    for (std::int64_t b = 0; b < e[1]; ++b)
      for (std::int64_t c = 0; c < e[2]; ++c) {
        const std::tuple<Ts*...> row{(std::get<I>(base) + a * st[I][0] + b * st[I][1] + c * st[I][2])...};
        for (std::int64_t x = 0; x < e[3]; ++x) fn(std::get<I>(row)[x * st[I][3]]...);
      }
}

template <class Fn, class T0, class... Ts>
void for_each_element(const char* what, Fn&& fn, const Tensor<T0>& t0, const Tensor<Ts>&... ts) {
  (void)what;  // used only when there are several tensors to compare
  (expect_same_shape(what, t0, ts), ...);
  const std::int64_t n = t0.numel();
  if (n == 0) return;
  if (t0.is_contiguous() && (ts.is_contiguous() && ...)) {
    T0* p0 = t0.data();
    const std::tuple<Ts*...> ps{ts.data()...};
    std::apply(
        [&](Ts*... p) {
          for (std::int64_t i = 0; i < n; ++i) fn(p0[i], p[i]...);
        },
        ps);
    return;
  }
  for_each_strided(std::index_sequence_for<T0, Ts...>{}, t0.shape(), fn, t0, ts...);
}
}  // namespace detail

}  // namespace tessera
