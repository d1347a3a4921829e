#pragma once
// What the device-op GPU tests share (test_cuda_ops.cu, test_llama_kernels.cu): random host
// tensors, the norm-wise relative difference their checks use (NaN-safe), one stream and one
// cuBLASLt handle for the test program, and copies to and from the device on that stream.
// Needs nvcc (CUDA headers).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>

#include "tessera/core/tensor.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/stream.hpp"

namespace device_op_test {

// A host tensor of `s` with N(0, scale^2) values from `seed`.
inline tessera::Tensor<float> randn(const tessera::Shape& s, unsigned seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, scale);
  tessera::Tensor<float> t(s);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = n(rng);
  return t;
}

// ||a - b|| / ||b||, NaN when either holds a NaN (so a NaN never passes).
inline double rel(const tessera::Tensor<float>& a, const tessera::Tensor<float>& b) {
  REQUIRE(a.numel() == b.numel());
  double d = 0, n = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.data()[i], y = b.data()[i];
    if (std::isnan(x) || std::isnan(y)) return NAN;
    d += (x - y) * (x - y);
    n += y * y;
  }
  return std::sqrt(d / (n > 0 ? n : 1));
}

// The tests' stream and cuBLASLt handle (one each per program).
inline tessera::cuda::Stream& stream() {
  static tessera::cuda::Stream s;
  return s;
}
inline tessera::cuda::BlasLt& blas() {
  static tessera::cuda::BlasLt b(stream());
  return b;
}

// `h` on the device as T (float or bf16), and a device tensor back on the host as float.
template <class T = float>
tessera::cuda::DeviceTensor<T> dev(const tessera::Tensor<float>& h) {
  return tessera::cuda::to_device<T>(h, stream());
}
template <class T>
tessera::Tensor<float> host(const tessera::cuda::DeviceTensor<T>& d) {
  return tessera::cuda::to_host(d, stream());
}

}  // namespace device_op_test
