#pragma once
/// @file
/// GemmShape and ColumnMajorGemm: a row-major matrix product as tessera's layers write it, and
/// the column-major product cuBLAS(Lt) computes for it. Pure arithmetic on sizes: no CUDA.
///
/// Row-major C (m x n, leading dimension ldc) is column-major C^T (n x m, same ldc), so
/// C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T: the operands swap, and each keeps its
/// stored layout with the transpose flag it had.

#include <cstdint>

#include "tessera/core/error.hpp"

namespace tessera::cuda {

/// C = alpha op(A) op(B) + beta C over row-major matrices, optionally `batch` times at
/// element strides stride_a, stride_b, stride_c. op(A) is m x k (A stored m x k, or k x m when
/// trans_a), op(B) is k x n (B stored k x n, or n x k when trans_b), C is m x n. Leading
/// dimensions are row lengths in elements (0 means the dense row length).
struct GemmShape {
  bool trans_a = false;       ///< A is stored k x m and used transposed
  bool trans_b = false;       ///< B is stored n x k and used transposed
  std::int64_t m = 0;         ///< rows of C
  std::int64_t n = 0;         ///< columns of C
  std::int64_t k = 0;         ///< the contracted extent
  std::int64_t lda = 0;       ///< row length of A as stored (0: dense)
  std::int64_t ldb = 0;       ///< row length of B as stored (0: dense)
  std::int64_t ldc = 0;       ///< row length of C (0: dense, n)
  std::int64_t batch = 1;     ///< number of products
  std::int64_t stride_a = 0;  ///< elements between consecutive A (0: dense)
  std::int64_t stride_b = 0;  ///< elements between consecutive B (0: dense)
  std::int64_t stride_c = 0;  ///< elements between consecutive C (0: dense)
};

/// The column-major problem cuBLAS is given for a GemmShape: D' = op(A') op(B'), m' x n',
/// where A' is the row-major B and B' the row-major A.
struct ColumnMajorGemm {
  bool trans_a = false;  ///< op(A') transposes
  bool trans_b = false;  ///< op(B') transposes
  std::int64_t m = 0, n = 0, k = 0;        ///< m' = n, n' = m, k' = k
  std::int64_t rows_a = 0, cols_a = 0;     ///< A' as stored, column-major
  std::int64_t rows_b = 0, cols_b = 0;     ///< B' as stored, column-major
  std::int64_t lda = 0, ldb = 0, ldc = 0;  ///< leading dimensions of A', B', C'
  std::int64_t batch = 1;                  ///< number of products
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;  ///< of A', B', C' (= row-major B, A, C)
};

/// The column-major problem for `g`, with dense leading dimensions and strides filled in.
/// Throws tessera::Error naming the numbers for a negative extent or a leading dimension shorter
/// than its row. Batch strides may interleave (heads side by side in one row: stride = head dim).
inline ColumnMajorGemm to_column_major(const GemmShape& g) {
  TESSERA_EXPECTS(g.m >= 0 && g.n >= 0 && g.k >= 0 && g.batch >= 1, "cuda gemm: bad sizes m ", g.m, " n ", g.n,
                  " k ", g.k, " batch ", g.batch);
  // Row-major storage of A: (rows x cols) = (m x k), or (k x m) when trans_a.
  const std::int64_t a_rows = g.trans_a ? g.k : g.m, a_cols = g.trans_a ? g.m : g.k;
  const std::int64_t b_rows = g.trans_b ? g.n : g.k, b_cols = g.trans_b ? g.k : g.n;
  const std::int64_t lda = g.lda ? g.lda : a_cols, ldb = g.ldb ? g.ldb : b_cols, ldc = g.ldc ? g.ldc : g.n;
  TESSERA_EXPECTS(lda >= a_cols, "cuda gemm: lda ", lda, " is shorter than A's row of ", a_cols);
  TESSERA_EXPECTS(ldb >= b_cols, "cuda gemm: ldb ", ldb, " is shorter than B's row of ", b_cols);
  TESSERA_EXPECTS(ldc >= g.n, "cuda gemm: ldc ", ldc, " is shorter than C's row of ", g.n);
  const std::int64_t sa = g.stride_a ? g.stride_a : a_rows * lda;
  const std::int64_t sb = g.stride_b ? g.stride_b : b_rows * ldb;
  const std::int64_t sc = g.stride_c ? g.stride_c : g.m * ldc;
  ColumnMajorGemm c;
  c.m = g.n;
  c.n = g.m;
  c.k = g.k;
  // A' = row-major B seen column-major: (b_cols x b_rows), ld = ldb; used transposed iff trans_b.
  c.trans_a = g.trans_b;
  c.rows_a = b_cols;
  c.cols_a = b_rows;
  c.lda = ldb;
  // B' = row-major A seen column-major: (a_cols x a_rows), ld = lda; transposed iff trans_a.
  c.trans_b = g.trans_a;
  c.rows_b = a_cols;
  c.cols_b = a_rows;
  c.ldb = lda;
  c.ldc = ldc;
  c.batch = g.batch;
  c.stride_a = sb;
  c.stride_b = sa;
  c.stride_c = sc;
  return c;
}

}  // namespace tessera::cuda
