#pragma once
/// @file
/// Embedding lookup on the device, as nn::Embedding: out[i, :] (+)= weight[ids[i], :]; backward
/// adds each row of dy into the gradient row of its id, deterministically: the ids are sorted
/// with their positions (CUB radix sort, stable), then one block per distinct id sums its rows in
/// position order. An id equal to the table's row count stands for "not in this table" (a
/// vocabulary-parallel rank's view of another rank's token, vocab_local_ids): it reads as a zero
/// row and takes no gradient. CUDA code.

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
template <class T>
__global__ void embedding_forward(const std::int32_t* ids, const T* weight, T* out, int C, bool accumulate,
                                  std::int64_t rows) {
  const std::int64_t i = blockIdx.x;
  const bool in_table = ids[i] < rows;  // ids[i] == rows: not in this table (a zero row)
  const T* wr = weight + static_cast<std::int64_t>(in_table ? ids[i] : 0) * C;
  T* o = out + i * C;
  for (int c = static_cast<int>(threadIdx.x); c < C; c += static_cast<int>(blockDim.x))
    store_from_f32(o + c, (accumulate ? load_f32(o[c]) : 0.f) + (in_table ? load_f32(wr[c]) : 0.f));
}
// local[i] = ids[i] - lo for ids in [lo, lo + count), else `rows` (not in this rank's table).
template <int = 0>
__global__ void vocab_local_ids(const std::int32_t* ids, std::int32_t* local, std::int64_t n, std::int32_t lo,
                                std::int32_t count, std::int32_t rows) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) local[i] = ids[i] >= lo && ids[i] < lo + count ? ids[i] - lo : rows;
}
// A template (of nothing) so that the header defines it in every translation unit (ODR).
template <int = 0>
__global__ void iota(std::int32_t* p, std::int64_t n) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = static_cast<std::int32_t>(i);
}
// Block i handles the run of equal ids starting at sorted position i (other blocks exit).
template <class T>
__global__ void embedding_backward_runs(const std::int32_t* sorted_ids, const std::int32_t* sorted_pos, const T* dy,
                                        float* dweight, std::int64_t n, int C, std::int64_t rows) {
  const std::int64_t i = blockIdx.x;
  const std::int32_t id = sorted_ids[i];
  if ((i > 0 && sorted_ids[i - 1] == id) || id >= rows) return;  // id == rows: not in this table
  for (int c = static_cast<int>(threadIdx.x); c < C; c += static_cast<int>(blockDim.x)) {
    float s = 0.f;
    for (std::int64_t j = i; j < n && sorted_ids[j] == id; ++j) s += load_f32(dy[static_cast<std::int64_t>(sorted_pos[j]) * C + c]);
    dweight[static_cast<std::int64_t>(id) * C + c] += s;
  }
}
}  // namespace kernels

/// out[i, :] = weight[ids[i], :] (or += with `accumulate`, e.g. positions onto tokens). ids:
/// any shape of n elements in [0, V], V meaning a zero row (not checked on the device: the
/// caller checks its ids on the host, as the data loader does); weight (V x C); out (n x C).
/// Throws tessera::Error naming the shapes when they disagree.
template <class T>
void embedding_forward(const Stream& s, DeviceView<const std::int32_t> ids, DeviceView<const T> weight, DeviceView<T> out,
                       bool accumulate = false) {
  const std::int64_t C = weight.size(-1), n = ids.numel();
  TESSERA_EXPECTS(out.numel() == n * C, "cuda embedding_forward: ids ", ids.shape, ", weight ", weight.shape, ", out ",
                  out.shape, " do not agree");
  if (n == 0) return;
  kernels::embedding_forward<T><<<static_cast<unsigned>(n), 256, 0, s.get()>>>(
      ids.data, weight.data, out.data, static_cast<int>(C), accumulate, weight.numel() / (C ? C : 1));
  cuda::detail::check_launch("embedding_forward", "cuda embedding_forward of ids ", ids.shape);
}

