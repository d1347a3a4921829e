#pragma once
/// @file
/// Row-major GEMM through CBLAS (OpenBLAS): the one place tessera multiplies matrices.

// OpenBLAS's config header uses C99 `_Complex`, which clang flags under -Wpedantic.
#if defined(__clang__)
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wc99-extensions"
#endif
#include <cblas.h>
#if defined(__clang__)
#pragma clang diagnostic pop
#endif

#include <concepts>
#include <cstdint>
#include <limits>

#include "tessera/core/error.hpp"

namespace tessera {

/// Whether a GEMM operand is used as stored or transposed.
enum class Transpose : bool { no = false, yes = true };

/// C = alpha * op(A) * op(B) + beta * C for row-major matrices, with op(A): (m, k),
/// op(B): (k, n), C: (m, n); lda, ldb, ldc are the row strides in elements of A, B, C as
/// stored. With beta == 0, C is not read (BLAS semantics). Calls cblas_sgemm / cblas_dgemm.
///
/// Throws tessera::Error when a size does not fit CBLAS's `int`.
template <std::floating_point T>
void gemm(Transpose trans_a, Transpose trans_b, std::int64_t m, std::int64_t n, std::int64_t k, T alpha,
          const T* a, std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  constexpr std::int64_t max = std::numeric_limits<int>::max();
  TESSERA_EXPECTS(m <= max && n <= max && k <= max && lda <= max && ldb <= max && ldc <= max,
                  "gemm: sizes m=", m, " n=", n, " k=", k, " exceed the BLAS integer range (int)");
  if (m == 0 || n == 0) return;
  const auto ta = trans_a == Transpose::yes ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b == Transpose::yes ? CblasTrans : CblasNoTrans;
  const auto i = [](std::int64_t v) { return static_cast<int>(v); };
  if constexpr (std::same_as<T, float>)
    cblas_sgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c, i(ldc));
  else
    cblas_dgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c, i(ldc));
}

}  // namespace tessera
