#pragma once
/// @file
/// Dropout on the device with the CPU layer's masks (tessera::Dropout, counter-based): element i
/// of a (rows, inner) activation whose first row is row0 of the global batch has global index
/// (row0 + r) * inner + j and is kept when cuda::math::dropout_keep(key, g, threshold); kept
/// elements are scaled by 1 / (1 - p). The mask is never stored: backward draws it again. CUDA code.

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

/// The masks of one Dropout call: its key and threshold (Dropout::mask_key, keep_threshold),
/// the scale 1 / (1 - p), and the global index of the first element (row0 * inner).
struct DropoutMask {
  std::uint64_t key = 0;        ///< Dropout::mask_key(BatchPosition)
  std::uint64_t threshold = 0;  ///< Dropout::keep_threshold(); 0 keeps everything
  float scale = 1.f;            ///< 1 / (1 - p)
  std::uint64_t first = 0;      ///< global index of element 0: first_row * elements per row
};

namespace kernels {
template <class T>
__global__ void dropout_apply(T* x, std::int64_t n, DropoutMask m) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const bool keep = math::dropout_keep(m.key, m.first + static_cast<std::uint64_t>(i), m.threshold);
    store_from_f32(x + i, keep ? load_f32(x[i]) * m.scale : 0.f);
  }
}
}  // namespace kernels

/// x *= mask * scale in place (forward on the activation, backward on its gradient: the same
/// call). Does nothing when the threshold is 0 (p = 0).
template <class T>
void dropout_apply(const Stream& s, DeviceView<T> x, const DropoutMask& m) {
  if (m.threshold == 0 || x.numel() == 0) return;
  const std::int64_t b = ceil_div(x.numel(), 256);
  kernels::dropout_apply<T><<<static_cast<unsigned>(b > 65535 ? 65535 : b), 256, 0, s.get()>>>(x.data, x.numel(), m);
  cuda::detail::check_launch("dropout_apply", "cuda dropout of ", x.shape);
}

}  // namespace tessera::cuda::ops
