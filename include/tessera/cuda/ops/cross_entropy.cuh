#pragma once
/// @file
/// Softmax cross-entropy fused with the LM head's output gradient, on the device: one block per
/// row computes the row's loss (logsumexp - logit[target]) and overwrites the logits with
/// dL/dlogits = (softmax - onehot) * dloss, so the (rows x V) probabilities are never stored
/// apart (llm.c fuses it the same way). Targets equal to `ignore_index` give no loss and a zero
/// gradient row, as nn::CrossEntropy. fp32 arithmetic over float or bf16 logits. CUDA code.

#include <cuda_runtime.h>

#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/ops/reduce.cuh"
#include "tessera/cuda/stream.hpp"

namespace tessera::cuda::ops {

namespace kernels {
template <class T>
__global__ void softmax_cross_entropy(T* logits, const std::int32_t* targets, float* losses, int V, int ld,
                                      float dloss, int ignore_index, bool write_grad) {
  __shared__ float scratch[32];
  const std::int64_t row = blockIdx.x;
  T* lr = logits + row * ld;
  const int target = targets[row];
  float mx = -INFINITY;
  for (int j = static_cast<int>(threadIdx.x); j < V; j += static_cast<int>(blockDim.x)) mx = fmaxf(mx, load_f32(lr[j]));
  mx = block_max(mx, scratch);
  float se = 0.f;
  for (int j = static_cast<int>(threadIdx.x); j < V; j += static_cast<int>(blockDim.x)) se += expf(load_f32(lr[j]) - mx);
  se = block_sum(se, scratch);
  const bool valid = target != ignore_index;
  if (threadIdx.x == 0) losses[row] = valid ? logf(se) + mx - load_f32(lr[target]) : 0.f;
  __syncthreads();  // lr[target] is read above before it is overwritten below
  if (!write_grad) return;
  const float scale = valid ? dloss : 0.f;
  for (int j = static_cast<int>(threadIdx.x); j < ld; j += static_cast<int>(blockDim.x)) {
    const float g = j < V ? (expf(load_f32(lr[j]) - mx) / se - (j == target ? 1.f : 0.f)) * scale : 0.f;
    store_from_f32(lr + j, g);
  }
}
}  // namespace kernels

/// For each row r of `logits` (rows x ld, the first V columns real, the rest vocabulary padding):
/// losses[r] = logsumexp(logits[r, :V]) - logits[r, targets[r]] (0 for ignore_index). With
/// `dloss` given (the loss's gradient per row, e.g. 1 / valid rows for a mean), the logits are
/// overwritten by the gradient, padding columns set to 0. Targets must lie in [0, V) or equal
/// ignore_index (checked on the host by the caller that holds them; the kernel does not check).
/// Throws tessera::Error naming the shapes when they disagree.
template <class T>
void softmax_cross_entropy(const Stream& s, DeviceView<T> logits, std::int64_t V, DeviceView<const std::int32_t> targets,
                           DeviceView<float> losses, const float* dloss = nullptr, int ignore_index = -100) {
  const std::int64_t ld = logits.size(-1), rows = logits.numel() / (ld ? ld : 1);
  TESSERA_EXPECTS(V >= 1 && V <= ld && targets.numel() == rows && losses.numel() == rows,
                  "cuda softmax_cross_entropy: logits ", logits.shape, " (V ", V, "), targets ", targets.shape,
                  ", losses ", losses.shape, " do not agree");
  if (rows == 0) return;
  kernels::softmax_cross_entropy<T><<<static_cast<unsigned>(rows), 512, 0, s.get()>>>(
      logits.data, targets.data, losses.data, static_cast<int>(V), static_cast<int>(ld), dloss ? *dloss : 0.f,
      ignore_index, dloss != nullptr);
  cuda::detail::check_launch("softmax_cross_entropy", "cuda softmax_cross_entropy of logits ", logits.shape);
}

}  // namespace tessera::cuda::ops
