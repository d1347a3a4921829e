#pragma once
/// @file
/// Device helpers shared by tessera's kernels: fp32 loads and stores of float or bf16 storage,
/// warp and block reductions in a fixed order (so every kernel is bitwise reproducible run to
/// run), and the launch check. CUDA code: compile with nvcc.
#if !defined(__CUDACC__)
#error "tessera/cuda/ops/*.cuh are CUDA code: compile them with nvcc (Meson: a .cu source)"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tessera::cuda::ops {

/// Threads per warp.
inline constexpr int warp_size = 32;

/// x widened to fp32.
__device__ __forceinline__ float load_f32(float x) { return x; }
/// x widened to fp32 (exact).
__device__ __forceinline__ float load_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
/// Stores fp32 `v` as T (bf16: round to nearest even).
template <class T>
__device__ __forceinline__ void store_from_f32(T* p, float v) {
  if constexpr (sizeof(T) == 2)
    *p = __float2bfloat16(v);
  else
    *p = v;
}

/// The sum of `v` over the warp, in butterfly order (the same on every run); every lane gets it.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = warp_size / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// The maximum of `v` over the warp; every lane gets it.
__device__ __forceinline__ float warp_max(float v) {
  for (int o = warp_size / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// The sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets
/// it. `scratch` is shared memory of 32 floats; the block synchronizes twice.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) % warp_size, warp = static_cast<int>(threadIdx.x) / warp_size;
  const int warps = static_cast<int>(blockDim.x) / warp_size;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(t);
}

/// The maximum of `v` over the block, as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) % warp_size, warp = static_cast<int>(threadIdx.x) / warp_size;
  const int warps = static_cast<int>(blockDim.x) / warp_size;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(t);
}

/// ceil(a / b) for positive b.
__host__ __device__ constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace tessera::cuda::ops
