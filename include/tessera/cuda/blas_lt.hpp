#pragma once
/// @file
/// BlasLt: a cuBLASLt handle with its workspace and a cache of chosen algorithms, and gemm(),
/// the one entry point of tessera's device matrix products (row-major, fp32 or bf16 inputs,
/// fp32 accumulation, bias / GELU epilogues fused where cuBLASLt offers them). Host code.

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/gemm_layout.hpp"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda {

/// What the product's epilogue does to C = alpha op(A) op(B) (+ beta C), row-major terms.
enum class Epilogue {
  none,       ///< nothing
  bias,       ///< C[i, j] += bias[j]
  gelu_bias,  ///< pre = C + bias[j] is written to `aux` (m x n), then C = gelu(pre) (tanh form)
  dgelu,      ///< C *= gelu'(aux), where aux is the forward's pre-activation (m x n)
};

/// The extra pointers an epilogue reads or writes (device memory; float for an fp32 product,
/// bf16 for a bf16 one).
struct EpilogueArgs {
  Epilogue kind = Epilogue::none;  ///< which epilogue
  const void* bias = nullptr;      ///< length n, for bias and gelu_bias
  void* aux = nullptr;             ///< m x n (row length ldc), for gelu_bias (written) and dgelu (read)
};

/// The compute precision of a product.
enum class MathMode {
  fp32,  ///< fp32 inputs and outputs, fp32 arithmetic (TF32 off): the reference path
  tf32,  ///< fp32 inputs and outputs, TF32 tensor cores
};

/// A cuBLASLt handle on the current device, with a 32 MiB workspace from the caching allocator
/// and a cache of the algorithm chosen per problem. One per rank (it is not shared across
/// threads). Throws CudaError where there is no device.
class BlasLt {
 public:
  /// Workspace bytes handed to cuBLASLt (32 MiB, what cuBLAS advises for Hopper).
  static constexpr std::size_t workspace_bytes = std::size_t{32} << 20;

  /// A handle and workspace for work on `stream`.
  explicit BlasLt(const Stream& stream) {
    detail::check(cublasLtCreate(&h_), "cublasLtCreate", "cuda::BlasLt");
    workspace_ = DeviceTensor<std::int32_t>::empty(Shape{static_cast<std::int64_t>(workspace_bytes / 4)}, stream);
  }
  BlasLt(const BlasLt&) = delete;
  BlasLt& operator=(const BlasLt&) = delete;
  /// Destroys the cached descriptors and the handle.
  ~BlasLt() {
    for (auto& [key, plan] : plans_) plan.destroy();
    if (h_ != nullptr) (void)cublasLtDestroy(h_);
  }

  /// C = alpha op(A) op(B) + beta C (row-major, see GemmShape) with `ep`, on `stream`.
  /// A and B are `In` (float or bf16), C is `Out` (float, or bf16 with bf16 inputs), the
  /// arithmetic fp32 (`mode` fp32 or tf32 for fp32 inputs). Throws CudaError naming the sizes
  /// when cuBLASLt has no algorithm or fails, tessera::Error for bad sizes.
  template <class In, class Out>
  void gemm(const Stream& stream, const GemmShape& shape, const In* a, const In* b, Out* c, float alpha = 1.f,
            float beta = 0.f, const EpilogueArgs& ep = {}, MathMode mode = MathMode::fp32) {
    const Problem p = problem(shape, a, b, c, mode);
    if (p.g.m == 0 || p.g.n == 0) return;
    std::lock_guard lock(mu_);
    Plan& plan = plan_for(p, ep.kind, shape);
    set_epilogue(plan, ep, p.out_t, p.g, shape);
    detail::check(cublasLtMatmul(h_, plan.desc, &alpha, b, plan.a, a, plan.b, &beta, c, plan.c, c, plan.c,
                                 &plan.algo, workspace_.data(), workspace_bytes, stream.get()),
                  "cublasLtMatmul", describe(shape));
  }

