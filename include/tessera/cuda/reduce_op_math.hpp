#pragma once
/// @file
/// The element arithmetic of the device collectives' reductions, callable from host and
/// device code (TESSERA_HD), written as the threads backend's reduce_range writes it: ranks
/// combined one after the other in rank order, max as std::max (a < b ? b : a), min as std::min
/// (b < a ? b : a), avg as the sum divided by the rank count in float. So a device all-reduce
/// equals the threads backend's host one bitwise (tests/cuda: on the host against reduce_range;
/// on a GPU against the host collective). Host code.

#include "tessera/core/dtype.hpp"
#include "tessera/cuda/host_device.hpp"

namespace tessera::cuda::math {

/// acc op x for one element, as the threads backend combines rank x into the running value.
TESSERA_HD inline float reduce_combine(float acc, float x, ReduceOp op) {
  switch (op) {
    case ReduceOp::max: return acc < x ? x : acc;
    case ReduceOp::min: return x < acc ? x : acc;
    default: return acc + x;  // sum, avg
  }
}

/// The reduction over `n` ranks of element i: values[0] op values[1] op ... in rank order,
/// divided by n for avg. `values` is any indexable of n floats (device pointers on the GPU).
template <class Values>
TESSERA_HD inline float reduce_ranks(const Values& values, int n, ReduceOp op) {
  float acc = values[0];
  for (int q = 1; q < n; ++q) acc = reduce_combine(acc, values[q], op);
  if (op == ReduceOp::avg) acc = acc / static_cast<float>(n);
  return acc;
}

}  // namespace tessera::cuda::math
