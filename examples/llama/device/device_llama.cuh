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
/// (ready_offsets, set_backward_hook, gradient_view); tensor parallelism in Megatron-LM's layout
/// over a DeviceComm of the tp ranks: the decoder layers' heads and F columns
/// (DeviceDecoderLayer), the vocab-parallel embedding (each rank looks up its vocabulary rows,
/// zeros for the others', summed over tp), the vocab-parallel lm_head and loss
/// (ops::vocab_parallel_cross_entropy: the (N, V) logits are never gathered), the final norm
/// replicated. Pipeline parallelism over this model is not built yet.
/// CUDA code: compile with nvcc.

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "llama/device/device_decoder_layer.cuh"
#include "llama/device/flat_layer_layout.hpp"
#include "llama/device/llama_kernels.cuh"
#include "tessera/core/error.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/ops/adamw.cuh"
#include "tessera/cuda/ops/convert.cuh"
#include "tessera/cuda/ops/cross_entropy.cuh"
#include "tessera/cuda/ops/embedding.cuh"
#include "tessera/cuda/ops/global_norm.cuh"
#include "tessera/cuda/ops/vocab_parallel_cross_entropy.cuh"
#include "tessera/cuda/stream.hpp"
#include "tessera/optim/adamw.hpp"

namespace llama::device {

/// A Llama of `config` on one GPU for batches of (B, T) tokens (file comment).
template <class C>
class DeviceLlama {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, tc::bf16>, "DeviceLlama: storage is float or bf16");

