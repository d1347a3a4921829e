#pragma once
/// @file
/// DeviceLlama: the Llama example's whole model (llama::Llama) trained on one GPU: the token
/// embedding (cuda/ops/embedding.cuh), the decoder layers (DeviceDecoderLayer), the final RMSNorm
/// and the untied lm_head product, the softmax cross-entropy fused with its gradient
/// (cuda/ops/cross_entropy.cuh), and AdamW over one flat fp32 buffer (cuda/ops/adamw.cuh; decay on
/// matrices and the embedding, none on the norms, as optim::weight_decay_groups). Storage C: float,
/// or bf16 with fp32 master weights, gradients and moments (mixed precision, as the GPT's device
/// path). The flat buffer is flat_model_layout's (pack_model / unpack_model convert to and from
/// the CPU model). One GPU per instance; data parallelism through DeviceDataParallel
/// (ready_offsets, set_backward_hook, gradient_view); tensor and pipeline parallelism over this
/// model are not built yet.
/// CUDA code: compile with nvcc.

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "llama/device/device_decoder_layer.cuh"
#include "llama/device/flat_layer_layout.hpp"
#include "llama/device/llama_kernels.cuh"
#include "tessera/core/error.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/ops/adamw.cuh"
#include "tessera/cuda/ops/convert.cuh"
#include "tessera/cuda/ops/cross_entropy.cuh"
#include "tessera/cuda/ops/embedding.cuh"
#include "tessera/cuda/ops/global_norm.cuh"
#include "tessera/cuda/stream.hpp"
#include "tessera/optim/adamw.hpp"

namespace llama::device {

/// A Llama of `config` on one GPU for batches of (B, T) tokens (file comment).
template <class C>
class DeviceLlama {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, tc::bf16>, "DeviceLlama: storage is float or bf16");

 public:
  /// The model with the weights `flat` (flat_model_layout(config).total values, e.g.
  /// pack_model of a CPU Llama), on `stream`, its products through `blas`. Throws
  /// tessera::Error naming the sizes when `flat` has another length, B or T is not positive, or
  /// the config is invalid (llama::validated).
  DeviceLlama(const LlamaConfig& config, std::int64_t B, std::int64_t T, const std::vector<float>& flat,
              const tc::Stream& stream, tc::BlasLt& blas)
      : c_(validated(config)), layout_(flat_model_layout(config)), B_(B), T_(T), stream_(stream), blas_(blas) {
    TESSERA_EXPECTS(static_cast<std::int64_t>(flat.size()) == layout_.total, "DeviceLlama: ", flat.size(),
                    " weights for a model of ", layout_.total);
    TESSERA_EXPECTS(B > 0 && T > 0, "DeviceLlama: batch ", B, " x sequence ", T, " must be positive");
    const std::int64_t N = B * T, d = c_.d_model, V = c_.vocab_size, n = layout_.total;
    master_ = tc::to_device<float>(tessera::Tensor<float>::from(tessera::Shape{n}, std::span<const float>(flat)), stream);
    if constexpr (!std::is_same_v<C, float>) {
      weights_ = tc::DeviceTensor<C>::empty({n}, stream);
      tc::ops::convert_from_f32<C>(stream, master_, weights_);
    }
    grads_ = tc::DeviceTensor<float>::zeros({n}, stream);
    m_ = tc::DeviceTensor<float>::zeros({n}, stream);
    v_ = tc::DeviceTensor<float>::zeros({n}, stream);
    auto scratch = std::make_shared<DecoderScratch<C>>(c_, B, T, stream);  // one for every layer
    for (std::int64_t i = 0; i < c_.n_layer; ++i)
      layers_.push_back(std::make_unique<DeviceDecoderLayer<C>>(c_, B, T, stream, blas, scratch));
    acts_.reserve(static_cast<std::size_t>(c_.n_layer + 1));
    for (std::int64_t i = 0; i <= c_.n_layer; ++i) acts_.push_back(tc::DeviceTensor<C>::empty({B, T, d}, stream));
    hn_ = tc::DeviceTensor<C>::empty({B, T, d}, stream);
    dh_ = tc::DeviceTensor<C>::empty({B, T, d}, stream);
    dx_ = tc::DeviceTensor<C>::empty({B, T, d}, stream);
    logits_ = tc::DeviceTensor<C>::empty({N, V}, stream);
    losses_ = tc::DeviceTensor<float>::empty({N}, stream);
    rstd_ = tc::DeviceTensor<float>::empty({N}, stream);
    partial_ = tc::DeviceTensor<float>::empty({rms_norm_partial_size(N, d)}, stream);
    // AdamW's groups: 0 decays (the embedding, every matrix, lm_head), 1 does not (the norms).
    std::vector<tc::ops::FlatSegment> segments;
    for (const FlatGroup& g : adamw_segments(layout_))
      segments.push_back({.offset = g.offset, .numel = g.numel, .group = g.group});
    chunks_ = tc::ops::adamw_chunks(stream, segments);
  }

