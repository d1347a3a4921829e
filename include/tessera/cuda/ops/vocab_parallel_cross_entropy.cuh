#pragma once
/// @file
/// Softmax cross-entropy over logits split by vocabulary across tp ranks, fused with the LM
/// head's output gradient, on the device (Megatron-LM's vocab-parallel cross-entropy, Shoeybi et
/// al. 2019; the CPU's VocabParallelCrossEntropy): each rank holds the logits of its vocabulary
/// rows [lo, lo + valid) (rows x ld, the columns past `valid` padding); the row maxima are
/// all-reduced (max), then the sums of exp(logit - max) and the target's logit (held by one
/// rank, 0 on the others) are all-reduced (sum), so every rank has each row's loss, logsumexp -
/// logit[target], and overwrites its logits with its columns of (softmax - onehot) * dloss. Two
/// small all-reduces (rows floats, then 2 x rows) instead of gathering rows x V logits. fp32 arithmetic
/// over float or bf16 logits. CUDA code.

#include <cuda_runtime.h>

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/cuda_error.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
// Block per row: mx[row] = max of its first `valid` logits (-inf when there are none).
template <class T>
__global__ void vocab_row_max(const T* logits, int valid, int ld, float* mx) {
  __shared__ float scratch[32];
  const T* lr = logits + static_cast<std::int64_t>(blockIdx.x) * ld;
  float m = -INFINITY;
  for (int j = static_cast<int>(threadIdx.x); j < valid; j += static_cast<int>(blockDim.x)) m = fmaxf(m, load_f32(lr[j]));
  m = block_max(m, scratch);
  if (threadIdx.x == 0) mx[blockIdx.x] = m;
}
// Block per row: se[row] = sum over its valid logits of exp(logit - mx[row]); tl[row] = the
// target's logit where this rank holds the target, else 0.
template <class T>
__global__ void vocab_row_sums(const T* logits, const std::int32_t* targets, int lo, int valid, int ld, const float* mx,
                               float* se, float* tl) {
  __shared__ float scratch[32];
  const std::int64_t row = blockIdx.x;
  const T* lr = logits + row * ld;
  const float m = mx[row];
  float s = 0.f;
  for (int j = static_cast<int>(threadIdx.x); j < valid; j += static_cast<int>(blockDim.x)) s += expf(load_f32(lr[j]) - m);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    se[row] = s;
    const int t = targets[row] - lo;
    tl[row] = t >= 0 && t < valid ? load_f32(lr[t]) : 0.f;
  }
}
// Block per row: the loss, and with write_grad this rank's columns of the gradient in place
// (padding columns 0).
template <class T>
__global__ void vocab_loss_grad(T* logits, const std::int32_t* targets, int lo, int valid, int ld, const float* mx,
                                const float* se, const float* tl, float* losses, float dloss, int ignore_index,
                                bool write_grad) {
  const std::int64_t row = blockIdx.x;
  T* lr = logits + row * ld;
  const int target = targets[row];
  const bool counted = target != ignore_index;
  const float m = mx[row], s = se[row];
  if (threadIdx.x == 0) losses[row] = counted ? logf(s) + m - tl[row] : 0.f;
  if (!write_grad) return;
  const float scale = counted ? dloss : 0.f;
  const int t = target - lo;
  for (int j = static_cast<int>(threadIdx.x); j < ld; j += static_cast<int>(blockDim.x)) {
    const float g = j < valid ? (expf(load_f32(lr[j]) - m) / s - (j == t ? 1.f : 0.f)) * scale : 0.f;
    store_from_f32(lr + j, g);
  }
}
}  // namespace kernels

/// The vocab-parallel loss of `logits` (rows x ld: this rank's vocabulary columns, the global
/// ids [lo, lo + valid) in its first `valid` columns, the rest padding) against `targets` (rows;
/// global ids in [0, V) or ignore_index, checked on the host by the caller): losses[r] (the same
/// on every rank; 0 for ignore_index) and, with `dloss` given (the loss's gradient per row), the
/// logits overwritten by this rank's columns of the gradient. `stats`: 3 x rows floats of
/// scratch. Collective over `tp` (two all-reduces, stream-ordered on tp.stream(), which must
/// be `s`). Throws tessera::Error naming the shapes when they disagree.
template <class T>
void vocab_parallel_cross_entropy(const Stream& s, DeviceComm& tp, DeviceView<T> logits, std::int64_t lo,
                                  std::int64_t valid, DeviceView<const std::int32_t> targets, DeviceView<float> losses,
                                  DeviceView<float> stats, const float* dloss = nullptr, int ignore_index = -100) {
  const std::int64_t ld = logits.size(-1), rows = logits.numel() / (ld ? ld : 1);
  TESSERA_EXPECTS(valid >= 0 && valid <= ld && lo >= 0 && targets.numel() == rows && losses.numel() == rows &&
                      stats.numel() == 3 * rows && tp.stream().get() == s.get(),
                  "cuda vocab_parallel_cross_entropy: logits ", logits.shape, " (columns [", lo, ", ", lo + valid,
                  ")), targets ", targets.shape, ", losses ", losses.shape, ", stats ", stats.shape,
                  " do not agree, or the tp communicator runs on another stream");
  float* mx = stats.data;
  float* se = mx + rows;
  float* tl = se + rows;
  const auto blocks = static_cast<unsigned>(rows);
  if (rows > 0) {
    kernels::vocab_row_max<T><<<blocks, 512, 0, s.get()>>>(logits.data, static_cast<int>(valid), static_cast<int>(ld), mx);
    cuda::detail::check_launch("vocab_row_max", "cuda vocab_parallel_cross_entropy of logits ", logits.shape);
  }
  tp.all_reduce(DeviceView<float>(mx, Shape{rows}), ReduceOp::max);
  if (rows > 0) {
    kernels::vocab_row_sums<T><<<blocks, 512, 0, s.get()>>>(logits.data, targets.data, static_cast<int>(lo),
                                                            static_cast<int>(valid), static_cast<int>(ld), mx, se, tl);
    cuda::detail::check_launch("vocab_row_sums", "cuda vocab_parallel_cross_entropy of logits ", logits.shape);
  }
  tp.all_reduce(DeviceView<float>(se, Shape{2 * rows}), ReduceOp::sum);  // se and tl, adjacent
  if (rows == 0) return;
  kernels::vocab_loss_grad<T><<<blocks, 512, 0, s.get()>>>(logits.data, targets.data, static_cast<int>(lo),
                                                           static_cast<int>(valid), static_cast<int>(ld), mx, se, tl,
                                                           losses.data, dloss ? *dloss : 0.f, ignore_index,
                                                           dloss != nullptr);
  cuda::detail::check_launch("vocab_loss_grad", "cuda vocab_parallel_cross_entropy of logits ", logits.shape);
}

}  // namespace tessera::cuda::ops