/// dweight[ids[i], :] += dy[i, :] for every i with ids[i] < V, summed per id in position order
/// (bitwise reproducible); ids equal to V are skipped. dweight fp32 (V x C). Temporary memory comes from the device's caching
/// allocator. Throws tessera::Error naming the shapes, CudaError for CUB's failures.
template <class T>
void embedding_backward(const Stream& s, DeviceView<const std::int32_t> ids, DeviceView<const T> dy,
                        DeviceView<float> dweight) {
  const std::int64_t C = dweight.size(-1), n = ids.numel(), V = dweight.numel() / (C ? C : 1);
  TESSERA_EXPECTS(dy.numel() == n * C, "cuda embedding_backward: ids ", ids.shape, ", dy ", dy.shape, ", dweight ",
                  dweight.shape, " do not agree");
  if (n == 0) return;
  auto pos = DeviceTensor<std::int32_t>::empty(Shape{n}, s);
  auto sorted_ids = DeviceTensor<std::int32_t>::empty(Shape{n}, s);
  auto sorted_pos = DeviceTensor<std::int32_t>::empty(Shape{n}, s);
  kernels::iota<><<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, s.get()>>>(pos.data(), n);
  cuda::detail::check_launch("iota", "cuda embedding_backward");
  int end_bit = 1;
  while (end_bit < 31 && (std::int64_t{1} << end_bit) <= V) ++end_bit;  // the keys span [0, V]
  std::size_t temp_bytes = 0;
  cuda::detail::check(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, ids.data, sorted_ids.data(), pos.data(),
                                                      sorted_pos.data(), n, 0, end_bit, s.get()),
                      "cub::DeviceRadixSort::SortPairs", "cuda embedding_backward of ", n, " ids");
  auto temp = DeviceTensor<std::int32_t>::empty(Shape{static_cast<std::int64_t>(temp_bytes / 4 + 1)}, s);
  cuda::detail::check(cub::DeviceRadixSort::SortPairs(temp.data(), temp_bytes, ids.data, sorted_ids.data(), pos.data(),
                                                      sorted_pos.data(), n, 0, end_bit, s.get()),
                      "cub::DeviceRadixSort::SortPairs", "cuda embedding_backward of ", n, " ids");
  kernels::embedding_backward_runs<T><<<static_cast<unsigned>(n), 128, 0, s.get()>>>(
      sorted_ids.data(), sorted_pos.data(), dy.data, dweight.data, n, static_cast<int>(C), V);
  cuda::detail::check_launch("embedding_backward_runs", "cuda embedding_backward of ids ", ids.shape);
}

/// A vocabulary-parallel rank's view of `ids` (n elements in [0, vocabulary)): local[i] =
/// ids[i] - lo for the ids of its rows [lo, lo + count), else `rows` (its table's row count: "not
/// here", which embedding_forward reads as a zero row and embedding_backward skips). Megatron's
/// VocabParallelEmbedding masks the same way. Throws tessera::Error naming the numbers when the
/// sizes differ or count exceeds rows.
inline void vocab_local_ids(const Stream& s, DeviceView<const std::int32_t> ids, DeviceView<std::int32_t> local,
                            std::int64_t lo, std::int64_t count, std::int64_t rows) {
  TESSERA_EXPECTS(ids.numel() == local.numel() && lo >= 0 && count >= 0 && count <= rows && lo + rows < (std::int64_t{1} << 31),
                  "cuda vocab_local_ids: ids ", ids.shape, ", local ", local.shape, ", rows [", lo, ", ", lo + count,
                  ") of a table of ", rows);
  const std::int64_t n = ids.numel();
  if (n == 0) return;
  kernels::vocab_local_ids<><<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, s.get()>>>(
      ids.data, local.data, n, static_cast<std::int32_t>(lo), static_cast<std::int32_t>(count),
      static_cast<std::int32_t>(rows));
  cuda::detail::check_launch("vocab_local_ids", "cuda vocab_local_ids of ", n, " ids");
}

}  // namespace tessera::cuda::ops
