#pragma once
/// @file
/// AdamW over all parameters in one launch: parameters, gradients and both moments live in flat
/// fp32 buffers (the master weights), cut into chunks that each lie in one parameter; each chunk
/// knows its parameter group (weight decay or not). The element step is cuda::math::adamw_update,
/// checked on the host against optim::AdamW. Optionally writes a bf16 copy of the updated
/// weights for the mixed-precision forward. CUDA code.

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

/// Most parameter groups one AdamW launch takes.
inline constexpr int adamw_max_groups = 4;

/// The per-step scalars of every group, passed by value to the kernel.
struct AdamWGroupScalars {
  math::AdamWScalars group[adamw_max_groups];  ///< indexed by group id
};

/// The chunk table of one flat parameter buffer: chunk c covers elements [begin[c], end[c]) of
/// group group_of[c]. Built once on the host (adamw_chunks) and copied to the device.
struct AdamWChunks {
  DeviceTensor<std::int32_t> table;  ///< (chunks, 5): begin lo/hi, end lo/hi, group
  std::int64_t chunks = 0;           ///< number of chunks
};

/// One parameter's place in the flat buffer: elements [offset, offset + numel), its group.
struct FlatSegment {
  std::int64_t offset = 0;  ///< first element
  std::int64_t numel = 0;   ///< element count
  int group = 0;            ///< parameter group, in [0, adamw_max_groups)
};

/// The chunk table for `segments` (chunks of at most `chunk` elements, none crossing a
/// segment), copied to the device on `s`. Throws tessera::Error for a group out of range or
/// segments that overlap or leave the buffer's order.
inline AdamWChunks adamw_chunks(const Stream& s, const std::vector<FlatSegment>& segments, std::int64_t chunk = 4096) {
  std::vector<std::int32_t> t;
  std::int64_t last_end = 0, count = 0;
  for (const FlatSegment& g : segments) {
    TESSERA_EXPECTS(g.group >= 0 && g.group < adamw_max_groups, "cuda adamw: group ", g.group, " is not in [0, ",
                    adamw_max_groups, ")");
    TESSERA_EXPECTS(g.offset >= last_end && g.numel >= 0, "cuda adamw: segment at ", g.offset, " of ", g.numel,
                    " elements overlaps the previous one, which ends at ", last_end);
    for (std::int64_t b = g.offset; b < g.offset + g.numel; b += chunk) {
      const std::int64_t e = b + chunk < g.offset + g.numel ? b + chunk : g.offset + g.numel;
      t.insert(t.end(), {static_cast<std::int32_t>(b & 0x7fffffff), static_cast<std::int32_t>(b >> 31),
                         static_cast<std::int32_t>(e & 0x7fffffff), static_cast<std::int32_t>(e >> 31), g.group});
      ++count;
    }
    last_end = g.offset + g.numel;
  }
  AdamWChunks c;
  c.chunks = count;
  Tensor<std::int32_t> host = Tensor<std::int32_t>::from(Shape{count, 5}, std::span<const std::int32_t>(t));
  c.table = to_device<std::int32_t>(host, s);
  return c;
}

namespace kernels {
template <class W>
__global__ void adamw(float* param, const float* grad, float* m, float* v, W* low_precision_copy,
                      const std::int32_t* table, AdamWGroupScalars scalars, float grad_scale) {
  const std::int32_t* row = table + static_cast<std::int64_t>(blockIdx.x) * 5;
  const std::int64_t begin = static_cast<std::int64_t>(row[0]) | (static_cast<std::int64_t>(row[1]) << 31);
  const std::int64_t end = static_cast<std::int64_t>(row[2]) | (static_cast<std::int64_t>(row[3]) << 31);
  const math::AdamWScalars s = scalars.group[row[4]];
  for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float x = param[i], mi = m[i], vi = v[i];
    math::adamw_update(x, grad[i] * grad_scale, mi, vi, s);
    param[i] = x;
    m[i] = mi;
    v[i] = vi;
    if (low_precision_copy != nullptr) store_from_f32(low_precision_copy + i, x);
  }
}
}  // namespace kernels

/// One AdamW step of every parameter of the flat buffers (fp32, same length) in one launch, the
/// gradients multiplied by `grad_scale` first (1, or a clipping factor). With `copy` non-empty,
/// the updated weights are also written to it as W (bf16 for the mixed-precision forward).
/// Throws tessera::Error naming the sizes when the buffers differ in length.
template <class W = float>
void adamw_step(const Stream& s, DeviceView<float> param, DeviceView<const float> grad, DeviceView<float> m,
                DeviceView<float> v, const AdamWChunks& chunks, const AdamWGroupScalars& scalars,
                float grad_scale = 1.f, DeviceView<W> copy = {}) {
  TESSERA_EXPECTS(grad.numel() == param.numel() && m.numel() == param.numel() && v.numel() == param.numel() &&
                      (copy.data == nullptr || copy.numel() == param.numel()),
                  "cuda adamw_step: param ", param.shape, ", grad ", grad.shape, ", m ", m.shape, ", v ", v.shape,
                  ", copy ", copy.shape, " differ");
  if (chunks.chunks == 0) return;
  kernels::adamw<W><<<static_cast<unsigned>(chunks.chunks), 256, 0, s.get()>>>(
      param.data, grad.data, m.data, v.data, copy.data, chunks.table.data(), scalars, grad_scale);
  cuda::detail::check_launch("adamw", "cuda adamw_step of ", param.numel(), " parameters");
}

}  // namespace tessera::cuda::ops
