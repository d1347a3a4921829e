#pragma once
/// @file
/// A model described once as a sequence of layers -- a first layer (the embedding), repeated
/// blocks, a last layer (final norm and LM head) -- and the forms the generic policies make of
/// that one description: the serial model (SequentialModel), a pipeline stage holding any
/// consecutive run of its layers, each tensor-parallel over a tp communicator
/// (SequentialStage), the stage factory Hybrid takes (sequential_stages), and the pipeline loss
/// checked against the last layer's output layout (sequential_loss). torchtitan describes its
/// models this way (tok_embeddings, layers, norm + output) and cuts pipeline stages from the
/// same description; Megatron-LM's GPTModel has pre_process / post_process stages.
///
/// ```cpp
/// struct MyModel {                           // the description: serial layers from a seed
///   using First = nn::Embedding<float>;      // tokens (B, T) -> (B, T, d)
///   using Block = MyBlock;                   // (B, T, d) -> (B, T, d), with a tp_plan
///   using Last = MyHead;                     // (B, T, d) -> logits, with a tp_plan
///   int num_blocks() const;
///   First first() const; Block block(int i) const; Last last() const;
/// };
/// Hybrid<float> model(mesh, sequential_stages(MyModel{...}, cut),
///                     [&](Comm tp) { return sequential_loss<MyModel>(VocabParallelCrossEntropy<float>(tp, V, opts)); });
/// ```

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/comm/communicator.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/layer.hpp"
#include "tessera/core/parameter.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/parallel/tensor/layouts.hpp"
#include "tessera/parallel/pipeline/layer_hooks.hpp"
#include "tessera/parallel/pipeline/pipeline_loss.hpp"
#include "tessera/parallel/pipeline/pipeline_stage.hpp"
#include "tessera/parallel/pipeline/stage_partition.hpp"
#include "tessera/parallel/tensor/tensor_parallel_layer.hpp"

namespace tessera {

/// What a model description provides (see the file comment): the three layer types, the number
/// of blocks, and each layer built serially with its initial values (the same whichever ranks
/// build it: a description initializes every layer from its own seed stream, keyed by name).
/// Optionally `std::vector<std::string> tied_parameter_names() const`: parameters of the last
/// layer that are the first layer's (a tied LM head and its token embedding): where one stage
/// holds both they are one parameter; otherwise the last stage holds a copy that the pipeline
/// keeps equal (PipelineStage::tied_parameters). Optionally `layer_names()` (for messages and
/// partitions) and `void check_tensor_parallel(int tp_size) const`, which throws naming the
/// numbers when the model cannot run at that tp size (called before any layer is sharded).
template <class D>
concept SequentialModelDescription = requires(const D& d, int i) {
  typename D::First;
  typename D::Block;
  typename D::Last;
  { d.num_blocks() } -> std::convertible_to<int>;
  { d.first() } -> std::same_as<typename D::First>;
  { d.block(i) } -> std::same_as<typename D::Block>;
  { d.last() } -> std::same_as<typename D::Last>;
};

namespace detail {
template <class D>
std::vector<std::string> tied_names_of(const D& d) {
  if constexpr (requires { d.tied_parameter_names(); })
    return d.tied_parameter_names();
  else
    return {};
}

template <class L>
struct sequential_layout {
  using type = Replicate;
};
template <class L>
  requires requires { typename L::OutputLayout; }
struct sequential_layout<L> {
  using type = typename L::OutputLayout;
};

/// The layers [first, end) of a description, each made by `Form`: the serial layer
/// (SerialForm) or its tensor-parallel form (TensorParallelForm). Layer 0 is the first layer,
/// 1..n the blocks, n + 1 the last layer.
struct SerialForm {
  template <class L>
  using type = L;
  template <class L>
  static L make(L serial, const std::optional<Comm>&) {
    return serial;
  }
};
template <class Layout>
struct TensorParallelForm {
  template <class L>
  using type = typename TensorParallelLayer<L, Layout>::type;
  template <class L>
  static type<L> make(L serial, const std::optional<Comm>& tp) {
    return TensorParallelLayer<L, Layout>::make(std::move(serial), *tp);
  }
};
template <class Form>
inline constexpr bool sequence_parallel_form = false;
template <>
inline constexpr bool sequence_parallel_form<TensorParallelForm<Shard<1>>> = true;

template <class L>
ParameterList<typename LayerTraits<L>::Scalar> sequence_parallel_parameters_of(L& l) {
  if constexpr (requires { l.sequence_parallel_parameters(); })
    return l.sequence_parallel_parameters();
  else
    return {};
}

template <class D, class Form>
class SequentialLayers {
 public:
  using F = typename Form::template type<typename D::First>;
  using B = typename Form::template type<typename D::Block>;
  using L = typename Form::template type<typename D::Last>;
  using T = typename LayerTraits<B>::Scalar;
  using ModelInput = typename LayerTraits<F>::Input;
  using Output = typename LayerTraits<L>::Output;
  struct Context {
    std::optional<typename LayerTraits<F>::Context> first;
    std::vector<typename LayerTraits<B>::Context> blocks;
    std::optional<typename LayerTraits<L>::Context> last;
  };

