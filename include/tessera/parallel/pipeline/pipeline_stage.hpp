#pragma once
/// @file
/// PipelineStage: one stage of a pipeline-parallel model as the executor sees it -- a forward
/// that returns its output and a context, a backward, an output shape, parameters -- with its
/// type erased, so a rank can hold stages of different types (GPipe's and
/// torch.distributed.pipelining's PipelineStage). LayerStage wraps any tessera Layer as one.

#include <concepts>
#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/weight_grad_queue.hpp"
#include "tessera/parallel/pipeline/layer_hooks.hpp"

namespace tessera {

/// The per-call state of one stage's forward on one micro-batch, kept by the pipeline from the
/// forward until the matching backward, whatever its type (the Layer's Context). Move-only.
class StageContext {
 public:
  /// An empty context.
  StageContext() = default;
  /// Holds `ctx` (moved in).
  template <class C>
  static StageContext hold(C ctx) {
    StageContext s;
    s.p_ = std::make_unique<Holder<std::remove_cvref_t<C>>>(std::move(ctx));
    return s;
  }
  /// The held context as a `C`. Throws Error if it is empty or holds another type.
  template <class C>
  C& get() {
    auto* h = dynamic_cast<Holder<C>*>(p_.get());
    TESSERA_EXPECTS(h != nullptr, "StageContext: ", p_ ? "holds another type than the one asked for" : "is empty",
                    " (asked for ", typeid(C).name(), ")");
    return h->value;
  }
  /// Whether a context is held.
  bool has_value() const noexcept { return p_ != nullptr; }
  /// Drops the held context.
  void reset() noexcept { p_.reset(); }

 private:
  struct Base {
    virtual ~Base() = default;
  };
  template <class C>
  struct Holder : Base {
    explicit Holder(C v) : value(std::move(v)) {}
    C value;
  };
  std::unique_ptr<Base> p_;
};

/// What a stage's forward returns: its output activation and the context its backward needs.
template <std::floating_point T>
struct StageOutput {
  Tensor<T> output;  ///< the stage's output, contiguous (the activation sent to the next stage)
  StageContext ctx;  ///< what backward needs
};

/// One pipeline stage (a consecutive run of layers) with its type erased. The executor
/// (PipelineParallel) calls:
/// - `forward_first(x)` on the model's first stage, with one micro-batch of the model input
///   (`Input`, e.g. tokens (b, T) int32), and `forward(x)` on every other stage, with the
///   activation received from the previous stage (a Tensor<T>);
/// - `backward(dy, ctx)` with the gradient of the stage's output and the context of the
///   matching forward; it returns the gradient of the input (an empty tensor on the first
///   stage, whose input has no gradient) and adds the parameter gradients into their `grad`;
///   under a zero-bubble schedule `backward_input(dy, ctx, weights)` and later
///   `backward_weight(weights)` instead (by default backward() with the weight gradients of
///   the layers that can defer them deferred);
/// - `output_shape(input_shape)` before a step, so that every receiving rank knows the shape of
///   each activation before it arrives (torch's shape inference, Megatron's tensor_shape);
/// - `parameters()` for the optimizer, and `tied_parameters()`: the parameters that are copies
///   of a parameter of the stage at the other end of the model (a first stage's token
///   embedding and a last stage's LM head tied to it, Megatron's embedding group). The pipeline
///   keeps the copies bitwise identical by summing their gradients.
///
/// Several micro-batches may be in flight at once: all per-call state lives in the context.
template <std::floating_point T, class Input = Tensor<T>>
class PipelineStage {
 public:
  using Scalar = T;         ///< parameter and activation element type
  using ModelInput = Input;  ///< what the first stage takes

  /// Virtual: stages are owned through base pointers.
  virtual ~PipelineStage() = default;

