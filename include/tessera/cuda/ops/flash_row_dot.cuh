#pragma once
/// @file
/// D = dy . y per query row and head of the fused attention's backward (both forms,
/// ops/flash_attention.cuh and ops/flash_attention_mma.cuh): D[b, h, t] over the head's hd
/// elements, fp32, a thread per (b, h, t), summed in element order. CUDA code.

#include <cuda_runtime.h>

#include <cstdint>

#include "tessera/cuda/ops/reduce.cuh"

namespace tessera::cuda::ops::kernels {

// D[b, h, t] = dy . y over the head's elements, a thread per (b, h, t).
template <class T>
__global__ void flash_attention_row_dot(const T* dy, const T* y, float* D, int B, int H, int Tn, int C, int hd) {
  const std::int64_t n = static_cast<std::int64_t>(B) * H * Tn;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t t = i % Tn, h = (i / Tn) % H, b = i / (static_cast<std::int64_t>(Tn) * H);
    const std::int64_t at = (b * Tn + t) * C + h * hd;
    float d = 0.f;
    for (int e = 0; e < hd; ++e) d += load_f32(dy[at + e]) * load_f32(y[at + e]);
    D[i] = d;
  }
}

}  // namespace tessera::cuda::ops::kernels