  SequentialLayers(const D& d, int first, int end, std::optional<Comm> tp)
      : first_layer_(first), end_layer_(end), tp_(tp) {
    const int n = d.num_blocks() + 2;
    TESSERA_EXPECTS(0 <= first && first < end && end <= n, "sequential model: layers [", first, ", ", end,
                    ") are not a non-empty range of the model's ", n, " layers [0, ", n, ") (first layer, ",
                    n - 2, " blocks, last layer)");
    if constexpr (requires { d.check_tensor_parallel(1); })
      if (tp) d.check_tensor_parallel(tp->size());
    if (first == 0) first_.emplace(Form::make(d.first(), tp));
    for (int l = std::max(first, 1); l < std::min(end, n - 1); ++l) blocks_.push_back(Form::make(d.block(l - 1), tp));
    if (end == n) last_.emplace(Form::make(d.last(), tp));
    tied_names_ = tied_names_of(d);
    if (first_ && last_) {  // one stage holds both: the last layer's copies become the first's
      const ParameterList<T> fp = first_->parameters(), lp = last_->parameters();
      for (const std::string& name : tied_names_) {
        Parameter<T>& a = fp.at(name);
        Parameter<T>& b = lp.at(name);
        TESSERA_EXPECTS(a.value.shape() == b.value.shape() && a.layout == b.layout, "sequential model: tied parameter \"",
                        name, "\" has shape ", a.value.shape(), " in the first layer but ", b.value.shape(),
                        " in the last");
        b = Parameter<T>::tied(a);
      }
    }
  }

  bool has_first() const noexcept { return first_.has_value(); }
  bool has_last() const noexcept { return last_.has_value(); }

  ForwardResult<Tensor<T>, Context> forward_model_input(const ModelInput& x) {
    Context ctx;
    before_forward(0);
    auto [y, c] = first_->forward(x);
    after_forward(0);
    ctx.first = std::move(c);
    return run_rest(std::move(y), std::move(ctx));
  }
  ForwardResult<Tensor<T>, Context> forward_activation(const Tensor<T>& x) { return run_rest(x, Context{}); }

  // dy: the gradient of this run's output; returns the gradient of its input (empty when the
  // run starts with the first layer). Under sequence parallelism the replicated parameters'
  // gradients (partial over tp) are summed over tp in one all-reduce at the end.
  Tensor<T> backward(const Tensor<T>& dy, Context& ctx) {
    if constexpr (sequence_parallel_form<Form>) {
      const ParameterList<T> seq = sequence_parallel_parameters();
      tessera::detail::tp::ReplicatedGradSum<T> sum;
      sum.stash(seq);
      Tensor<T> dx = backward_layers(dy, ctx);
      sum.reduce(*tp_, seq);
      return dx;
    } else {
      return backward_layers(dy, ctx);
    }
  }
  // The replicated parameters whose gradients are partial sums over tp under sequence
  // parallelism (LayerNorms, position embeddings).
  ParameterList<T> sequence_parallel_parameters() {
    ParameterList<T> ps;
    if (first_) ps.append(sequence_parallel_parameters_of(*first_));
    for (B& b : blocks_) ps.append(sequence_parallel_parameters_of(b));
    if (last_) ps.append(sequence_parallel_parameters_of(*last_));
    return ps;
  }

