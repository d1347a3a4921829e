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
/// replicated. Pipeline parallelism: an instance built with a tessera::cuda::DeviceStage holds
/// the pipeline layers [first, end) of pipeline_num_layers (0 the embedding, 1..n_layer the
/// decoder layers, n_layer + 1 the final norm with lm_head; its weights one contiguous range of
/// the flat buffer, stage_range) and runs one micro-batch at a time from and to fp32 boundary
/// activations (stage_forward / stage_backward) in activation slots (set_slots), the interface
/// tessera::cuda::run_pipeline_step walks a schedule over (llama_pipeline.cuh). The untied
/// lm_head needs no embedding group.
/// CUDA code: compile with nvcc.

#include <algorithm>
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
#include "tessera/core/batch_position.hpp"
#include "tessera/core/error.hpp"
#include "tessera/cuda/blas_lt.hpp"
#include "tessera/cuda/device_comm.hpp"
#include "tessera/cuda/device_tensor.hpp"
#include "tessera/cuda/element_math.hpp"
#include "tessera/cuda/flat_gpt_layout.hpp"
#include "tessera/cuda/ops/adamw.cuh"
#include "tessera/cuda/ops/bias_grad.cuh"
#include "tessera/cuda/ops/convert.cuh"
#include "tessera/cuda/ops/cross_entropy.cuh"
#include "tessera/cuda/ops/embedding.cuh"
#include "tessera/cuda/ops/global_norm.cuh"
#include "tessera/cuda/ops/vocab_parallel_cross_entropy.cuh"
#include "tessera/cuda/stream.hpp"
#include "tessera/optim/adamw.hpp"

namespace llama::device {

/// A Llama of `config` on one GPU for batches of (B, T) tokens, or one tensor-parallel rank's
/// shard of it, or one pipeline stage of it (file comment).
template <class C>
class DeviceLlama {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, tc::bf16>, "DeviceLlama: storage is float or bf16");

