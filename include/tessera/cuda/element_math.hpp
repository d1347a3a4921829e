#pragma once
/// @file
/// The per-element arithmetic of tessera's device kernels, callable from host and device
/// (TESSERA_HD), written as the CPU reference layers write it so that each kernel's element
/// step is checked on the host (tests/cuda) against nn::GELU and optim::AdamW.

#include <cmath>

#include "tessera/cuda/host_device.hpp"

namespace tessera::cuda::math {

/// sqrt(2 / pi), GELU's tanh-form constant.
inline constexpr float gelu_k0 = 0.7978845608028654f;
/// 0.044715, GELU's cubic coefficient.
inline constexpr float gelu_k1 = 0.044715f;

/// exp(x) in fp32 (expf on the device, std::exp on the host).
TESSERA_HD inline float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

/// log(x) in fp32 (logf on the device, std::log on the host).
TESSERA_HD inline float log_f(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

/// sqrt(x) in fp32.
TESSERA_HD inline float sqrt_f(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

/// GELU's gate s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): y = x s (nn::GELU).
TESSERA_HD inline float gelu_gate(float x) { return 1.f / (1.f + exp_f(-2.f * gelu_k0 * (x + gelu_k1 * x * x * x))); }

/// GELU, tanh form (GPT-2's gelu_new): x sigmoid(2u).
TESSERA_HD inline float gelu(float x) { return x * gelu_gate(x); }

/// dL/dx of GELU at x given dL/dy: dy (s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2)).
TESSERA_HD inline float gelu_backward(float x, float dy) {
  const float s = gelu_gate(x);
  return dy * (s + 2.f * x * s * (1.f - s) * gelu_k0 * (1.f + 3.f * gelu_k1 * x * x));
}

/// The per-step scalars of one AdamW parameter group (decoupled weight decay, Loshchilov and
/// Hutter 2019), derived on the host in double as optim::AdamW derives them.
struct AdamWScalars {
  float decay = 1.f;      ///< 1 - lr * weight_decay
  float step_size = 0.f;  ///< lr / (1 - beta1^t)
  float bc2_sqrt = 1.f;   ///< sqrt(1 - beta2^t)
  float beta1 = 0.9f;     ///< first-moment decay
  float beta2 = 0.999f;   ///< second-moment decay
  float eps = 1e-8f;      ///< added to the denominator
};

/// The scalars of step t (1-based) for lr, betas, eps and weight decay, as optim::AdamW::step.
inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  long long t) {
  const double bc1 = 1 - std::pow(beta1, static_cast<double>(t));
  const double bc2 = 1 - std::pow(beta2, static_cast<double>(t));
  AdamWScalars s;
  s.decay = static_cast<float>(1 - lr * weight_decay);
  s.step_size = static_cast<float>(lr / bc1);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.eps = static_cast<float>(eps);
  return s;
}

/// One AdamW update of one element: x, m, v updated in place from gradient g.
TESSERA_HD inline void adamw_update(float& x, float g, float& m, float& v, const AdamWScalars& s) {
  x *= s.decay;
  m = s.beta1 * m + (1.f - s.beta1) * g;
  v = s.beta2 * v + (1.f - s.beta2) * g * g;
  x -= s.step_size * m / (sqrt_f(v) / s.bc2_sqrt + s.eps);
}

/// splitmix64 (the same bijection as tessera::detail::splitmix64, callable on the device).
TESSERA_HD inline unsigned long long splitmix64(unsigned long long x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// Whether Dropout keeps element `g` (its index in the global batch) of the masks with `key`
/// and `threshold` (Dropout::mask_key, Dropout::keep_threshold): the CPU layer's own test.
TESSERA_HD inline bool dropout_keep(unsigned long long key, unsigned long long g, unsigned long long threshold) {
  return (splitmix64(key ^ g) >> 11) >= threshold;
}

}  // namespace tessera::cuda::math
