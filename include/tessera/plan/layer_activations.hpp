#pragma once
/// @file
/// LayerActivations: the tensors one transformer block keeps for its backward, per
/// micro-batch on one device, tensor by tensor (Korthikanti et al., "Reducing Activation
/// Recomputation in Large Transformer Models", 2022, sec. 4).

#include <string>
#include <utility>
#include <vector>

#include "tessera/plan/layout.hpp"
#include "tessera/plan/model_spec.hpp"
#include "tessera/plan/precision.hpp"

namespace tessera::plan {

/// One tensor a block keeps for its backward.
struct StoredTensor {
  std::string name{};  ///< what it is, e.g. "softmax output"
  double bytes = 0;    ///< bytes per micro-batch on one device
};

/// The tensors one block (LayerNorm, self-attention, LayerNorm, MLP, two dropouts) keeps for
/// its backward on one device, for one micro-batch of `microbatch_size` sequences, under the
/// layout's tensor parallelism, sequence parallelism and recomputation. Inside the tp regions
/// (Q, K, V, the attention core, the MLP's inner width) tensors are split over tp; outside
/// them (LayerNorm inputs, dropout masks, the inputs of the first linear layers) only sequence
/// parallelism splits them. Activations are precision.activation_bytes per element, dropout
/// masks 1 byte. Listed tensor by tensor, so grouped-query attention (kv_heads < heads) and any
/// MLP width are counted; with kv_heads = heads and ffn = 4h the sum is Korthikanti et al.'s
/// s b h (34 + 5 a s / h) without parallelism (their Table 2 for the parallel forms). Without
/// dropout (model.dropout false) the masks and the attention dropout's output are not kept.
struct LayerActivations {
  std::vector<StoredTensor> tensors{};  ///< what is kept, tensor by tensor

  /// Sum of the tensors' bytes.
  double bytes() const {
    double b = 0;
    for (const StoredTensor& t : tensors) b += t.bytes;
    return b;
  }

  /// The tensors kept by one block of `model` under `layout` (tp, sequence_parallel,
  /// recompute, microbatch_size). Throws what model.validate() and layout.validate() throw.
  static LayerActivations of(const ModelSpec& model, const Layout& layout, const Precision& precision = {}) {
    model.validate();
    layout.validate();
    const double s = model.seq, b = layout.microbatch_size, h = model.hidden, a = model.heads;
    const double kv = static_cast<double>(model.kv_dim()), f = static_cast<double>(model.ffn_size());
    const double t = layout.tp, act = precision.activation_bytes, mask = 1.0;
    const double outside = layout.sequence_parallel ? 1.0 / t : 1.0;  // outside the tp regions
    LayerActivations out;
    auto keep = [&](std::string name, double bytes) { out.tensors.push_back({std::move(name), bytes}); };
    if (layout.recompute == Recompute::full) {
      keep("block input (recomputed from it)", act * s * b * h * outside);
      return out;
    }
    keep("attention LayerNorm input", act * s * b * h * outside);
    keep("QKV projection input", act * s * b * h * outside);
    keep("Q", act * s * b * h / t);
    keep("K", act * s * b * kv / t);
    keep("V", act * s * b * kv / t);
    if (layout.recompute == Recompute::none) {
      keep("softmax output", act * a * s * s * b / t);
      if (model.dropout) {
        keep("attention dropout mask", mask * a * s * s * b / t);
        keep("attention dropout output", act * a * s * s * b / t);
      }
    }
    keep("output projection input", act * s * b * h / t);
    if (model.dropout) keep("attention residual dropout mask", mask * s * b * h * outside);
    keep("MLP LayerNorm input", act * s * b * h * outside);
    keep("MLP first linear input", act * s * b * h * outside);
    keep("GeLU input", act * s * b * f / t);
    keep("MLP second linear input", act * s * b * f / t);
    if (model.dropout) keep("MLP residual dropout mask", mask * s * b * h * outside);
    return out;
  }

  /// What one block keeps from its input-gradient pass (I) to its weight-gradient pass (W)
  /// under a split backward (ZB-H1; nn::Linear's deferred dW = x^T dy keeps x and dy): each of
  /// the four linears' input and output gradient, per micro-batch on one device -- with ffn =
  /// 4h and kv_heads = heads, 16 s b h elements without parallelism (7 inputs, 9 gradients),
  /// whatever the recomputation (a recomputed forward rebuilds the inputs before I). Throws
  /// what model.validate() and layout.validate() throw.
  static LayerActivations weight_pass(const ModelSpec& model, const Layout& layout, const Precision& precision = {}) {
    model.validate();
    layout.validate();
    const double s = model.seq, b = layout.microbatch_size, h = model.hidden;
    const double kv = static_cast<double>(model.kv_dim()), f = static_cast<double>(model.ffn_size());
    const double t = layout.tp, act = precision.activation_bytes;
    const double outside = layout.sequence_parallel ? 1.0 / t : 1.0;
    LayerActivations out;
    auto keep = [&](std::string name, double elements) {
      out.tensors.push_back({std::move(name), act * s * b * elements});
    };
    keep("QKV projection input", h * outside);
    keep("QKV projection output gradient", (h + 2 * kv) / t);
    keep("output projection input", h / t);
    keep("output projection output gradient", h * outside);
    keep("MLP first linear input", h * outside);
    keep("MLP first linear output gradient", f / t);
    keep("MLP second linear input", f / t);
    keep("MLP second linear output gradient", h * outside);
    return out;
  }
};

}  // namespace tessera::plan