 public:
  /// The model with the weights `flat` (the stage_range of flat_model_layout(config, tp): the
  /// whole buffer for the whole model, e.g. pack_model of a CPU Llama, at tp > 1 this rank's
  /// shard), on `stream`, its products through `blas`; with `tp` (a DeviceComm of the
  /// tensor-parallel ranks, its collectives on `stream`; size 1 or null: no tensor parallelism)
  /// one rank's shard, every pass and grad_norm then collective over tp; with `stage` the
  /// pipeline layers [stage.first, stage.end) only (end -1: n_layer + 2, the whole model).
  /// Throws tessera::Error naming the sizes when `flat` has another length, B or T is not
  /// positive, tp does not divide the vocabulary, heads, KV heads or F, tp runs on another
  /// stream, the stage is empty or outside the model, or the config is invalid (llama::validated).
  DeviceLlama(const LlamaConfig& config, std::int64_t B, std::int64_t T, const std::vector<float>& flat,
              const tc::Stream& stream, tc::BlasLt& blas, tc::DeviceComm* tp = nullptr, tc::DeviceStage stage = {})
      : c_(validated(config)), tp_(tp != nullptr && tp->size() > 1 ? tp : nullptr), tp_size_(tp_ ? tp_->size() : 1),
        tp_rank_(tp_ ? tp_->rank() : 0), layout_(flat_model_layout(config, tp_size_)), first_(stage.first),
        end_(stage.end < 0 ? static_cast<int>(pipeline_num_layers(c_)) : stage.end),
        range_(stage_range(layout_, first_, end_)), B_(B), T_(T), stream_(stream), blas_(blas) {
    TESSERA_EXPECTS(tp_ == nullptr || tp_->stream().get() == stream.get(),
                    "DeviceLlama: the tensor-parallel DeviceComm must run its collectives on the model's stream");
    const std::int64_t n = range_.hi - range_.lo;
    TESSERA_EXPECTS(static_cast<std::int64_t>(flat.size()) == n, "DeviceLlama: ", flat.size(), " weights for ",
                    whole() ? "a model of " : "a stage of ", n, tp_size_ > 1 ? " (one rank's shard at tp " : "",
                    tp_size_ > 1 ? std::to_string(tp_size_) + ")" : std::string());
    TESSERA_EXPECTS(B > 0 && T > 0, "DeviceLlama: batch ", B, " x sequence ", T, " must be positive");
    const std::int64_t N = B * T, d = c_.d_model;
    l0_ = std::max(first_, 1) - 1;
    l1_ = std::min<std::int64_t>(end_, c_.n_layer + 1) - 1;
    master_ = tc::to_device<float>(tessera::Tensor<float>::from(tessera::Shape{n}, std::span<const float>(flat)), stream);
    if constexpr (!std::is_same_v<C, float>) {
      weights_ = tc::DeviceTensor<C>::empty({n}, stream);
      tc::ops::convert_from_f32<C>(stream, master_, weights_);
    }
    grads_ = tc::DeviceTensor<float>::zeros({n}, stream);
    m_ = tc::DeviceTensor<float>::zeros({n}, stream);
    v_ = tc::DeviceTensor<float>::zeros({n}, stream);
    scratch_ = std::make_shared<DecoderScratch<C>>(c_, B, T, stream, tp_size_);  // one for every layer and slot
    dh_ = tc::DeviceTensor<C>::empty({B, T, d}, stream);
    dx_ = tc::DeviceTensor<C>::empty({B, T, d}, stream);
    if (has_head()) {
      losses_ = tc::DeviceTensor<float>::empty({N}, stream);
      loss_sum_ = tc::DeviceTensor<float>::zeros({1}, stream);
      loss_ws_ = tc::DeviceTensor<float>::empty({tc::ops::bias_grad_chunks(N)}, stream);
      partial_ = tc::DeviceTensor<float>::empty({rms_norm_partial_size(N, d)}, stream);
    }
    if (tp_ != nullptr) {
      local_ids_ = tc::DeviceTensor<std::int32_t>::empty({B, T}, stream);
      stats_ = tc::DeviceTensor<float>::empty({3 * N}, stream);
      sum_ = tc::DeviceTensor<float>::empty({N, d}, stream);
    }
    // AdamW's groups: 0 decays (the embedding, every matrix, lm_head), 1 does not (the norms);
    // under tp also the gradient norm's: 0 sharded, 1 replicated.
    std::vector<tc::ops::FlatSegment> segments;
    for (const FlatGroup& g : stage_segments(layout_, first_, end_))
      segments.push_back({.offset = g.offset, .numel = g.numel, .group = g.group});
    chunks_ = tc::ops::adamw_chunks(stream, segments);
    set_slots(1);
  }