  /// Whether cuBLASLt has an algorithm for this product with epilogue `kind` at these operands'
  /// alignment (plans it if not yet planned; a problem without one is remembered as such).
  /// Where it has none, ops::gemm_epilogue runs the product plain and the epilogue as a kernel.
  template <class In, class Out>
  bool supports(const GemmShape& shape, Epilogue kind, const In* a, const In* b, const Out* c,
                MathMode mode = MathMode::fp32) {
    const Problem p = problem(shape, a, b, c, mode);
    if (p.g.m == 0 || p.g.n == 0) return true;
    std::lock_guard lock(mu_);
    const Key key = key_of(p, kind);
    if (unsupported_.count(key) != 0) return false;
    try {
      (void)plan_for(p, kind, shape);
      return true;
    } catch (const CudaError& e) {
      // No algorithm, or an epilogue attribute this cuBLASLt refuses for these types.
      if (kind == Epilogue::none && e.code() != static_cast<int>(CUBLAS_STATUS_NOT_SUPPORTED)) throw;
      unsupported_.insert(key);
      return false;
    }
  }

  /// gemm() with epilogue `ep` where cuBLASLt takes it; false, with nothing run, where it does
  /// not: no algorithm for this product and epilogue (supports()), a bias or aux pointer not
  /// 16-byte aligned or a GELU aux row length (ldc) not a multiple of 8 (cuBLASLt's
  /// requirements), or cublasLtMatmul itself refusing the epilogue (CUBLAS_STATUS_NOT_SUPPORTED
  /// or INVALID_VALUE; the problem is then remembered as unsupported, so it is asked once).
  /// ops::gemm_epilogue then runs the plain product and the epilogue as a kernel. Other failures
  /// throw as gemm().
  template <class In, class Out>
  bool try_gemm(const Stream& stream, const GemmShape& shape, const In* a, const In* b, Out* c, float alpha,
                float beta, const EpilogueArgs& ep, MathMode mode = MathMode::fp32) {
    if (ep.kind == Epilogue::none) {
      gemm(stream, shape, a, b, c, alpha, beta, ep, mode);
      return true;
    }
    const auto aligned16 = [](const void* q) { return q == nullptr || reinterpret_cast<std::uintptr_t>(q) % 16 == 0; };
    if (!aligned16(ep.bias) || !aligned16(ep.aux)) return false;
    if ((ep.kind == Epilogue::gelu_bias || ep.kind == Epilogue::dgelu) && (shape.ldc ? shape.ldc : shape.n) % 8 != 0)
      return false;
    if (!supports(shape, ep.kind, a, b, c, mode)) return false;
    const Problem p = problem(shape, a, b, c, mode);
    if (p.g.m == 0 || p.g.n == 0) return true;
    std::lock_guard lock(mu_);
    Plan& plan = plan_for(p, ep.kind, shape);
    set_epilogue(plan, ep, p.out_t, p.g, shape);
    const cublasStatus_t st = cublasLtMatmul(h_, plan.desc, &alpha, b, plan.a, a, plan.b, &beta, c, plan.c, c, plan.c,
                                             &plan.algo, workspace_.data(), workspace_bytes, stream.get());
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
      const Key key = key_of(p, ep.kind);
      plans_.at(key).destroy();
      plans_.erase(key);
      unsupported_.insert(key);
      return false;
    }
    detail::check(st, "cublasLtMatmul", describe(shape));
    return true;
  }

  /// Number of distinct problems planned so far (each asked cuBLASLt's heuristic once).
  std::size_t plans() const noexcept { return plans_.size(); }

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    void destroy() noexcept {
      if (desc) (void)cublasLtMatmulDescDestroy(desc);
      if (a) (void)cublasLtMatrixLayoutDestroy(a);
      if (b) (void)cublasLtMatrixLayoutDestroy(b);
      if (c) (void)cublasLtMatrixLayoutDestroy(c);
    }
  };
  using Key = std::tuple<bool, bool, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                         std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, int, int, int, int,
                         std::uint32_t, std::uint32_t, std::uint32_t>;

  // One product as cuBLASLt sees it: the column-major problem, its types and the operands'
  // alignment. cuBLASLt assumes 256-byte aligned operands unless told less: these say what they
  // are (a pointer into a flat buffer, heads side by side in a row), so it picks kernels valid
  // for them.
  struct Problem {
    ColumnMajorGemm g;
    cudaDataType_t in_t, out_t;
    cublasComputeType_t compute;
    std::uint32_t align_a, align_b, align_c;
  };
  template <class In, class Out>
  static Problem problem(const GemmShape& shape, const In* a, const In* b, const Out* c, MathMode mode) {
    static_assert(std::is_same_v<In, float> || std::is_same_v<In, bf16>, "cuda gemm: inputs are float or bf16");
    static_assert(std::is_same_v<Out, float> || std::is_same_v<Out, bf16>, "cuda gemm: outputs are float or bf16");
    Problem p;
    p.g = to_column_major(shape);
    p.in_t = std::is_same_v<In, float> ? CUDA_R_32F : CUDA_R_16BF;
    p.out_t = std::is_same_v<Out, float> ? CUDA_R_32F : CUDA_R_16BF;
    p.compute = (std::is_same_v<In, float> && mode == MathMode::tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    p.align_a = alignment(b, sizeof(In), p.g.batch > 1 ? p.g.stride_a : 0);  // A' is the row-major B
    p.align_b = alignment(a, sizeof(In), p.g.batch > 1 ? p.g.stride_b : 0);
    p.align_c = alignment(c, sizeof(Out), p.g.batch > 1 ? p.g.stride_c : 0);
    return p;
  }

  static Key key_of(const Problem& p, Epilogue ep) {
    const ColumnMajorGemm& g = p.g;
    return Key{g.trans_a, g.trans_b, g.m,        g.n,        g.k,        g.lda,          g.ldb,          g.ldc,
               g.batch,   g.stride_a, g.stride_b, g.stride_c, static_cast<int>(p.in_t), static_cast<int>(p.out_t),
               static_cast<int>(p.compute), static_cast<int>(ep), p.align_a, p.align_b, p.align_c};
  }

  // The largest power of two, at most 256, dividing the address and the batch stride in bytes.
  static std::uint32_t alignment(const void* p, std::size_t elem, std::int64_t stride) {
    std::uint64_t bits = reinterpret_cast<std::uintptr_t>(p) | 256u;
    if (stride != 0) bits |= static_cast<std::uint64_t>(stride) * elem;
    return static_cast<std::uint32_t>(bits & (~bits + 1));
  }

  static std::string describe(const GemmShape& s) {
    return tessera::detail::str("cuda gemm m ", s.m, " n ", s.n, " k ", s.k, " (trans_a ", s.trans_a, ", trans_b ",
                                s.trans_b, ", batch ", s.batch, ")");
  }

  static cublasLtEpilogue_t epilogue_of(Epilogue e) {
    switch (e) {
      case Epilogue::bias: return CUBLASLT_EPILOGUE_BIAS;
      case Epilogue::gelu_bias: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
      case Epilogue::dgelu: return CUBLASLT_EPILOGUE_DGELU;
      case Epilogue::none: break;
    }
    return CUBLASLT_EPILOGUE_DEFAULT;
  }

  Plan& plan_for(const Problem& prob, Epilogue ep, const GemmShape& shape) {
    const ColumnMajorGemm& g = prob.g;
    const cudaDataType_t in_t = prob.in_t, out_t = prob.out_t;
    const std::uint32_t align_a = prob.align_a, align_b = prob.align_b, align_c = prob.align_c;
    const Key key = key_of(prob, ep);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    Plan p;
    const std::string what = describe(shape);
    detail::check(cublasLtMatmulDescCreate(&p.desc, prob.compute, CUDA_R_32F), "cublasLtMatmulDescCreate", what);
    const cublasOperation_t op_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    detail::check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a),
                  "cublasLtMatmulDescSetAttribute(TRANSA)", what);
    detail::check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b),
                  "cublasLtMatmulDescSetAttribute(TRANSB)", what);
    const cublasLtEpilogue_t e = epilogue_of(ep);
    detail::check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e),
                  "cublasLtMatmulDescSetAttribute(EPILOGUE)", what);
    auto layout = [&](cublasLtMatrixLayout_t& l, cudaDataType_t t, std::int64_t rows, std::int64_t cols,
                      std::int64_t ld, std::int64_t stride) {
      detail::check(cublasLtMatrixLayoutCreate(&l, t, static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(cols),
                                               ld),
                    "cublasLtMatrixLayoutCreate", what);
      if (g.batch > 1) {
        const int count = static_cast<int>(g.batch);
        detail::check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count),
                      "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)", what);
        detail::check(
            cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride),
            "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)", what);
      }
    };
    layout(p.a, in_t, g.rows_a, g.cols_a, g.lda, g.stride_a);
    layout(p.b, in_t, g.rows_b, g.cols_b, g.ldb, g.stride_b);
    layout(p.c, out_t, g.m, g.n, g.ldc, g.stride_c);
    if (ep != Epilogue::none) set_placeholder_epilogue(p, ep, out_t, g, what);
    cublasLtMatmulPreference_t pref = nullptr;
    detail::check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate", what);
    const std::size_t ws = workspace_bytes;
    (void)cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    (void)cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof align_a);
    (void)cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof align_b);
    (void)cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof align_c);
    (void)cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof align_c);
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(h_, p.desc, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
    (void)cublasLtMatmulPreferenceDestroy(pref);
    if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
      p.destroy();
      detail::check(s == CUBLAS_STATUS_SUCCESS ? CUBLAS_STATUS_NOT_SUPPORTED : s, "cublasLtMatmulAlgoGetHeuristic",
                    what, " (no algorithm)");
    }
    p.algo = result.algo;
    return plans_.emplace(key, p).first->second;
  }

  // The heuristic needs the epilogue's attributes present; real pointers are set per call.
  void set_placeholder_epilogue(Plan& p, Epilogue ep, cudaDataType_t out_t, const ColumnMajorGemm& g,
                                const std::string& what) {
    if (ep == Epilogue::gelu_bias || ep == Epilogue::dgelu) {
      const std::int64_t ld = g.ldc;
      detail::check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof ld),
                    "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_LD)", what);
      detail::check(
          cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &out_t, sizeof out_t),
          "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_DATA_TYPE)", what);
    }
    if (ep == Epilogue::bias || ep == Epilogue::gelu_bias) {
      detail::check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out_t, sizeof out_t),
                    "cublasLtMatmulDescSetAttribute(BIAS_DATA_TYPE)", what);
    }
  }

  void set_epilogue(Plan& p, const EpilogueArgs& ep, cudaDataType_t, const ColumnMajorGemm&, const GemmShape& shape) {
    if (ep.kind == Epilogue::none) return;
    const std::string what = describe(shape);
    if (ep.kind == Epilogue::bias || ep.kind == Epilogue::gelu_bias) {
      TESSERA_EXPECTS(ep.bias != nullptr, what, ": the bias epilogue needs a bias pointer");
      detail::check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ep.bias, sizeof ep.bias),
                    "cublasLtMatmulDescSetAttribute(BIAS_POINTER)", what);
    }
    if (ep.kind == Epilogue::gelu_bias || ep.kind == Epilogue::dgelu) {
      TESSERA_EXPECTS(ep.aux != nullptr, what, ": the GELU epilogues need an aux pointer (m x n)");
      detail::check(
          cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &ep.aux, sizeof ep.aux),
          "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_POINTER)", what);
    }
  }

  cublasLtHandle_t h_ = nullptr;
  DeviceTensor<std::int32_t> workspace_;
  std::mutex mu_;
  std::map<Key, Plan> plans_;
  std::set<Key> unsupported_;
};

}  // namespace tessera::cuda