  /// Forward of the model's first stage on one micro-batch of the model input. The default
  /// throws Error: a stage that cannot be first.
  virtual StageOutput<T> forward_first(const Input& x) {
    (void)x;
    throw Error(tessera::detail::str("PipelineStage '", name(), "' cannot be the first stage: it does not take the model input"));
  }
  /// Forward on the activation from the previous stage. The default throws Error: a stage that
  /// can only be first.
  virtual StageOutput<T> forward(const Tensor<T>& x) {
    (void)x;
    throw Error(tessera::detail::str("PipelineStage '", name(), "' can only be the first stage: it takes the model input"));
  }
  /// Backward from dy (the output's shape): returns dx (empty for the first stage) and adds the
  /// parameter gradients into their grad.
  virtual Tensor<T> backward(const Tensor<T>& dy, StageContext& ctx) = 0;
  /// The input-gradient half of a split backward (schedule::ActionKind::backward_input, the
  /// zero-bubble schedules' B pass; Qi et al., ICLR 2024): returns dx as backward() does and
  /// leaves the weight gradients to backward_weight(weights). The default runs backward()
  /// inside a nn::DeferWeightGrads scope on `weights`: the layers that split their backward
  /// (nn::Linear, nn::LMHead and the layers built from them) push their weight gradients into
  /// `weights`; the others (a stage without the split) compute everything here, the fused
  /// backward. After it the pipeline drops `ctx`; `weights` keeps what the W pass needs.
  virtual Tensor<T> backward_input(const Tensor<T>& dy, StageContext& ctx, nn::WeightGradQueue& weights) {
    const nn::DeferWeightGrads scope(weights);
    return backward(dy, ctx);
  }
  /// The weight-gradient half (schedule::ActionKind::backward_weight, the W pass): adds the
  /// gradients that backward_input deferred into `weights` to the parameters' grads. The
  /// default runs the queue (nothing when the stage fused everything into backward_input).
  virtual void backward_weight(nn::WeightGradQueue& weights) { weights.run(); }
  /// The output shape for an input of shape `input` (the model input's shape for the first
  /// stage). Throws Error for an input the stage cannot take.
  virtual Shape output_shape(const Shape& input) = 0;
  /// This stage's parameters, each once.
  virtual ParameterList<T> parameters() = 0;
  /// Parameters that are copies of parameters of the stage at the other end of the model (see
  /// the class comment); empty by default.
  virtual ParameterList<T> tied_parameters() { return {}; }
  /// Where the stage holds both ends of a tie (the first and the last layer at pp 1): the
  /// Parameter::tied copies that parameters() leaves out (the LM head's copy of wte), so that
  /// ZeRO-3 points their values at the gathered views as well. Empty by default. Local.
  virtual ParameterList<T> tied_copies() { return {}; }
  /// A name for messages, e.g. "layers 0-3".
  virtual std::string name() const { return "stage"; }
  /// Whether this stage holds the model's last layer (what the loss takes): the pipeline checks
  /// that its last stage does. True by default (a stage that cannot tell).
  virtual bool holds_last_layer() const { return true; }
  /// Called by the pipeline when an accumulation window closes, after the tied copies'
  /// gradients are summed and before they are normalized: a stage replicated over dp
  /// (DataParallelStage) reduces its gradients here. Nothing by default.
  virtual void finish_grad_sync() {}
  /// The parameters of each of the stage's layers, in layer order (each parameter in one list
  /// only, the lists together parameters()): what a per-layer policy groups into units (ZeRO-3's
  /// units of gathering). Empty by default: a stage that cannot tell its layers apart.
  virtual std::vector<ParameterList<T>> layer_parameters() { return {}; }
  /// Makes the stage call `hooks` around each layer's forward and backward (see LayerHooks; the
  /// layer indices those of layer_parameters()); null removes them. Returns whether the stage
  /// calls them: false by default (a stage without layer_parameters()).
  virtual bool set_layer_hooks(LayerHooks* hooks) {
    (void)hooks;
    return false;
  }
  /// Whether a layer's parameter gradients are final (for this micro-batch) when its
  /// LayerHooks::after_backward runs, so a per-layer policy may reduce them then: false by
  /// default, and for a stage that changes them after its layers' backward (sequence
  /// parallelism's sum over tp).
  virtual bool layer_grads_final() const { return false; }
};

namespace detail {
template <class L>
concept has_output_shape = requires(const L& l, const Shape& s) {
  { l.output_shape(s) } -> std::convertible_to<Shape>;
};
}  // namespace detail

/// A Layer as a PipelineStage. The layer's Input must be the model input `Input` (then the
/// stage can be first) and/or Tensor<T> (then it can follow another stage); its Output must be
/// Tensor<T>. The output shape comes from the layer's `output_shape(const Shape&)` if it has
/// one, else from one forward on a zero input of that shape, done once per input shape and
/// cached (torch.distributed.pipelining infers shapes by running the stage, too).
template <Layer L, std::floating_point T = typename LayerTraits<L>::Scalar, class Input = Tensor<T>>
class LayerStage final : public PipelineStage<T, Input> {
  using LIn = typename LayerTraits<L>::Input;
  using LOut = typename LayerTraits<L>::Output;
  using LCtx = typename LayerTraits<L>::Context;
  using LGrad = typename LayerTraits<L>::InputGrad;
  static_assert(std::same_as<LOut, Tensor<T>>,
                "tessera: a pipeline stage's layer must output tessera::Tensor<T>, the activation sent to the next stage.");
  static_assert(std::same_as<LIn, Input> || std::same_as<LIn, Tensor<T>>,
                "tessera: a pipeline stage's layer must take either the model input or tessera::Tensor<T>.");