  /// The mean cross-entropy of the batch (tokens, targets: B x T int32 in [0, V), checked on the
  /// host), its gradients added into the flat gradients (gradient_view()), each token's loss
  /// weighted by `loss_scale` (0: 1 / (B T), the batch's mean; under data parallelism 1 / the
  /// global batch's tokens, as the CPU DataParallel pre-divides, the ranks' gradients then
  /// summed). The loss is the tokens' losses summed in fp32 on the device, over N. Calls the
  /// backward hook at each of ready_offsets() as backward passes it. The whole model only (a stage runs under a pipeline: stage_forward / stage_backward).
  /// Collective over tp. Throws tessera::Error naming a token or target out of range, or the sizes.
  double forward_backward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets,
                          double loss_scale = 0) {
    const std::int64_t N = B_ * T_, V = c_.vocab_size;
    TESSERA_EXPECTS(whole(), "DeviceLlama::forward_backward: this instance is the pipeline stage of layers [", first_,
                    ", ", end_, "); a pipeline runs it (stage_forward / stage_backward)");
    TESSERA_EXPECTS(static_cast<std::int64_t>(tokens.size()) == N && static_cast<std::int64_t>(targets.size()) == N,
                    "DeviceLlama: ", tokens.size(), " tokens and ", targets.size(), " targets for a batch of ", B_,
                    " x ", T_);
    for (std::size_t i = 0; i < tokens.size(); ++i)
      TESSERA_EXPECTS(tokens[i] >= 0 && tokens[i] < V && targets[i] >= 0 && targets[i] < V, "DeviceLlama: token ",
                      tokens[i], " or target ", targets[i], " at position ", i, " is outside the vocabulary [0, ", V, ")");
    const tessera::Shape bt{B_, T_};
    ids_ = tc::to_device<std::int32_t>(tessera::Tensor<std::int32_t>::from(bt, tokens), stream_);
    tgt_ = tc::to_device<std::int32_t>(tessera::Tensor<std::int32_t>::from(bt, targets), stream_);
    const float dloss = static_cast<float>(loss_scale > 0 ? loss_scale : 1.0 / static_cast<double>(N));
    loss_sum_.fill_zero(stream_);
    stage_forward(0, B_, T_, ids_, {}, tgt_, &dloss, {});
    stage_backward(0, ids_, {}, {});
    return take_loss_sum() / static_cast<double>(N);
  }

  /// The model's sizes (validated).
  const LlamaConfig& config() const noexcept { return c_; }
  /// Whether this instance holds the embedding (pipeline layer 0), the head (the last), both.
  bool has_embedding() const noexcept { return first_ == 0; }
  /// (See has_embedding.)
  bool has_head() const noexcept { return end_ == pipeline_num_layers(c_); }
  /// (See has_embedding.)
  bool whole() const noexcept { return has_embedding() && has_head(); }
  /// The pipeline layers held, [first, end).
  tc::DeviceStage stage() const noexcept { return {first_, end_}; }
  /// The compute stream.
  const tc::Stream& stream() const noexcept { return stream_; }
  /// The shape of a boundary activation between two stages for a (B, T) micro-batch: (B T, d), fp32.
  tessera::Shape boundary_shape(std::int64_t B, std::int64_t T) const { return tessera::Shape{B * T, c_.d_model}; }

  /// Sets the activation slots (the micro-batches a pipeline schedule keeps in flight on this
  /// stage between their forward and backward; 1 by default): each keeps its own layers'
  /// activations, final norm output and logits. Throws tessera::Error for n < 1.
  void set_slots(int n) {
    TESSERA_EXPECTS(n >= 1, "DeviceLlama::set_slots: ", n, " activation slots; at least 1");
    if (static_cast<int>(slots_.size()) == n) return;
    const std::int64_t N = B_ * T_, d = c_.d_model;
    slots_.clear();
    slots_.resize(static_cast<std::size_t>(n));
    for (Slot& S : slots_) {
      for (std::int64_t l = l0_; l < l1_; ++l)
        S.layers.push_back(std::make_unique<DeviceDecoderLayer<C>>(c_, B_, T_, stream_, blas_, scratch_, tp_));
      for (std::int64_t i = l0_; i <= l1_; ++i) S.acts.push_back(tc::DeviceTensor<C>::empty({B_, T_, d}, stream_));
      if (has_head()) {
        S.hn = tc::DeviceTensor<C>::empty({B_, T_, d}, stream_);
        S.logits = tc::DeviceTensor<C>::empty({N, layout_.vocab_rows}, stream_);
        S.rstd = tc::DeviceTensor<float>::empty({N}, stream_);
      }
    }
  }
  /// The activation slots (set_slots).
  int slots() const noexcept { return static_cast<int>(slots_.size()); }
  /// The decoder layers' attention: tessera's fused kernels (`true`: ops::flash_attention, a
  /// log-sum-exp per row and head kept instead of the (B, H, T, T) probabilities) or the unfused
  /// reference (`false`, the default). Rebuilds the layers' scratch and activations. Throws
  /// tessera::Error while a micro-batch awaits its backward, or for a head_dim over
  /// ops::flash_max_head_dim.
  void set_fused_attention(bool on) {
    if (on == scratch_->fused) return;
    for (const Slot& S : slots_)
      TESSERA_EXPECTS(!S.busy, "DeviceLlama::set_fused_attention: a micro-batch awaits its backward");
    const int n = slots();
    slots_.clear();
    scratch_ = std::make_shared<DecoderScratch<C>>(c_, B_, T_, stream_, tp_size_, on);
    set_slots(n);
  }
  /// (See set_fused_attention.)
  bool fused_attention() const noexcept { return scratch_->fused; }
  /// A split backward (zero-bubble schedules) is not built for this model: throws
  /// tessera::Error for `on`.
  void set_split_backward(bool on) {
    TESSERA_EXPECTS(!on, "DeviceLlama: a split backward (zero-bubble schedules, I and W passes) is not built for the "
                    "Llama's stages; use GPipe, 1F1B or interleaved 1F1B");
  }

  /// Forward of one (B, T) micro-batch through this stage into activation slot `slot`: from the
  /// tokens (device, B x T int32 in [0, V), checked by the caller) on the embedding's stage, else
  /// from `input` (boundary_shape, fp32). On the head's stage the losses against `targets` (B x T)
  /// are added to take_loss_sum()'s accumulator and, with `dloss` (the loss's gradient per
  /// token), the logits' gradient kept in the slot for stage_backward; otherwise the output into
  /// `output` (boundary_shape, fp32). `at` is unused (the model has no dropout). Collective over
  /// tp. Throws tessera::Error naming the shapes when a view does not match or the slot is out
  /// of range.
  void stage_forward(int slot, std::int64_t B, std::int64_t T, tc::DeviceView<const std::int32_t> tokens,
                     tc::DeviceView<const float> input, tc::DeviceView<const std::int32_t> targets, const float* dloss,
                     tc::DeviceView<float> output, const tessera::BatchPosition& at = {}) {
    (void)at;
    const std::int64_t N = B_ * T_, d = c_.d_model, Vl = layout_.vocab_rows;
    TESSERA_EXPECTS(B == B_ && T == T_, "DeviceLlama::stage_forward: a micro-batch of ", B, " x ", T,
                    ", the model was built for ", B_, " x ", T_);
    Slot& S = slot_at(slot, "stage_forward");
    TESSERA_EXPECTS(!S.busy, "DeviceLlama::stage_forward: activation slot ", slot, " holds a micro-batch whose "
                    "backward has not run");
    const C* w = weights();
    if (has_embedding()) {
      TESSERA_EXPECTS(tokens.numel() == N, "DeviceLlama::stage_forward: tokens ", tokens.shape, " for ", B_, " x ", T_);
      // Under tp each rank looks up the tokens of its vocabulary rows (the others' read as zero
      // rows) and the lookups are summed: one rank holds each row, so the sum is exact.
      const auto table = view(w + at_flat(layout_.embed), {Vl, d});
      if (tp_ == nullptr) {
        tc::ops::embedding_forward<C>(stream_, tokens, table, S.acts[0]);
      } else {
        tc::ops::vocab_local_ids(stream_, tokens, local_ids_, tp_rank_ * Vl, Vl, Vl);
        tc::ops::embedding_forward<C>(stream_, local_ids_, table, S.acts[0]);
        sum_over_tp(S.acts[0]);
      }
    } else {
      from_boundary(input, S.acts[0], "stage_forward input");
    }
    for (std::size_t i = 0; i < S.layers.size(); ++i)
      S.layers[i]->forward(S.acts[i], w + at_flat(layout_.layer_at(l0_ + static_cast<std::int64_t>(i))), S.acts[i + 1]);
    const tc::DeviceTensor<C>& top = S.acts.back();
    // A forward with dloss keeps the slot for its backward (on the head's stage the logits'
    // gradient; elsewhere the activations); an evaluation's frees it at once.
    S.busy = S.has_grad = dloss != nullptr;
    if (!has_head()) {
      to_boundary(top, output, "stage_forward output");
      return;
    }
    TESSERA_EXPECTS(targets.numel() == N, "DeviceLlama::stage_forward: targets ", targets.shape, " for ", B_, " x ", T_);
    rms_norm_forward<C>(stream_, top, view(w + at_flat(layout_.norm), {d}), S.hn, S.rstd,
                        static_cast<float>(c_.norm_eps));
    // The logits of this rank's vocabulary columns (all of them at tp 1); the loss and, with
    // dloss, dlogits in place; under tp vocab-parallel (two small all-reduces; every rank gets
    // every token's loss).
    blas_.gemm(stream_, tc::GemmShape{.m = N, .n = Vl, .k = d}, static_cast<const C*>(S.hn.data()),
               w + at_flat(layout_.head), S.logits.data(), 1.f, 0.f);
    const tc::DeviceView<const std::int32_t> flat_targets(targets.data, tessera::Shape{N});
    if (tp_ == nullptr)
      tc::ops::softmax_cross_entropy<C>(stream_, S.logits, c_.vocab_size, flat_targets, losses_, dloss);
    else
      tc::ops::vocab_parallel_cross_entropy<C>(stream_, *tp_, S.logits, tp_rank_ * Vl, Vl, flat_targets, losses_,
                                               stats_, dloss);
    tc::ops::bias_grad<float>(stream_, tc::DeviceView<const float>(losses_.data(), tessera::Shape{N, 1}),
                              tc::DeviceView<float>(loss_sum_.data(), tessera::Shape{1}), loss_ws_);
  }

  /// Backward of the micro-batch in activation slot `slot` (its stage_forward ran with dloss):
  /// from the slot's logits' gradient on the head's stage, else from `grad_output` (the next
  /// stage's input gradient, boundary_shape, fp32); the gradients added into the flat
  /// gradients; the input gradient into `grad_input` (boundary_shape, fp32) unless this stage
  /// holds the embedding (which takes `tokens`' gradient rows). Calls the backward hook at each of
  /// ready_offsets() as it passes it. Collective over tp. Throws tessera::Error naming the shapes.
  void stage_backward(int slot, tc::DeviceView<const std::int32_t> tokens, tc::DeviceView<const float> grad_output,
                      tc::DeviceView<float> grad_input) {
    const std::int64_t N = B_ * T_, d = c_.d_model, Vl = layout_.vocab_rows;
    Slot& S = slot_at(slot, "stage_backward");
    TESSERA_EXPECTS(S.busy && S.has_grad, "DeviceLlama::stage_backward: activation slot ", slot,
                    " holds no forward with a gradient (stage_forward with dloss)");
    S.busy = S.has_grad = false;
    const C* w = weights();
    float* g = grads_.data();
    const tc::DeviceTensor<C>& top = S.acts.back();
    if (has_head()) {
      // The head, then the final norm. Under tp the head's input gradient is this rank's
      // columns' part, summed over tp in fp32 (a column-parallel product).
      blas_.gemm(stream_, tc::GemmShape{.trans_a = true, .m = d, .n = Vl, .k = N}, static_cast<const C*>(S.hn.data()),
                 static_cast<const C*>(S.logits.data()), g + at_flat(layout_.head), 1.f, 1.f);
      const tc::GemmShape head_input{.trans_b = true, .m = N, .n = d, .k = Vl};
      if (tp_ == nullptr) {
        blas_.gemm(stream_, head_input, static_cast<const C*>(S.logits.data()), w + at_flat(layout_.head), dh_.data(),
                   1.f, 0.f);
      } else {
        blas_.gemm(stream_, head_input, static_cast<const C*>(S.logits.data()), w + at_flat(layout_.head), sum_.data(),
                   1.f, 0.f);
        tp_->all_reduce(sum_.view(), tessera::ReduceOp::sum);
        tc::ops::convert_from_f32<C>(stream_, sum_, dh_);
      }
      rms_norm_backward<C>(stream_, dh_, top, view(w + at_flat(layout_.norm), {d}), S.rstd, dx_,
                           tc::DeviceView<float>(g + at_flat(layout_.norm), tessera::Shape{d}), partial_);
      ready(at_flat(layout_.norm));
    } else {
      from_boundary(grad_output, dx_, "stage_backward grad_output");
    }
    for (std::size_t k = S.layers.size(); k-- > 0;) {
      // dx_ holds the gradient of layer k's output; its input gradient goes to dh_, then swaps.
      const std::int64_t off = at_flat(layout_.layer_at(l0_ + static_cast<std::int64_t>(k)));
      S.layers[k]->backward(dx_, w + off, g + off, dh_);
      std::swap(dx_, dh_);
      ready(off);
    }
    if (!has_embedding()) {
      to_boundary(dx_, grad_input, "stage_backward grad_input");
      return;
    }
    TESSERA_EXPECTS(tokens.numel() == N, "DeviceLlama::stage_backward: tokens ", tokens.shape, " for ", B_, " x ", T_);
    // Under tp this rank's vocabulary rows only (computed again: another micro-batch's forward
    // may have run since this one's).
    if (tp_ != nullptr) tc::ops::vocab_local_ids(stream_, tokens, local_ids_, tp_rank_ * Vl, Vl, Vl);
    tc::ops::embedding_backward<C>(stream_, tp_ == nullptr ? tokens : tc::DeviceView<const std::int32_t>(local_ids_),
                                   dx_, tc::DeviceView<float>(g + at_flat(layout_.embed), tessera::Shape{Vl, d}));
    ready(0);
  }
  /// (Zero-bubble I pass: not built for this model; throws tessera::Error, as set_split_backward.)
  void stage_backward_input(int, tc::DeviceView<const std::int32_t>, tc::DeviceView<const float>, tc::DeviceView<float>) {
    set_split_backward(true);
  }
  /// (Zero-bubble W pass: not built for this model; throws tessera::Error, as set_split_backward.)
  void stage_backward_weight(int) { set_split_backward(true); }

  /// The losses summed since the last call (the head's stage; 0 elsewhere), then zeroed; blocks
  /// until they are computed.
  double take_loss_sum() {
    if (loss_sum_.numel() == 0) return 0;
    const double s = tc::to_host(tc::DeviceView<const float>(loss_sum_), stream_).data()[0];
    loss_sum_.fill_zero(stream_);
    return s;
  }

  /// Where backward finishes the gradients, in its order (device_grad_buckets' `ready`), as
  /// offsets into this instance's flat buffer: the final norm's first element (after the head
  /// and the norm) on the head's stage, each held layer's from the last down, then 0 (after the
  /// embedding, or the stage's first layer). Descending.
  std::vector<std::int64_t> ready_offsets() const {
    std::vector<std::int64_t> r;
    if (has_head()) r.push_back(at_flat(layout_.norm));
    for (std::int64_t l = l1_ - 1; l >= l0_; --l) r.push_back(at_flat(layout_.layer_at(l)));
    if (r.empty() || r.back() != 0) r.push_back(0);
    return r;
  }
  /// Called by the backward passes with each offset from which the gradients are final (after
  /// the work producing them is queued on the stream): DeviceDataParallel::gradients_final_from.
  void set_backward_hook(std::function<void(std::int64_t)> hook) { hook_ = std::move(hook); }
  /// The flat fp32 gradients (this instance's range of flat_model_layout), e.g. for DeviceDataParallel.
  tc::DeviceView<float> gradient_view() const { return grads_.view(); }
  /// Elements of the flat buffers.
  std::int64_t numel() const noexcept { return range_.hi - range_.lo; }

  /// This instance's part of the squared gradient norm into a one-element device buffer, on the
  /// stream (no communication): its shards, the replicated norms' gradients weighted 1 / tp. The
  /// sum over tp and the pipeline stages is the whole model's squared norm.
  tc::DeviceView<float> grad_sum_of_squares() {
    if (norm_.numel() == 0) {
      norm_ = tc::DeviceTensor<float>::empty({1}, stream_);
      norm_ws_ = tc::DeviceTensor<float>::empty({tc::ops::norm_blocks}, stream_);
    }
    if (tp_ == nullptr)
      tc::ops::global_sum_of_squares(stream_, grads_, norm_, norm_ws_);
    else  // stage_segments' groups: 0 sharded, 1 replicated
      tc::ops::weighted_sum_of_squares(stream_, grads_, chunks_, 1.f, 1.f / static_cast<float>(tp_size_), norm_,
                                       norm_ws_);
    return norm_.view();
  }
  /// The square root of `sum` (one float on the device, e.g. grad_sum_of_squares, or several
  /// chunks' added) summed over tp and `stages` in place; blocks until computed. Collective over
  /// tp and `stages`.
  double reduce_grad_norm(tc::DeviceView<float> sum, tc::DeviceComm* stages = nullptr) {
    TESSERA_EXPECTS(sum.numel() == 1, "DeviceLlama::reduce_grad_norm: a sum of ", sum.numel(), " elements, expected 1");
    if (tp_ != nullptr) tp_->all_reduce(sum, tessera::ReduceOp::sum);
    if (stages != nullptr && stages->size() > 1) stages->all_reduce(sum, tessera::ReduceOp::sum);
    return std::sqrt(static_cast<double>(tc::to_host(tc::DeviceView<const float>(sum), stream_).data()[0]));
  }
  /// The L2 norm of every gradient of the whole model (one fp32 sum of squares on the device;
  /// blocks until it is computed), e.g. for clipping as optim::clip_grad_norm: step(options,
  /// clip_scale). Under tp each rank's shards count once and the replicated norms' gradients
  /// 1 / tp, summed over tp; a pipeline stage's part summed over `stages` (the group of every
  /// stage's rank with this tp rank). Collective over tp and `stages`, the same value on every rank.
  double grad_norm(tc::DeviceComm* stages = nullptr) { return reduce_grad_norm(grad_sum_of_squares(), stages); }
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

  /// The fp32 master weights, flat (this instance's range of flat_model_layout; for the whole
  /// model at tp 1, unpack_model gives the CPU model).
  std::vector<float> download() const {
    const tessera::Tensor<float> h = tc::to_host(master_, stream_);
    return {h.data(), h.data() + h.numel()};
  }
  /// The accumulated gradients, flat.
  std::vector<float> download_grads() const {
    const tessera::Tensor<float> h = tc::to_host(grads_, stream_);
    return {h.data(), h.data() + h.numel()};
  }
  /// The whole model's layout (at tp > 1 one rank's shard); this instance holds its range
  /// flat_range() (the whole buffer unless a pipeline stage).
  const FlatModelLayout& layout() const noexcept { return layout_; }
  /// (See layout.)
  FlatRange flat_range() const noexcept { return range_; }
  /// Tensor-parallel ranks (1 without tp) and this rank's index among them.
  int tp_size() const noexcept { return tp_size_; }
  /// (See tp_size.)
  int tp_rank() const noexcept { return tp_rank_; }

 private:
  // One micro-batch's activations (pipeline schedules keep several in flight).
  struct Slot {
    std::vector<std::unique_ptr<DeviceDecoderLayer<C>>> layers;  // this stage's layers, each keeping its activations
    std::vector<tc::DeviceTensor<C>> acts;  // the input of each held layer, then the last one's output
    tc::DeviceTensor<C> hn, logits;         // the head's stage: the final norm's output, the logits (then dlogits)
    tc::DeviceTensor<float> rstd;           // the final norm's statistics
    bool busy = false;                      // a forward ran whose backward has not
    bool has_grad = false;                  // that forward was given dloss (a backward may run)
  };

  const C* weights() const {
    if constexpr (std::is_same_v<C, float>)
      return master_.data();
    else
      return weights_.data();
  }
  // An offset of the whole model's layout as an offset into this instance's buffer.
  std::int64_t at_flat(std::int64_t whole_offset) const { return whole_offset - range_.lo; }
  Slot& slot_at(int slot, const char* what) {
    TESSERA_EXPECTS(slot >= 0 && slot < static_cast<int>(slots_.size()), "DeviceLlama::", what, ": activation slot ",
                    slot, " of ", slots_.size());
    return slots_[static_cast<std::size_t>(slot)];
  }
  static tc::DeviceView<const C> view(const C* p, tessera::Shape s) { return {p, s}; }
  void ready(std::int64_t offset) {
    if (hook_) hook_(offset);
  }
  // A boundary activation (fp32, B T x d) into C storage, and back (bf16 -> fp32 -> bf16 is exact).
  void from_boundary(tc::DeviceView<const float> in, const tc::DeviceTensor<C>& out, const char* what) {
    TESSERA_EXPECTS(in.numel() == out.numel() && in.data != nullptr, "DeviceLlama: ", what, " ", in.shape, " is not ",
                    boundary_shape(B_, T_));
    if constexpr (std::is_same_v<C, float>)
      tc::detail::check(cudaMemcpyAsync(out.data(), in.data, out.bytes(), cudaMemcpyDeviceToDevice, stream_.get()),
                        "cudaMemcpyAsync", "DeviceLlama ", what, " of ", out.numel(), " elements");
    else
      tc::ops::convert_from_f32<C>(stream_, in, out);
  }
  void to_boundary(const tc::DeviceTensor<C>& in, tc::DeviceView<float> out, const char* what) {
    TESSERA_EXPECTS(in.numel() == out.numel() && out.data != nullptr, "DeviceLlama: ", what, " ", out.shape, " is not ",
                    boundary_shape(B_, T_));
    if constexpr (std::is_same_v<C, float>)
      tc::detail::check(cudaMemcpyAsync(out.data, in.data(), in.bytes(), cudaMemcpyDeviceToDevice, stream_.get()),
                        "cudaMemcpyAsync", "DeviceLlama ", what, " of ", in.numel(), " elements");
    else
      tc::ops::convert_to_f32<C>(stream_, in, out);
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
  int first_, end_;  // the pipeline layers held
  FlatRange range_;  // their range of layout_
  std::int64_t l0_ = 0, l1_ = 0;  // the decoder layers held, [l0_, l1_)
  std::int64_t B_, T_;
  const tc::Stream& stream_;
  tc::BlasLt& blas_;
  tc::DeviceTensor<float> master_, grads_, m_, v_;
  tc::DeviceTensor<C> weights_;  // the bf16 copy the products read (empty for fp32)
  std::shared_ptr<DecoderScratch<C>> scratch_;
  std::vector<Slot> slots_;
  tc::DeviceTensor<C> dh_, dx_;  // backward's running gradients (shared by the slots)
  tc::DeviceTensor<float> losses_, loss_sum_, loss_ws_, partial_, norm_, norm_ws_;
  tc::DeviceTensor<float> stats_, sum_;  // under tp: the loss's statistics, fp32 sums over tp
  tc::DeviceTensor<std::int32_t> ids_, tgt_, local_ids_;
  tc::ops::AdamWChunks chunks_;
  long long steps_ = 0;
  std::function<void(std::int64_t)> hook_;
};

}  // namespace llama::device
