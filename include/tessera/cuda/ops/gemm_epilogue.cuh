#pragma once
/// @file
/// gemm_epilogue: a cuBLASLt product with its bias / GELU / dGELU epilogue fused where cuBLASLt
/// has an algorithm for it and takes it (BlasLt::try_gemm), and otherwise the plain product followed by the
/// epilogue as an element-wise kernel (the same arithmetic as the CPU layers: cuda::math), so a
/// library version or a type combination without the fused epilogue still trains. CUDA code.

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
// c[i, j] (+)= bias[j]; then, for gelu_bias, aux = c and c = gelu(aux). Row length ldc.
template <class T>
__global__ void epilogue_bias_gelu(T* c, T* aux, const T* bias, std::int64_t m, std::int64_t n, std::int64_t ldc,
                                   bool gelu) {
  const std::int64_t count = m * n;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / n, j = i % n, at = r * ldc + j;
    const float pre = load_f32(c[at]) + (bias != nullptr ? load_f32(bias[j]) : 0.f);
    if (gelu) {
      store_from_f32(aux + at, pre);
      store_from_f32(c + at, math::gelu(load_f32(aux[at])));  // gelu of the stored (rounded) value
    } else {
      store_from_f32(c + at, pre);
    }
  }
}
// c = gelu'(aux) * c.
template <class T>
__global__ void epilogue_dgelu(T* c, const T* aux, std::int64_t m, std::int64_t n, std::int64_t ldc) {
  const std::int64_t count = m * n;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t at = (i / n) * ldc + i % n;
    store_from_f32(c + at, math::gelu_backward(load_f32(aux[at]), load_f32(c[at])));
  }
}
inline unsigned epilogue_blocks(std::int64_t n) {
  const std::int64_t b = ceil_div(n, 256);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}
}  // namespace kernels

/// C = alpha op(A) op(B) + beta C, then `ep` (see Epilogue), all of type T, one product (batch
/// 1). Fused by cuBLASLt where it can; else the product, then one element-wise kernel. Returns
/// whether the epilogue was fused. Throws what BlasLt::gemm throws.
template <class T>
bool gemm_epilogue(const Stream& s, BlasLt& blas, const GemmShape& shape, const T* a, const T* b, T* c, float alpha,
                   float beta, const EpilogueArgs& ep) {
  TESSERA_EXPECTS(shape.batch == 1, "cuda gemm_epilogue: batched products take no epilogue here (batch ", shape.batch,
                  ")");
  if (blas.try_gemm(s, shape, a, b, c, alpha, beta, ep)) return true;
  blas.gemm(s, shape, a, b, c, alpha, beta);
  const std::int64_t ldc = shape.ldc ? shape.ldc : shape.n;
  const unsigned blocks = kernels::epilogue_blocks(shape.m * shape.n);
  if (ep.kind == Epilogue::dgelu) {
    kernels::epilogue_dgelu<T><<<blocks, 256, 0, s.get()>>>(c, static_cast<const T*>(ep.aux), shape.m, shape.n, ldc);
    cuda::detail::check_launch("epilogue_dgelu", "cuda gemm_epilogue m ", shape.m, " n ", shape.n);
  } else {
    kernels::epilogue_bias_gelu<T><<<blocks, 256, 0, s.get()>>>(c, static_cast<T*>(ep.aux), static_cast<const T*>(ep.bias),
                                                               shape.m, shape.n, ldc, ep.kind == Epilogue::gelu_bias);
    cuda::detail::check_launch("epilogue_bias_gelu", "cuda gemm_epilogue m ", shape.m, " n ", shape.n);
  }
  return false;
}

}  // namespace tessera::cuda::ops