  /// The mean cross-entropy of the batch (tokens, targets: B x T int32 in [0, V), checked on the
  /// host), its gradients added into the flat gradients (gradient_view()), each token's loss weighted by `loss_scale` (0: 1 /
  /// (B T), the batch's mean; under data parallelism 1 / the global batch's tokens, as the CPU
  /// DataParallel pre-divides, the ranks' gradients then summed). Calls the backward hook at
  /// each of ready_offsets() as backward passes it. Throws tessera::Error naming a token or target
  /// out of range, or the sizes.
  double forward_backward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets,
                          double loss_scale = 0) {
    const std::int64_t N = B_ * T_, d = c_.d_model, V = c_.vocab_size;
    TESSERA_EXPECTS(static_cast<std::int64_t>(tokens.size()) == N && static_cast<std::int64_t>(targets.size()) == N,
                    "DeviceLlama: ", tokens.size(), " tokens and ", targets.size(), " targets for a batch of ", B_,
                    " x ", T_);
    for (std::size_t i = 0; i < tokens.size(); ++i)
      TESSERA_EXPECTS(tokens[i] >= 0 && tokens[i] < V && targets[i] >= 0 && targets[i] < V, "DeviceLlama: token ",
                      tokens[i], " or target ", targets[i], " at position ", i, " is outside the vocabulary [0, ", V, ")");
    const tessera::Shape bt{B_, T_};
    ids_ = tc::to_device<std::int32_t>(tessera::Tensor<std::int32_t>::from(bt, tokens), stream_);
    tgt_ = tc::to_device<std::int32_t>(tessera::Tensor<std::int32_t>::from(bt, targets), stream_);
    const C* w = weights();
    // Forward.
    tc::ops::embedding_forward<C>(stream_, ids_, view(w + layout_.embed, {V, d}), acts_[0]);
    for (std::int64_t i = 0; i < c_.n_layer; ++i)
      layers_[static_cast<std::size_t>(i)]->forward(acts_[static_cast<std::size_t>(i)], w + layout_.layer_at(i),
                                                    acts_[static_cast<std::size_t>(i + 1)]);
    const tc::DeviceTensor<C>& top = acts_.back();
    rms_norm_forward<C>(stream_, top, view(w + layout_.norm, {d}), hn_, rstd_, static_cast<float>(c_.norm_eps));
    blas_.gemm(stream_, tc::GemmShape{.m = N, .n = V, .k = d}, static_cast<const C*>(hn_.data()), w + layout_.head,
               logits_.data(), 1.f, 0.f);
    // Loss and dlogits (in place), the mean over the N tokens.
    const float dloss = static_cast<float>(loss_scale > 0 ? loss_scale : 1.0 / static_cast<double>(N));
    tc::ops::softmax_cross_entropy<C>(stream_, logits_, V, tgt_, losses_, &dloss);
    // Backward: the head, the final norm, the layers, the embedding.
    float* g = grads_.data();
    blas_.gemm(stream_, tc::GemmShape{.trans_a = true, .m = d, .n = V, .k = N}, static_cast<const C*>(hn_.data()),
               static_cast<const C*>(logits_.data()), g + layout_.head, 1.f, 1.f);
    blas_.gemm(stream_, tc::GemmShape{.trans_b = true, .m = N, .n = d, .k = V}, static_cast<const C*>(logits_.data()),
               w + layout_.head, dh_.data(), 1.f, 0.f);
    rms_norm_backward<C>(stream_, dh_, top, view(w + layout_.norm, {d}), rstd_, dx_,
                         tc::DeviceView<float>(g + layout_.norm, tessera::Shape{d}), partial_);
    ready(layout_.norm);
    for (std::int64_t i = c_.n_layer - 1; i >= 0; --i) {
      // dx_ holds the gradient of layer i's output; its input gradient goes to dh_, then swaps.
      layers_[static_cast<std::size_t>(i)]->backward(dx_, w + layout_.layer_at(i), g + layout_.layer_at(i), dh_);
      std::swap(dx_, dh_);
      ready(layout_.layer_at(i));
    }
    tc::ops::embedding_backward<C>(stream_, ids_, dx_, tc::DeviceView<float>(g + layout_.embed, tessera::Shape{V, d}));
    ready(0);
    const tessera::Tensor<float> l = tc::to_host(losses_, stream_);
    double sum = 0;
    for (std::int64_t i = 0; i < N; ++i) sum += l.data()[i];
    return sum / static_cast<double>(N);
  }

  /// Where backward finishes the gradients, in its order (device_grad_buckets' `ready`): the
  /// final norm's first element (after the head and the norm), each layer's from the last down,
  /// then 0 (after the embedding). Descending.
  std::vector<std::int64_t> ready_offsets() const {
    std::vector<std::int64_t> r{layout_.norm};
    for (std::int64_t i = c_.n_layer - 1; i >= 0; --i) r.push_back(layout_.layer_at(i));
    r.push_back(0);
    return r;
  }
  /// Called by forward_backward with each offset from which the gradients are final (after the
  /// work producing them is queued on the stream): DeviceDataParallel::gradients_final_from.
  void set_backward_hook(std::function<void(std::int64_t)> hook) { hook_ = std::move(hook); }
  /// The flat fp32 gradients (flat_model_layout's order), e.g. for DeviceDataParallel.
  tc::DeviceView<float> gradient_view() const { return grads_.view(); }
  /// Elements of the flat buffers.
  std::int64_t numel() const noexcept { return layout_.total; }

  /// The L2 norm of every gradient (one fp32 sum of squares on the device; blocks until it is
  /// computed), e.g. for clipping as optim::clip_grad_norm: step(options, clip_scale).
  double grad_norm() {
    if (norm_.numel() == 0) {
      norm_ = tc::DeviceTensor<float>::empty({1}, stream_);
      norm_ws_ = tc::DeviceTensor<float>::empty({tc::ops::norm_blocks}, stream_);
    }
    tc::ops::global_sum_of_squares(stream_, grads_, norm_, norm_ws_);
    return std::sqrt(static_cast<double>(tc::to_host(tc::DeviceView<const float>(norm_), stream_).data()[0]));
  }
  /// The factor optim::clip_grad_norm(params, max_norm) multiplies the gradients by for the
  /// gradient norm `norm`: min(1, max_norm / (norm + 1e-6)).
  static float clip_scale(double norm, double max_norm) {
    const double coef = max_norm / (norm + 1e-6);
    return coef < 1 ? static_cast<float>(coef) : 1.f;
  }

  /// One AdamW step (optim::AdamW's arithmetic; `options.weight_decay` on group 0 only) of the
  /// master weights from the flat gradients times `grad_scale` (1, or clip_scale's factor), then
  /// the gradients zeroed (and the bf16 copy refreshed).
  void step(const tessera::optim::AdamWOptions& options, float grad_scale = 1.f) {
    ++steps_;
    tc::ops::AdamWGroupScalars s{};
    s.group[0] = tc::math::adamw_scalars(options.lr, options.beta1, options.beta2, options.eps, options.weight_decay, steps_);
    s.group[1] = tc::math::adamw_scalars(options.lr, options.beta1, options.beta2, options.eps, 0.0, steps_);
    if constexpr (std::is_same_v<C, float>)
      tc::ops::adamw_step<float>(stream_, master_, grads_, m_, v_, chunks_, s, grad_scale);
    else
      tc::ops::adamw_step<C>(stream_, master_, grads_, m_, v_, chunks_, s, grad_scale, weights_);
    grads_.fill_zero(stream_);
  }

  /// The fp32 master weights, flat (flat_model_layout's order; unpack_model gives the CPU model).
  std::vector<float> download() const {
    const tessera::Tensor<float> h = tc::to_host(master_, stream_);
    return {h.data(), h.data() + h.numel()};
  }
  /// The accumulated gradients, flat.
  std::vector<float> download_grads() const {
    const tessera::Tensor<float> h = tc::to_host(grads_, stream_);
    return {h.data(), h.data() + h.numel()};
  }
  /// The layout of download() and download_grads().
  const FlatModelLayout& layout() const noexcept { return layout_; }

 private:
  const C* weights() const {
    if constexpr (std::is_same_v<C, float>)
      return master_.data();
    else
      return weights_.data();
  }
  static tc::DeviceView<const C> view(const C* p, tessera::Shape s) { return {p, s}; }
  void ready(std::int64_t offset) {
    if (hook_) hook_(offset);
  }

  LlamaConfig c_;
  FlatModelLayout layout_;
  std::int64_t B_, T_;
  const tc::Stream& stream_;
  tc::BlasLt& blas_;
  tc::DeviceTensor<float> master_, grads_, m_, v_;
  tc::DeviceTensor<C> weights_;  // the bf16 copy the products read (empty for fp32)
  std::vector<std::unique_ptr<DeviceDecoderLayer<C>>> layers_;
  std::vector<tc::DeviceTensor<C>> acts_;  // the input of layer i at i, the last layer's output at n_layer
  tc::DeviceTensor<C> hn_, dh_, dx_, logits_;
  tc::DeviceTensor<float> losses_, rstd_, partial_, norm_, norm_ws_;
  tc::DeviceTensor<std::int32_t> ids_, tgt_;
  tc::ops::AdamWChunks chunks_;
  long long steps_ = 0;
  std::function<void(std::int64_t)> hook_;
};

}  // namespace llama::device