 private:
  Tensor<T> backward_layers(const Tensor<T>& dy, Context& ctx) {
    Tensor<T> d = dy;
    const int b0 = first_ ? 1 : 0;  // the stage-local index of the first block
    if (last_) {
      const int l = b0 + static_cast<int>(blocks_.size());
      before_backward(l);
      d = last_->backward(d, *ctx.last);
      after_backward(l);
    }
    for (std::size_t i = blocks_.size(); i-- > 0;) {
      before_backward(b0 + static_cast<int>(i));
      d = blocks_[i].backward(d, ctx.blocks[i]);
      after_backward(b0 + static_cast<int>(i));
    }
    if (first_) {
      before_backward(0);
      first_->backward(d, *ctx.first);
      after_backward(0);
      return Tensor<T>();
    }
    return d;
  }

 public:

  // Each parameter once, in layer order; the last layer's tied copies only where the first
  // layer is elsewhere.
  ParameterList<T> parameters() {
    ParameterList<T> ps;
    if (first_) ps.append(first_->parameters());
    for (B& b : blocks_) ps.append(b.parameters());
    if (last_) {
      for (Parameter<T>& p : last_->parameters())
        if (!first_ || !is_tied(p.name)) ps.push_back(p);
    }
    return ps;
  }
  // The first layer's tied parameters on a run without the last layer, the last layer's copies
  // on a run without the first; empty otherwise.
  ParameterList<T> tied_parameters() {
    ParameterList<T> ps;
    if (first_.has_value() == last_.has_value()) return ps;
    const ParameterList<T> all = first_ ? first_->parameters() : last_->parameters();
    for (const std::string& name : tied_names_) ps.push_back(all.at(name));
    return ps;
  }
  // The last layer's tied copies where this run also holds the first layer (the GPT's LM-head
  // copy of wte): Parameter objects that parameters() leaves out; empty otherwise.
  ParameterList<T> tied_copies() {
    ParameterList<T> ps;
    if (!first_ || !last_) return ps;
    const ParameterList<T> lp = last_->parameters();
    for (const std::string& name : tied_names_) ps.push_back(lp.at(name));
    return ps;
  }
  // Each layer's parameters (stage-local layer order; the last layer's tied copies left out
  // where the first layer is here, as in parameters()).
  std::vector<ParameterList<T>> layer_parameters() {
    std::vector<ParameterList<T>> out;
    if (first_) out.push_back(first_->parameters());
    for (B& b : blocks_) out.push_back(b.parameters());
    if (last_) {
      ParameterList<T> ps;
      for (Parameter<T>& p : last_->parameters())
        if (!first_ || !is_tied(p.name)) ps.push_back(p);
      out.push_back(std::move(ps));
    }
    return out;
  }
  // Called around each layer's forward and backward (null: none).
  void set_hooks(LayerHooks* hooks) noexcept { hooks_ = hooks; }
  int first_layer() const noexcept { return first_layer_; }
  int end_layer() const noexcept { return end_layer_; }
  F& first() { return *first_; }
  std::vector<B>& blocks() noexcept { return blocks_; }
  L& last() { return *last_; }

 private:
  bool is_tied(const std::string& name) const {
    for (const std::string& n : tied_names_)
      if (n == name) return true;
    return false;
  }
  void before_forward(int l) {
    if (hooks_) hooks_->before_forward(l);
  }
  void after_forward(int l) {
    if (hooks_) hooks_->after_forward(l);
  }
  void before_backward(int l) {
    if (hooks_) hooks_->before_backward(l);
  }
  void after_backward(int l) {
    if (hooks_) hooks_->after_backward(l);
  }
  ForwardResult<Tensor<T>, Context> run_rest(Tensor<T> x, Context ctx) {
    ctx.blocks.reserve(blocks_.size());
    int l = first_ ? 1 : 0;
    for (B& b : blocks_) {
      before_forward(l);
      auto [y, c] = b.forward(x);
      after_forward(l++);
      ctx.blocks.push_back(std::move(c));
      x = std::move(y);
    }
    if (last_) {
      before_forward(l);
      auto [y, c] = last_->forward(x);
      after_forward(l);
      ctx.last = std::move(c);
      x = std::move(y);
    }
    return {std::move(x), std::move(ctx)};
  }

