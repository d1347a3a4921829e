#pragma once
/// @file
/// LayerHooks: calls a pipeline stage makes around each of its layers' forward and backward, so
/// that a policy wrapping the stage can act per layer: ZeRO-3's per-layer units of gathering
/// (DataParallelStage), as PyTorch FSDP2's `fully_shard` on a module registers pre-forward and
/// pre-backward hooks on it.

namespace tessera {

/// Receiver of a stage's per-layer events (PipelineStage::set_layer_hooks). `layer` is the
/// index of the layer within the stage, 0 for its first (the order of
/// PipelineStage::layer_parameters()). Forward calls before_forward(l) and after_forward(l) for
/// l = 0, 1, ... (also in a recomputed forward and in the forward that output_shape runs);
/// backward calls before_backward(l) and after_backward(l) for l = last, ..., 0. A layer that
/// throws gets no after_ call: the stage's caller cleans up. A hook may throw (the layer's
/// forward or backward then does not run, or its error propagates as the layer's).
class LayerHooks {
 public:
  /// Virtual: held through base pointers.
  virtual ~LayerHooks() = default;
  /// Before layer `layer`'s forward.
  virtual void before_forward(int layer) = 0;
  /// After layer `layer`'s forward returned.
  virtual void after_forward(int layer) = 0;
  /// Before layer `layer`'s backward.
  virtual void before_backward(int layer) = 0;
  /// After layer `layer`'s backward returned.
  virtual void after_backward(int layer) = 0;
};

}  // namespace tessera
