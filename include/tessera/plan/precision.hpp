#pragma once
/// @file
/// Precision: the bytes per element the planner charges for activations, weights, gradients
/// and optimizer state.

namespace tessera::plan {

/// Bytes per element of each kind of state. The default is mixed-precision Adam with 16-bit
/// weights, gradients and activations: 2 + 2 + 12 = 16 bytes of model state per parameter
/// (Rajbhandari et al., ZeRO, SC 2020: fp32 master weights and two fp32 moments, K = 12).
/// Dropout masks are 1 byte each (Korthikanti et al. 2022).
struct Precision {
  double activation_bytes = 2;  ///< per stored activation element, and per p2p and tp element
  double parameter_bytes = 2;   ///< per weight used in forward and backward
  double gradient_bytes = 2;    ///< per gradient element, also the element size of the dp reduction
  double optimizer_bytes = 12;  ///< per parameter of optimizer state (master copy + moments)

  /// Bytes the optimizer step reads and writes per parameter: the gradient, the optimizer
  /// state read and written back, and the new 16-bit weight.
  double step_bytes() const { return gradient_bytes + 2 * optimizer_bytes + parameter_bytes; }

  /// Single precision with AdamW and no master copy, as tessera trains on CPUs (train_gpt):
  /// 4-byte activations, weights and gradients, two 4-byte moments (8 bytes of optimizer state).
  static constexpr Precision float32_adamw() {
    return {.activation_bytes = 4, .parameter_bytes = 4, .gradient_bytes = 4, .optimizer_bytes = 8};
  }
};

}  // namespace tessera::plan