 public:
  /// The model with the weights `flat` (flat_model_layout(config, tp).total values, e.g.
  /// pack_model of a CPU Llama, at tp > 1 this rank's shard), on `stream`, its products through
  /// `blas`; with `tp` (a DeviceComm of the tensor-parallel ranks, its collectives on `stream`;
  /// size 1 or null: no tensor parallelism) one rank's shard of the model, every forward_backward
  /// and grad_norm then collective over tp. Throws tessera::Error naming the sizes when `flat`
  /// has another length, B or T is not positive, tp does not divide the vocabulary, heads, KV
  /// heads or F, tp runs on another stream, or the config is invalid (llama::validated).
  DeviceLlama(const LlamaConfig& config, std::int64_t B, std::int64_t T, const std::vector<float>& flat,
              const tc::Stream& stream, tc::BlasLt& blas, tc::DeviceComm* tp = nullptr)
      : c_(validated(config)), tp_(tp != nullptr && tp->size() > 1 ? tp : nullptr), tp_size_(tp_ ? tp_->size() : 1),
        tp_rank_(tp_ ? tp_->rank() : 0), layout_(flat_model_layout(config, tp_size_)), B_(B), T_(T), stream_(stream),
        blas_(blas) {
    TESSERA_EXPECTS(tp_ == nullptr || tp_->stream().get() == stream.get(),
                    "DeviceLlama: the tensor-parallel DeviceComm must run its collectives on the model's stream");
    TESSERA_EXPECTS(static_cast<std::int64_t>(flat.size()) == layout_.total, "DeviceLlama: ", flat.size(),
                    " weights for a model of ", layout_.total, tp_size_ > 1 ? " (one rank's shard at tp " : "",
                    tp_size_ > 1 ? std::to_string(tp_size_) + ")" : std::string());
    TESSERA_EXPECTS(B > 0 && T > 0, "DeviceLlama: batch ", B, " x sequence ", T, " must be positive");
    const std::int64_t N = B * T, d = c_.d_model, V = layout_.vocab_rows, n = layout_.total;
    master_ = tc::to_device<float>(tessera::Tensor<float>::from(tessera::Shape{n}, std::span<const float>(flat)), stream);
    if constexpr (!std::is_same_v<C, float>) {
      weights_ = tc::DeviceTensor<C>::empty({n}, stream);
      tc::ops::convert_from_f32<C>(stream, master_, weights_);
    }
    grads_ = tc::DeviceTensor<float>::zeros({n}, stream);
    m_ = tc::DeviceTensor<float>::zeros({n}, stream);
    v_ = tc::DeviceTensor<float>::zeros({n}, stream);
    auto scratch = std::make_shared<DecoderScratch<C>>(c_, B, T, stream, tp_size_);  // one for every layer
    for (std::int64_t i = 0; i < c_.n_layer; ++i)
      layers_.push_back(std::make_unique<DeviceDecoderLayer<C>>(c_, B, T, stream, blas, scratch, tp_));
    acts_.reserve(static_cast<std::size_t>(c_.n_layer + 1));
    for (std::int64_t i = 0; i <= c_.n_layer; ++i) acts_.push_back(tc::DeviceTensor<C>::empty({B, T, d}, stream));
    hn_ = tc::DeviceTensor<C>::empty({B, T, d}, stream);
    dh_ = tc::DeviceTensor<C>::empty({B, T, d}, stream);
    dx_ = tc::DeviceTensor<C>::empty({B, T, d}, stream);
    logits_ = tc::DeviceTensor<C>::empty({N, V}, stream);
    losses_ = tc::DeviceTensor<float>::empty({N}, stream);
    rstd_ = tc::DeviceTensor<float>::empty({N}, stream);
    partial_ = tc::DeviceTensor<float>::empty({rms_norm_partial_size(N, d)}, stream);
    if (tp_ != nullptr) {
      local_ids_ = tc::DeviceTensor<std::int32_t>::empty({B, T}, stream);
      stats_ = tc::DeviceTensor<float>::empty({3 * N}, stream);
      sum_ = tc::DeviceTensor<float>::empty({N, d}, stream);
    }
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
    const std::int64_t N = B_ * T_, d = c_.d_model, V = c_.vocab_size, Vl = layout_.vocab_rows;
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
    // Forward. Under tp each rank looks up the tokens of its vocabulary rows (the others' read
    // as zero rows) and the lookups are summed: one rank holds each row, so the sum is exact.
    if (tp_ == nullptr) {
      tc::ops::embedding_forward<C>(stream_, ids_, view(w + layout_.embed, {Vl, d}), acts_[0]);
    } else {
      tc::ops::vocab_local_ids(stream_, ids_, local_ids_, tp_rank_ * Vl, Vl, Vl);
      tc::ops::embedding_forward<C>(stream_, local_ids_, view(w + layout_.embed, {Vl, d}), acts_[0]);
      sum_over_tp(acts_[0]);
    }
    for (std::int64_t i = 0; i < c_.n_layer; ++i)
      layers_[static_cast<std::size_t>(i)]->forward(acts_[static_cast<std::size_t>(i)], w + layout_.layer_at(i),
                                                    acts_[static_cast<std::size_t>(i + 1)]);
    const tc::DeviceTensor<C>& top = acts_.back();
    rms_norm_forward<C>(stream_, top, view(w + layout_.norm, {d}), hn_, rstd_, static_cast<float>(c_.norm_eps));
    // The logits of this rank's vocabulary columns (all of them at tp 1).
    blas_.gemm(stream_, tc::GemmShape{.m = N, .n = Vl, .k = d}, static_cast<const C*>(hn_.data()), w + layout_.head,
               logits_.data(), 1.f, 0.f);
    // Loss and dlogits (in place), the mean over the N tokens; under tp vocab-parallel (two
    // small all-reduces; every rank gets every token's loss).
    const float dloss = static_cast<float>(loss_scale > 0 ? loss_scale : 1.0 / static_cast<double>(N));
    const tc::DeviceView<const std::int32_t> flat_targets(tgt_.data(), tessera::Shape{N});
    if (tp_ == nullptr)
      tc::ops::softmax_cross_entropy<C>(stream_, logits_, V, flat_targets, losses_, &dloss);
    else
      tc::ops::vocab_parallel_cross_entropy<C>(stream_, *tp_, logits_, tp_rank_ * Vl, Vl, flat_targets, losses_,
                                               stats_, &dloss);
    // Backward: the head, the final norm, the layers, the embedding. Under tp the head's input
    // gradient is this rank's columns' part, summed over tp in fp32 (a column-parallel product).
    float* g = grads_.data();
    blas_.gemm(stream_, tc::GemmShape{.trans_a = true, .m = d, .n = Vl, .k = N}, static_cast<const C*>(hn_.data()),
               static_cast<const C*>(logits_.data()), g + layout_.head, 1.f, 1.f);
    const tc::GemmShape head_input{.trans_b = true, .m = N, .n = d, .k = Vl};
    if (tp_ == nullptr) {
      blas_.gemm(stream_, head_input, static_cast<const C*>(logits_.data()), w + layout_.head, dh_.data(), 1.f, 0.f);
    } else {
      blas_.gemm(stream_, head_input, static_cast<const C*>(logits_.data()), w + layout_.head, sum_.data(), 1.f, 0.f);
      tp_->all_reduce(sum_.view(), tessera::ReduceOp::sum);
      tc::ops::convert_from_f32<C>(stream_, sum_, dh_);
    }
    rms_norm_backward<C>(stream_, dh_, top, view(w + layout_.norm, {d}), rstd_, dx_,
                         tc::DeviceView<float>(g + layout_.norm, tessera::Shape{d}), partial_);
    ready(layout_.norm);
    for (std::int64_t i = c_.n_layer - 1; i >= 0; --i) {
      // dx_ holds the gradient of layer i's output; its input gradient goes to dh_, then swaps.
      layers_[static_cast<std::size_t>(i)]->backward(dx_, w + layout_.layer_at(i), g + layout_.layer_at(i), dh_);
      std::swap(dx_, dh_);
      ready(layout_.layer_at(i));
    }
    tc::ops::embedding_backward<C>(stream_, tp_ == nullptr ? ids_ : local_ids_, dx_,
                                   tc::DeviceView<float>(g + layout_.embed, tessera::Shape{Vl, d}));
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

  /// The L2 norm of every gradient of the whole model (one fp32 sum of squares on the device;
  /// blocks until it is computed), e.g. for clipping as optim::clip_grad_norm: step(options,
  /// clip_scale). Under tp each rank's shards count once and the replicated norms' gradients
  /// 1 / tp, summed over tp: collective over tp, the same value on every rank.
  double grad_norm() {
    if (norm_.numel() == 0) {
      norm_ = tc::DeviceTensor<float>::empty({1}, stream_);
      norm_ws_ = tc::DeviceTensor<float>::empty({tc::ops::norm_blocks}, stream_);
    }
    if (tp_ == nullptr) {
      tc::ops::global_sum_of_squares(stream_, grads_, norm_, norm_ws_);
    } else {  // adamw_segments' groups: 0 sharded, 1 replicated
      tc::ops::weighted_sum_of_squares(stream_, grads_, chunks_, 1.f, 1.f / static_cast<float>(tp_size_), norm_,
                                       norm_ws_);
      tp_->all_reduce(norm_.view(), tessera::ReduceOp::sum);
    }
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
  /// The layout of download() and download_grads() (at tp > 1 one rank's shard).
  const FlatModelLayout& layout() const noexcept { return layout_; }
  /// Tensor-parallel ranks (1 without tp) and this rank's index among them.
  int tp_size() const noexcept { return tp_size_; }
  /// (See tp_size.)
  int tp_rank() const noexcept { return tp_rank_; }

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
  // x (N, d) <- its sum over tp, in fp32 (exact here: the vocab-parallel lookups have one
  // nonzero term per element).
  void sum_over_tp(const tc::DeviceTensor<C>& x) {
    if constexpr (std::is_same_v<C, float>) {
      tp_->all_reduce(x.view(), tessera::ReduceOp::sum);
    } else {
      tc::ops::convert_to_f32<C>(stream_, x, sum_);
      tp_->all_reduce(sum_.view(), tessera::ReduceOp::sum);
      tc::ops::convert_from_f32<C>(stream_, sum_, x);
    }
  }

  LlamaConfig c_;
  tc::DeviceComm* tp_;  // null at tp 1
  int tp_size_, tp_rank_;
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
  tc::DeviceTensor<float> stats_, sum_;  // under tp: the loss's statistics, fp32 sums over tp
  tc::DeviceTensor<std::int32_t> ids_, tgt_, local_ids_;
  tc::ops::AdamWChunks chunks_;
  long long steps_ = 0;
  std::function<void(std::int64_t)> hook_;
};

}  // namespace llama::device
