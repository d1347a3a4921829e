#pragma once
/// @file
/// convert_from_f32: an fp32 device buffer rewritten in another element type (bf16: round to
/// nearest even, as to_device<bf16> rounds on the host), e.g. the mixed-precision compute copy
/// of the master weights after ZeRO-1 gathered them; convert_to_f32 the reverse (exact). CUDA
/// code.

#include <algorithm>
#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
template <class W>
__global__ void convert_from_f32(const float* in, W* out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_from_f32(out + i, in[i]);
}
template <class W>
__global__ void convert_to_f32(const W* in, float* out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = load_f32(in[i]);
}
}  // namespace kernels

/// out[i] = in[i] as W for every element, on `s`. Throws tessera::Error naming the sizes when
/// they differ.
template <class W>
void convert_from_f32(const Stream& s, DeviceView<const float> in, DeviceView<W> out) {
  TESSERA_EXPECTS(in.numel() == out.numel(), "cuda convert_from_f32: ", in.numel(), " elements into ", out.numel());
  if (in.numel() == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((in.numel() + 255) / 256, 4096));
  kernels::convert_from_f32<W><<<blocks, 256, 0, s.get()>>>(in.data, out.data, in.numel());
  cuda::detail::check_launch("convert_from_f32", "cuda convert_from_f32 of ", in.numel(), " elements");
}

/// out[i] = in[i] as fp32 for every element, on `s` (exact). Throws tessera::Error naming the
/// sizes when they differ.
template <class W>
void convert_to_f32(const Stream& s, DeviceView<const W> in, DeviceView<float> out) {
  TESSERA_EXPECTS(in.numel() == out.numel(), "cuda convert_to_f32: ", in.numel(), " elements into ", out.numel());
  if (in.numel() == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((in.numel() + 255) / 256, 4096));
  kernels::convert_to_f32<W><<<blocks, 256, 0, s.get()>>>(in.data, out.data, in.numel());
  cuda::detail::check_launch("convert_to_f32", "cuda convert_to_f32 of ", in.numel(), " elements");
}

}  // namespace tessera::cuda::ops