  int first_layer_, end_layer_;
  std::optional<Comm> tp_;
  std::optional<F> first_;
  std::vector<B> blocks_;
  std::optional<L> last_;
  std::vector<std::string> tied_names_;
  LayerHooks* hooks_ = nullptr;
};
}  // namespace detail

/// The serial model of a description: the first layer, every block, the last layer, run one
/// after the other on one rank (the reference every parallel layout is checked against).
/// A Layer: model input (e.g. tokens (B, T) int32) -> the last layer's output (e.g. logits
/// (B, T, V)); backward returns NoGrad.
template <SequentialModelDescription D>
class SequentialModel {
  using Layers = detail::SequentialLayers<D, detail::SerialForm>;

 public:
  using Scalar = typename Layers::T;              ///< parameter element type
  using Input = typename Layers::ModelInput;      ///< the first layer's input
  using Context = typename Layers::Context;       ///< every layer's context

  /// Every layer of `description`, with its initial values.
  explicit SequentialModel(const D& description)
      : layers_(description, 0, description.num_blocks() + 2, std::nullopt) {}

  /// The last layer's output.
  ForwardResult<Tensor<Scalar>, Context> forward(const Input& x) { return layers_.forward_model_input(x); }
  /// Accumulates every parameter's gradient from dy (the output's shape).
  NoGrad backward(const Tensor<Scalar>& dy, Context& ctx) {
    layers_.backward(dy, ctx);
    return {};
  }
  /// Every parameter once (a tied one under the first layer's name), in layer order.
  ParameterList<Scalar> parameters() { return layers_.parameters(); }
  /// The last layer's copies of the tied parameters (the LM head's Parameter::tied copy of
  /// wte), which parameters() leaves out: ZeRO-3 (DataParallel) points their values at the
  /// gathered views too, so the tie is sharded like the rest. Local.
  ParameterList<Scalar> tied_copies() { return layers_.tied_copies(); }
  /// The first layer.
  typename D::First& first() { return layers_.first(); }
  /// The blocks.
  std::vector<typename D::Block>& blocks() noexcept { return layers_.blocks(); }
  /// The last layer.
  typename D::Last& last() { return layers_.last(); }