 public:
  /// Wraps `layer` (moved in), named `name` in messages.
  explicit LayerStage(L layer, std::string name = "stage") : layer_(std::move(layer)), name_(std::move(name)) {}

  /// L's forward on the model input; throws Error if L does not take `Input`.
  StageOutput<T> forward_first(const Input& x) override {
    if constexpr (std::same_as<LIn, Input>) {
      return run(x);
    } else {
      return PipelineStage<T, Input>::forward_first(x);
    }
  }
  /// L's forward on an activation; throws Error if L does not take Tensor<T>.
  StageOutput<T> forward(const Tensor<T>& x) override {
    if constexpr (std::same_as<LIn, Tensor<T>>) {
      return run(x);
    } else {
      return PipelineStage<T, Input>::forward(x);
    }
  }
  /// L's backward; an input without gradient (NoGrad, or token ids) gives an empty tensor.
  Tensor<T> backward(const Tensor<T>& dy, StageContext& ctx) override {
    LCtx& c = ctx.get<LCtx>();
    if constexpr (std::same_as<LGrad, Tensor<T>>) {
      return layer_.backward(dy, c);
    } else {
      layer_.backward(dy, c);
      return Tensor<T>();
    }
  }
  /// L::output_shape if L has it; else the shape of a forward on zeros (cached per shape).
  Shape output_shape(const Shape& input) override {
    if constexpr (detail::has_output_shape<L>) {
      return layer_.output_shape(input);
    } else {
      auto it = shapes_.find(key(input));
      if (it != shapes_.end()) return it->second;
      auto [y, ctx] = layer_.forward(LIn(input));
      (void)ctx;
      const Shape out = y.shape();
      shapes_.emplace(key(input), out);
      return out;
    }
  }
  /// L's parameters.
  ParameterList<T> parameters() override { return layer_.parameters(); }
  /// The name given at construction.
  std::string name() const override { return name_; }
  /// The wrapped layer.
  L& layer() noexcept { return layer_; }

 private:
  template <class X>
  StageOutput<T> run(const X& x) {
    auto [y, ctx] = layer_.forward(x);
    return StageOutput<T>{y.contiguous(), StageContext::hold(std::move(ctx))};
  }
  static std::tuple<int, std::int64_t, std::int64_t, std::int64_t, std::int64_t> key(const Shape& s) {
    const Index& d = s.dims();
    return {s.rank(), d[0], d[1], d[2], d[3]};
  }

  L layer_;
  std::string name_;
  std::map<std::tuple<int, std::int64_t, std::int64_t, std::int64_t, std::int64_t>, Shape> shapes_;
};

/// `layer` (moved in) as an owned PipelineStage<T, Input> (see LayerStage).
template <std::floating_point T, class Input = Tensor<T>, Layer L>
std::unique_ptr<PipelineStage<T, Input>> make_pipeline_stage(L layer, std::string name = "stage") {
  return std::make_unique<LayerStage<L, T, Input>>(std::move(layer), std::move(name));
}

}  // namespace tessera
