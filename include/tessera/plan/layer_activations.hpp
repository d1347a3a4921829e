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
/// For tessera's own block (model.tessera_block) the list is nn::Block's contexts, which sum
/// to nn::block_activation_bytes without parallelism (tests/plan checks each mode).
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
    if (model.tessera_block) {
      // nn::Block's contexts (nn::block_activation_bytes): with full recomputation the block
      // keeps nothing of its own; the stage keeps its input (stage_input_bytes).
      if (layout.recompute == Recompute::full) return out;
      keep("ln_1 x-hat", act * s * b * h * outside);
      keep("ln_1 1/sigma", act * s * b * outside);
      keep("attention input", act * s * b * h * outside);
      keep("q", act * s * b * h / t);
      keep("k", act * s * b * kv / t);
      keep("v", act * s * b * kv / t);
      if (layout.recompute == Recompute::none) keep("attention probabilities", act * a * s * s * b / t);
      keep("attention core output", act * s * b * h / t);
      keep("ln_2 x-hat", act * s * b * h * outside);
      keep("ln_2 1/sigma", act * s * b * outside);
      keep("MLP input", act * s * b * h * outside);
      keep("GELU input", act * s * b * f / t);
      keep("GELU gate", act * s * b * f / t);
      keep("GELU output", act * s * b * f / t);
      return out;
    }
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

  /// Bytes a pipeline stage keeps per micro-batch besides its blocks' (of()): its input,
  /// s b h elements (split by sequence parallelism), under full recomputation of tessera's
  /// blocks (model.tessera_block: the stage, not each block, keeps its input and reruns its
  /// forward); 0 otherwise.
  static double stage_input_bytes(const ModelSpec& model, const Layout& layout, const Precision& precision = {}) {
    if (!model.tessera_block || layout.recompute != Recompute::full) return 0.0;
    const double outside = layout.sequence_parallel ? 1.0 / layout.tp : 1.0;
    return precision.activation_bytes * model.seq * layout.microbatch_size * model.hidden * outside;
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