 private:
  Layers layers_;
};

/// Layers [first_layer, end_layer) of a description (layer 0 the first layer, 1..n the
/// blocks, n + 1 the last layer) as one pipeline stage. With `Form` = TensorParallelForm<Layout>
/// (SequentialStage<D>, the default, and SequenceParallelStage<D>) each layer runs in its
/// tensor-parallel form over `tp` (TensorParallelLayer; at tp size 1 it computes exactly the
/// serial layer), the activations between stages of layout Layout: (b, T, d) replicated over
/// tp, or (b, T / tp, d) under sequence parallelism; with detail::SerialForm
/// (SerialStage<D>) the serial layers, without tp. The stage holding layer 0 takes the model
/// input; the stage holding the last layer outputs what its last layer outputs (logits split
/// over the vocabulary for a head that declares tp_output). Tied parameters (the description's
/// tied_parameter_names) are one parameter where this stage holds the first and the last layer,
/// else tied_parameters(), kept equal by the pipeline.
///
/// Collective over `tp`: every tp rank of the stage builds it from the same description and
/// runs the same forwards and backwards. Throws tessera::Error when the range is empty or
/// outside the model, and what the layers' tensor-parallel forms throw (a tp that does not
/// divide the heads, naming both).
template <SequentialModelDescription D, class Form = detail::TensorParallelForm<Replicate>>
class SequentialStage final
    : public PipelineStage<typename detail::SequentialLayers<D, Form>::T,
                           typename detail::SequentialLayers<D, Form>::ModelInput> {
  using Layers = detail::SequentialLayers<D, Form>;
  using T = typename Layers::T;
  using ModelInput = typename Layers::ModelInput;

 public:
  /// The layout of the last layer's output on the tp axis (Shard<-1>: logits split over the
  /// vocabulary).
  using OutputLayout = typename detail::sequential_layout<typename Layers::L>::type;

  /// This tp rank's form of layers [first_layer, end_layer) of `description` (`tp`: none for
  /// the serial form), named `names[first_layer] .. names[end_layer - 1]` in messages.
  SequentialStage(const D& description, int first_layer, int end_layer, std::optional<Comm> tp,
                  std::vector<std::string> names = {})
      : layers_(description, first_layer, end_layer, tp), tp_rank_(tp ? tp->rank() : 0), tp_size_(tp ? tp->size() : 1),
        names_(std::move(names)) {}

  /// The stage on one micro-batch of the model input. Throws tessera::Error if this stage does
  /// not hold the first layer.
  StageOutput<T> forward_first(const ModelInput& x) override {
    TESSERA_EXPECTS(layers_.has_first(), "SequentialStage ", name(), " does not hold the first layer; it takes activations");
    auto [y, ctx] = layers_.forward_model_input(x);
    return StageOutput<T>{y.contiguous(), StageContext::hold(std::move(ctx))};
  }
  /// The stage on an activation from the previous stage. Throws tessera::Error if this stage
  /// holds the first layer.
  StageOutput<T> forward(const Tensor<T>& x) override {
    TESSERA_EXPECTS(!layers_.has_first(), "SequentialStage ", name(), " holds the first layer; it takes the model input");
    auto [y, ctx] = layers_.forward_activation(x);
    return StageOutput<T>{y.contiguous(), StageContext::hold(std::move(ctx))};
  }
  /// The gradient of the stage's input (empty on the first stage).
  Tensor<T> backward(const Tensor<T>& dy, StageContext& ctx) override {
    return layers_.backward(dy, ctx.get<typename Layers::Context>());
  }
  /// The output shape for an input of shape `input`, from one forward on zeros (cached per
  /// shape; collective over tp like any forward).
  Shape output_shape(const Shape& input) override {
    const auto k = key(input);
    if (auto it = shapes_.find(k); it != shapes_.end()) return it->second;
    const Shape out = layers_.has_first() ? layers_.forward_model_input(ModelInput(input)).output.shape()
                                          : layers_.forward_activation(Tensor<T>(input)).output.shape();
    shapes_.emplace(k, out);
    return out;
  }
  /// This tp rank's parameters, in layer order.
  ParameterList<T> parameters() override { return layers_.parameters(); }
  /// The tied parameters this stage holds without their other end (see the class comment).
  ParameterList<T> tied_parameters() override { return layers_.tied_parameters(); }
  /// The last layer's copies of the tied parameters where this stage holds both ends (see
  /// PipelineStage::tied_copies).
  ParameterList<T> tied_copies() override { return layers_.tied_copies(); }
  /// Whether this stage holds the description's last layer.
  bool holds_last_layer() const override { return layers_.has_last(); }
  /// Each layer's parameters, in layer order (the last layer's tied copies left out where this
  /// stage holds the first layer, as in parameters()).
  std::vector<ParameterList<T>> layer_parameters() override { return layers_.layer_parameters(); }
  /// Calls `hooks` around each layer's forward and backward (LayerHooks); returns true.
  bool set_layer_hooks(LayerHooks* hooks) override {
    layers_.set_hooks(hooks);
    return true;
  }
  /// True except under sequence parallelism, whose replicated parameters' gradients are summed
  /// over tp after every layer's backward.
  bool layer_grads_final() const override { return !detail::sequence_parallel_form<Form>; }
  /// "layers 0-2 (embedding .. h.1), tp rank 0 of 2".
  std::string name() const override {
    const int a = layers_.first_layer(), b = layers_.end_layer() - 1;
    std::string s = a == b ? detail::str("layer ", a) : detail::str("layers ", a, "-", b);
    if (static_cast<int>(names_.size()) > b)
      s += a == b ? detail::str(" (", names_[static_cast<std::size_t>(a)], ")")
                  : detail::str(" (", names_[static_cast<std::size_t>(a)], " .. ", names_[static_cast<std::size_t>(b)], ")");
    return tp_size_ > 1 ? detail::str(s, ", tp rank ", tp_rank_, " of ", tp_size_) : s;
  }

 private:
  static std::tuple<int, std::int64_t, std::int64_t, std::int64_t, std::int64_t> key(const Shape& s) {
    const Index& d = s.dims();
    return {s.rank(), d[0], d[1], d[2], d[3]};
  }

  Layers layers_;
  int tp_rank_, tp_size_;
  std::vector<std::string> names_;
  std::map<std::tuple<int, std::int64_t, std::int64_t, std::int64_t, std::int64_t>, Shape> shapes_;
};

/// The layer names of a description for messages and partitions: its `layer_names()` if it has
/// one, else "first", "block 0", ..., "last".
template <SequentialModelDescription D>
std::vector<std::string> sequential_layer_names(const D& d) {
  if constexpr (requires { d.layer_names(); }) {
    return d.layer_names();
  } else {
    std::vector<std::string> names{"first"};
    for (int i = 0; i < d.num_blocks(); ++i) names.push_back("block " + std::to_string(i));
    names.push_back("last");
    return names;
  }
}

/// A pipeline stage of the serial layers (no tensor parallelism): PipelineParallel's stages.
template <SequentialModelDescription D>
using SerialStage = SequentialStage<D, detail::SerialForm>;
/// A pipeline stage whose layers run tensor-parallel with sequence parallelism.
template <SequentialModelDescription D>
using SequenceParallelStage = SequentialStage<D, detail::TensorParallelForm<Shard<1>>>;

/// Stage `stage` of `partition` (over num_blocks() + 2 layers) of `description`, serial layers
/// (no tp), as an owned PipelineStage: PipelineParallel's stage factory. Throws tessera::Error
/// naming both counts when the partition cuts another number of layers.
template <SequentialModelDescription D>
auto make_serial_stage(const D& description, const StagePartition& partition, int stage) {
  const int n = description.num_blocks() + 2;
  TESSERA_EXPECTS(partition.num_layers() == n, "make_serial_stage: the partition cuts ", partition.num_layers(),
                  " layers, but the model has ", n, " (first layer, ", n - 2, " blocks, last layer)");
  using Stage = SerialStage<D>;
  using Base = PipelineStage<typename detail::SequentialLayers<D, detail::SerialForm>::T,
                             typename detail::SequentialLayers<D, detail::SerialForm>::ModelInput>;
  return std::unique_ptr<Base>(std::make_unique<Stage>(description, partition.begin(stage), partition.end(stage),
                                                       std::nullopt, sequential_layer_names(description)));
}

/// The stage factory of Hybrid for `description` cut by `partition` (over num_blocks() + 2
/// layers): stage s is a SequentialStage of the partition's layers [begin(s), end(s)), every
/// layer tensor-parallel over the tp communicator it is given, the activations between them of
/// layout `Layout` (Replicate; Shard<1>: sequence parallelism, (b, T / tp, d) between stages
/// too). Throws tessera::Error naming both counts when the partition cuts another number of
/// layers.
template <class Layout = Replicate, SequentialModelDescription D>
auto sequential_stages(D description, StagePartition partition) {
  const int n = description.num_blocks() + 2;
  TESSERA_EXPECTS(partition.num_layers() == n, "sequential_stages: the partition cuts ", partition.num_layers(),
                  " layers, but the model has ", n, " (first layer, ", n - 2, " blocks, last layer)");
  using Form = detail::TensorParallelForm<Layout>;
  using Stage = SequentialStage<D, Form>;
  using Base = PipelineStage<typename detail::SequentialLayers<D, Form>::T,
                             typename detail::SequentialLayers<D, Form>::ModelInput>;
  return [description = std::move(description), partition = std::move(partition)](int s, Comm tp) -> std::unique_ptr<Base> {
    return std::make_unique<Stage>(description, partition.begin(s), partition.end(s), std::move(tp),
                                   sequential_layer_names(description));
  };
}

/// Every layer of a description tensor-parallel over `tp` as one Layer (the whole model at
/// pp = 1): model input -> the last layer's output as an Activation of its layout (logits
/// Shard<-1> for a head with tp_output, for VocabParallelCrossEntropy). `Layout` = Shard<1>
/// turns on sequence parallelism. Collective over tp.
template <SequentialModelDescription D, class Layout = Replicate>
class TensorParallelModel {
  using Layers = detail::SequentialLayers<D, detail::TensorParallelForm<Layout>>;
  using T = typename Layers::T;

 public:
  using Input = typename Layers::ModelInput;  ///< the first layer's input
  /// The last layer's output with its layout on the tp axis.
  using Output = Activation<Tensor<T>, typename detail::sequential_layout<typename Layers::L>::type>;
  using Context = typename Layers::Context;  ///< every layer's context

  /// This tp rank's form of every layer of `description`. Collective over tp.
  TensorParallelModel(const D& description, Comm tp) : layers_(description, 0, description.num_blocks() + 2, tp) {}

  /// The last layer's output. Collective over tp.
  ForwardResult<Output, Context> forward(const Input& x) {
    auto r = layers_.forward_model_input(x);
    return {Output{std::move(r.output)}, std::move(r.ctx)};
  }
  /// Accumulates every local parameter gradient (under sequence parallelism, ends with one
  /// all-reduce of the replicated parameters' partial gradients). Collective over tp.
  NoGrad backward(const Output& dy, Context& ctx) {
    layers_.backward(dy.value, ctx);
    return {};
  }
  /// This rank's parameters, in layer order (a tied one once).
  ParameterList<T> parameters() { return layers_.parameters(); }
  /// Under sequence parallelism, the replicated parameters whose gradients are summed over tp at
  /// the end of backward; empty without it.
  ParameterList<T> sequence_parallel_parameters() { return layers_.sequence_parallel_parameters(); }

 private:
  Layers layers_;
};

/// A loss for the last stage of a sequential model, checked at compile time against the layout
/// its last layer leaves the output in: logits split over the vocabulary (Shard<-1>) go to a
/// loss that takes Activation<Tensor<T>, Shard<-1>> (VocabParallelCrossEntropy), replicated
/// outputs to one that takes the plain tensor (nn::CrossEntropy) or a Replicate activation.
/// The loss must sum over its targets. Models PipelineLossFunction; copies share the loss.
template <class Layout, class Loss, std::floating_point T, class Target = Tensor<std::int32_t>>
class LayoutCheckedLoss {
  using Act = Activation<Tensor<T>, Layout>;
  static constexpr bool takes_activation = requires(Loss& l, const Act& y, const Target& t) { l.forward(y, t); };
  static constexpr bool takes_tensor =
      std::same_as<Layout, Replicate> && requires(Loss& l, const Tensor<T>& y, const Target& t) { l.forward(y, t); };
  static_assert(takes_activation || takes_tensor,
                "tessera: the loss does not take the model's output in the layout its last layer leaves it: logits "
                "split over the vocabulary (Shard<-1>, a head with `tp_output`) need a vocab-parallel loss such as "
                "tessera::VocabParallelCrossEntropy; a replicated output needs a loss taking tessera::Tensor.");

  static auto context_probe() {
    if constexpr (takes_activation)
      return typename std::remove_cvref_t<decltype(std::declval<Loss&>().forward(std::declval<const Act&>(),
                                                                                  std::declval<const Target&>()))>::Context{};
    else if constexpr (takes_tensor)
      return typename std::remove_cvref_t<decltype(std::declval<Loss&>().forward(std::declval<const Tensor<T>&>(),
                                                                                  std::declval<const Target&>()))>::Context{};
    else
      return detail::NotALayer{};
  }

 public:
  /// The context of the wrapped loss.
  using Context = decltype(context_probe());

  /// Wraps `loss` (moved in).
  explicit LayoutCheckedLoss(Loss loss) : loss_(std::make_shared<Loss>(std::move(loss))) {}
  /// The summed loss of `y` (this rank's part of the output) against `targets`.
  ForwardResult<T, Context> forward(const Tensor<T>& y, const Target& targets) const {
    if constexpr (takes_activation) {
      return loss_->forward(Act{y}, targets);
    } else if constexpr (takes_tensor) {
      return loss_->forward(y, targets);
    } else {
      (void)y;
      (void)targets;
      return {};
    }
  }
  /// The gradient of the output for `dloss` times the summed loss, as a plain tensor.
  Tensor<T> backward(T dloss, const Context& ctx) const {
    if constexpr (takes_activation || takes_tensor) {
      auto g = loss_->backward(dloss, ctx);
      if constexpr (requires { g.value; })
        return g.value;
      else
        return g;
    } else {
      (void)dloss;
      (void)ctx;
      return {};
    }
  }
  /// The number of units the loss sums over.
  std::int64_t count_valid(const Target& targets) const {
    if constexpr (takes_activation || takes_tensor)
      return loss_->count_valid(targets);
    else
      return (void)targets, 0;
  }

 private:
  std::shared_ptr<Loss> loss_;
};

/// `loss` checked against the output layout of description D's last layer (see
/// LayoutCheckedLoss): what Hybrid's loss factory returns for a sequential model.
template <SequentialModelDescription D, class Loss>
auto sequential_loss(Loss loss) {
  using Last = typename TensorParallelLayer<typename D::Last>::type;
  using T = typename LayerTraits<Last>::Scalar;
  return LayoutCheckedLoss<typename detail::sequential_layout<Last>::type, Loss, T>(std::move(loss));
}

}  // namespace tessera
